#!/usr/bin/env bash
# Layer-index benchmark: builds a >= 1 GiB (uncompressed) gzip layer from this machine's files
# (cached in $BENCH_DIR), then runs the release bench binary on it, which prints indexing
# throughput vs `gzip -dc > /dev/null`, peak RSS, index size and the 1 MiB random-read cost.
# Usage: hack/bench-index.sh [span_size_bytes]
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_DIR=${BENCH_DIR:-/tmp/talaria-bench}
mkdir -p "$BENCH_DIR"
LAYER="$BENCH_DIR/layer.tar.gz"
if [ ! -s "$LAYER" ]; then
  echo "building $LAYER from /usr (this takes a minute)..." >&2
  # Regular rootfs content: libraries, binaries, docs, data; sorted for reproducibility.
  tar -C / --sort=name --ignore-failed-read -cf - usr/lib/x86_64-linux-gnu usr/share usr/bin 2>/dev/null \
    | gzip -6 -n > "$LAYER.tmp"
  mv "$LAYER.tmp" "$LAYER"
fi
size=$(gzip -l "$LAYER" | awk 'NR==2 {print $2}')
echo "layer: $(du -h "$LAYER" | cut -f1) compressed, $((size / 1048576)) MiB uncompressed (gzip -l, mod 4 GiB)" >&2
cargo build --release -q -p talaria-artifact --example bench_index
exec ./target/release/examples/bench_index "$LAYER" "$@"
