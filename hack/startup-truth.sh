#!/usr/bin/env bash
# Ground truth for startup-path prediction: starts real images (made from this machine's
# files) under `strace -f` in a chroot and compares the files they read with the
# analyzer's prediction; prints recall/precision by files and by bytes per image.
# Needs root, strace and chroot. Fails when byte recall < 95% or byte precision < 60%.
#
#   hack/startup-truth.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for t in strace chroot; do
	command -v "$t" >/dev/null || { echo "startup-truth: $t is required" >&2; exit 2; }
done
if [ "$(id -u)" != 0 ]; then
	echo "startup-truth: chroot needs root" >&2
	exit 2
fi
exec cargo test -p talaria-artifact --test startup_truth -- --nocapture --test-threads=1
