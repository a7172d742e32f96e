#!/usr/bin/env bash
# Issue 8's startup benchmark: PullImage to ready for three real Debian workloads (JVM service,
# Python service with a large library set, PostgreSQL) behind shaped registry links, containerd
# overlayfs vs talaria-node (no artifact / default / accelerated artifact). Needs root (netns, tc,
# FUSE, containerd, debootstrap, mount) and the test tools (hack/setup.sh, hack/tools.sh).
#
# Usage: hack/bench-startup.sh [--workloads jvm,python,postgres] [--links 1000mbit/5ms,200mbit/20ms]
#          [--variants overlayfs,talaria-none,talaria-default,talaria-accelerated] [--runs 5]
#          (peers: soci, soci-parallel, stargz, stargz-optimized; built here by hack/tools.sh)
#          [--local-runs 3] [--node-args "..."] [--fuse-holder] [--keep-logs DIR] [--results-dir DIR]
# PROFILE=release builds optimized binaries (default: dev, which shares the test build).
# BENCH_TMPFS_GIB=10 (default): registries, containerd and talaria-node roots live on a tmpfs of
# that size, so unpacking and removing ~2 GB per run does not wait on this VM's shared disk
# (it made each unpacking run's teardown ~40 s); BENCH_TMPFS_GIB=0 keeps them in /tmp.
# When the chosen workloads need more than 10 GiB there (the registry holds every image, one run
# holds one image's blobs and its unpacked tree; +25% for artifacts and the node's cache), the
# default becomes what they need if that fits in MemAvailable next to the bench's own memory (it
# holds every layer blob in memory); else, if one run's bytes fit, the runs get a tmpfs and the
# registries' storage goes to disk (TALARIA_REGISTRY_DIR under /var/tmp); else 0 (disk).
# `--workloads ml` (3.4 GiB compressed, 5.9 GiB unpacked: ~17 GiB in all, ~13 GiB for one run,
# + ~8 GiB of process memory) gets the middle choice on a 24 GiB machine.
# The images are built once by hack/workload-images.sh (the named workloads; ~1 GiB compressed
# for the default three, +3.4 GiB for ml, in ~/.cache/talaria/images/workloads-*); results go to
# ~/.cache/talaria/bench-results/.
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/env.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/talaria/target}
PROFILE=${PROFILE:-dev}
workloads=jvm,python,postgres
variants=""
prev=""
for a in "$@"; do
  case $a in
    --workloads=*) workloads=${a#--workloads=} ;;
    --variants=*) variants=${a#--variants=} ;;
  esac
  [ "$prev" = --workloads ] && workloads=$a
  [ "$prev" = --variants ] && variants=$a
  prev=$a
done
# The peers (issue 25) are built only when a variant names them.
peers=()
case ",$variants," in *,soci,* | *,soci-parallel,*) peers+=(soci) ;; esac
case ",$variants," in *,stargz,* | *,stargz-optimized,*) peers+=(stargz) ;; esac
[ ${#peers[@]} -eq 0 ] || bash hack/tools.sh "${peers[@]}"
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
  # One run alone (the registries' storage on disk).
  run_need=$(( ( run * 5 / 4 + gib - 1 ) / gib + 1 ))
  if [ "$need" -le 10 ]; then
    TMPFS_GIB=10
  elif [ $(( need + own )) -le "$avail" ]; then
    TMPFS_GIB=$need
  elif [ $(( run_need + own )) -le "$avail" ]; then
    TMPFS_GIB=$run_need
    # The registries (every image, and the peers' converted copies) go to disk; reads of
    # them come from the page cache after the first run.
    TALARIA_REGISTRY_DIR=$(mktemp -d /var/tmp/talaria-bench-registry.XXXXXX)
    export TALARIA_REGISTRY_DIR
    echo "[bench-startup] $workloads needs ~${need} GiB under TMPDIR (+${own} GiB of process memory):" \
      "the runs get a ${run_need} GiB tmpfs, the registries $TALARIA_REGISTRY_DIR on disk" >&2
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
  trap 'umount -l "$tmp"; rmdir "$tmp"; [ -z "${TALARIA_REGISTRY_DIR:-}" ] || rm -rf "$TALARIA_REGISTRY_DIR"' EXIT
  export TMPDIR=$tmp
fi
cargo bench --profile "$PROFILE" -p talaria-node --bench startup -- --images "$images" "$@"
