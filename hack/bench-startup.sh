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
# When the chosen workloads need more than 10 GiB there (the registry holds every image, one run
# holds one image's blobs and its unpacked tree; +25% for artifacts and the node's cache), the
# default becomes what they need if that fits in MemAvailable next to the bench's own memory (it
# holds every layer blob in memory), else 0 (disk). `--workloads ml` (3.4 GiB compressed, 5.9 GiB
# unpacked: ~17 GiB of tmpfs + ~7 GiB of process memory) lands on disk on a 24 GiB machine.
# The images are built once by hack/workload-images.sh (the named workloads; ~1 GiB compressed
# for the default three, +3.4 GiB for ml, in ~/.cache/talaria/images/workloads-*); results go to
# ~/.cache/talaria/bench-results/.
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/env.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/talaria/target}
PROFILE=${PROFILE:-dev}
workloads=jvm,python,postgres
prev=""
for a in "$@"; do
  case $a in --workloads=*) workloads=${a#--workloads=} ;; esac
  [ "$prev" = --workloads ] && workloads=$a
  prev=$a
done
# shellcheck disable=SC2086 # one name a word
images=$(hack/workload-images.sh ${workloads//,/ })
if [ -n "${BENCH_TMPFS_GIB:-}" ]; then
  TMPFS_GIB=$BENCH_TMPFS_GIB
else
  # Bytes the runs put under TMPDIR: every image in the registry, plus one run's content store and
  # unpacked tree, +25%.
  registry=0 run=0
  for w in ${workloads//,/ }; do
    c=0
    while read -r l; do [ -z "$l" ] || c=$(( c + $(stat -c %s "$images/$l") )); done < "$images/$w/layers"
    u=$(cat "$images/$w/unpacked-bytes")
    registry=$(( registry + c ))
    [ $(( c + u )) -le "$run" ] || run=$(( c + u ))
  done
  gib=$(( 1 << 30 ))
  need=$(( ( (registry + run) * 5 / 4 + gib - 1 ) / gib + 1 ))
  avail=$(( $(awk '/^MemAvailable:/ {print $2}' /proc/meminfo) * 1024 / gib ))
  # The bench holds every layer blob in memory; 4 GiB more for containerd, the node, the workload.
  own=$(( registry / gib + 4 ))
  if [ "$need" -le 10 ]; then
    TMPFS_GIB=10
  elif [ $(( need + own )) -le "$avail" ]; then
    TMPFS_GIB=$need
  else
    TMPFS_GIB=0
    echo "[bench-startup] $workloads needs ~${need} GiB under TMPDIR (+${own} GiB of process memory)," \
      "more than the ${avail} GiB available: using disk ($(df -h --output=avail "${TMPDIR:-/tmp}" | tail -1 | tr -d ' ') free)" >&2
  fi
fi
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
