#!/usr/bin/env bash
# Issue 8's startup benchmark: PullImage to ready for three real Debian workloads (JVM service,
# Python service with a large library set, PostgreSQL) behind shaped registry links, containerd
# overlayfs vs talaria-node (no artifact / default / accelerated artifact). Needs root (netns, tc,
# FUSE, containerd, debootstrap) and the test tools (hack/setup.sh, hack/tools.sh).
#
# Usage: hack/bench-startup.sh [--workloads jvm,python,postgres] [--links 1000mbit/5ms,200mbit/20ms]
#          [--variants overlayfs,talaria-none,talaria-default,talaria-accelerated] [--runs 5]
#          [--local-runs 3] [--node-args "..."] [--keep-logs DIR] [--results-dir DIR]
# PROFILE=release builds optimized binaries (default: dev, which shares the test build).
# The images are built once by hack/workload-images.sh (~1.7 GiB compressed in
# ~/.cache/talaria/images/workloads-*); results go to ~/.cache/talaria/bench-results/.
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/env.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/talaria/target}
PROFILE=${PROFILE:-dev}
images=$(hack/workload-images.sh)
exec cargo bench --profile "$PROFILE" -p talaria-node --bench startup -- --images "$images" "$@"
