#!/usr/bin/env bash
# Issue 8's startup benchmark: PullImage to ready for three real Debian workloads (JVM service,
# Python service with a large library set, PostgreSQL) behind shaped registry links, containerd
# overlayfs vs talaria-node (no artifact / default / accelerated artifact). Needs root (netns, tc,
# FUSE, containerd, debootstrap, mount) and the test tools (hack/setup.sh, hack/tools.sh).
#
# Usage: hack/bench-startup.sh [--workloads jvm,python,postgres] [--links 1000mbit/5ms,200mbit/20ms]
#          [--variants overlayfs,talaria-none,talaria-default,talaria-accelerated] [--runs 5]
#          [--local-runs 3] [--node-args "..."] [--fuse-holder] [--keep-logs DIR] [--results-dir DIR]
# PROFILE=release builds optimized binaries (default: dev, which shares the test build).
# BENCH_TMPFS_GIB=10 (default): registries, containerd and talaria-node roots live on a tmpfs of
# that size, so unpacking and removing ~2 GB per run does not wait on this VM's shared disk
# (it made each unpacking run's teardown ~40 s); BENCH_TMPFS_GIB=0 keeps them in /tmp.
# The images are built once by hack/workload-images.sh (~1 GiB compressed in
# ~/.cache/talaria/images/workloads-*); results go to ~/.cache/talaria/bench-results/.
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/env.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/talaria/target}
PROFILE=${PROFILE:-dev}
TMPFS_GIB=${BENCH_TMPFS_GIB:-10}
images=$(hack/workload-images.sh)
# Build first, so the build's own temp files stay out of the tmpfs.
cargo bench --profile "$PROFILE" -p talaria-node --bench startup --no-run
# talaria-learned runs the real controller next to the node binary.
cargo build --profile "$PROFILE" -p talaria-controller --bin talaria-controller
if [ "$TMPFS_GIB" != 0 ]; then
  tmp=$(mktemp -d /tmp/talaria-bench-tmpfs.XXXXXX)
  mount -t tmpfs -o "size=${TMPFS_GIB}g,mode=1777" tmpfs "$tmp"
  trap 'umount -l "$tmp"; rmdir "$tmp"' EXIT
  export TMPDIR=$tmp
fi
cargo bench --profile "$PROFILE" -p talaria-node --bench startup -- --images "$images" "$@"
