#!/usr/bin/env bash
# Benchmark of startup-path prediction against ground truth: builds (once, cached) images
# from Debian packages (hack/debian-images.sh), starts each under `strace -f` in a chroot of
# its merged rootfs until ready, and compares the files read with the analyzer's plan.
# Prints recall/precision by files and by bytes per image and the analyzer's time per
# image. Fails when byte recall < 95% or byte precision < 60% on any image. Also prints
# range recall/precision (page-cache residency after a cold start from a fresh loop-mounted
# ext4, against the plan's files whole and its byte ranges), not asserted.
#
#   hack/startup-truth.sh              # debug build (as `cargo test` runs it)
#   hack/startup-truth.sh --release    # the analyzer's time in a release build
#
# Needs root (debootstrap, chroot, namespaces, loop mounts), debootstrap, strace, unshare,
# readelf, mkfs.ext4, getfattr, jq, javac/jar 17 (hack/setup.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/env.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/talaria/target}
for t in strace unshare readelf debootstrap mkfs.ext4 findmnt; do
	command -v "$t" >/dev/null || { echo "startup-truth: $t is required (hack/setup.sh)" >&2; exit 2; }
done
if [ "$(id -u)" != 0 ]; then
	echo "startup-truth: needs root (chroot, namespaces, debootstrap)" >&2
	exit 2
fi
profile=()
[ "${1:-}" != --release ] || profile=(--release)
# Built here first so a cold build's time is reported apart from the test's.
bash hack/debian-images.sh >/dev/null
exec cargo test "${profile[@]}" -p talaria-artifact --test startup_truth -- --nocapture --test-threads=1
