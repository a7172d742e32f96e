#!/usr/bin/env bash
# Cold-start benchmark (issue 7's first measurement, grown by issue 8): time from PullImage to
# the container's first output for a >= 1 GiB image behind a shaped registry link, containerd
# overlayfs vs talaria-node (no artifact / default / accelerated). Needs root (netns, tc, FUSE,
# containerd) and the test tools (hack/setup.sh, hack/tools.sh).
#
# Usage: hack/bench-cold-start.sh [--rate-mbit 200] [--delay-ms 20] [--runs 3]
#          [--variants overlayfs,talaria-none,talaria-default,talaria-accelerated]
#          [--layers 3] [--layer-mib 350] [--workload echo|read] [--node-args "--no-prefetch"]
# PROFILE=release builds optimized binaries (default: dev, which shares the test build).
# The generated layers are cached in ~/.cache/talaria/bench-cold-start/ (~1.1 GiB by default);
# delete that directory to reclaim the space.
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/env.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/talaria/target}
PROFILE=${PROFILE:-dev}
exec cargo bench --profile "$PROFILE" -p talaria-node --bench cold_start -- "$@"
