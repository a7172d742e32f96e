#!/usr/bin/env bash
# `talaria build` on a multi-layer image of >= 1 GiB uncompressed (this machine's /usr as three
# layers, cached in $BENCH_DIR): is the build bounded by decompression, not by waiting?
# Prints, in one run: the build's wall time, the sum of its per-layer indexing times, their ratio
# (< 1 means layers were indexed in parallel), and `gzip -dc` of every layer in turn as the
# baseline (ratio build / gzip).
# Usage: hack/bench-build.sh [parallelism]
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/lib/oci-layout.sh
BENCH_DIR=${BENCH_DIR:-/tmp/talaria-bench}
par=${1:-2}
img="$BENCH_DIR/build-image"
if [ ! -s "$img/index.json" ]; then
  echo "making $img from /usr (a few minutes)..." >&2
  oci_layout "$img" latest '{"Cmd": ["/bin/true"]}' \
    /usr/lib/x86_64-linux-gnu /usr/share /usr/bin >/dev/null
fi
cargo build --release -q -p talaria-cli
T=target/release/talaria
blobs=$(jq -r '.layers[].digest | sub("sha256:"; "")' \
  "$img/blobs/sha256/$(jq -r '.manifests[0].digest | sub("sha256:"; "")' "$img/index.json")")

t0=$(date +%s.%N)
for b in $blobs; do gzip -dc "$img/blobs/sha256/$b" > /dev/null; done
gz=$(echo "$(date +%s.%N) - $t0" | bc)

# A fresh copy of the layout each run, so the build is never adopted.
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cp -r "$img" "$work/img"
t0=$(date +%s.%N)
$T build "oci:$work/img" --profile default --parallelism "$par" --output json > "$work/out.json"
wall=$(echo "$(date +%s.%N) - $t0" | bc)

jq -r --arg wall "$wall" --arg gz "$gz" --arg par "$par" '
  (.layers | map(.seconds) | add) as $sum
  | (.layers | map(.uncompressedSize) | add) as $tar
  | (.layers | map(.compressedSize) | add) as $gzb
  | "layers               \(.layers | length), \($gzb / 1048576 | floor) MiB gzip, \($tar / 1048576 | floor) MiB tar",
    "parallelism          \($par)",
    "build wall           \($wall | tonumber * 100 | round / 100) s",
    "sum of layer times   \($sum * 100 | round / 100) s",
    "wall / sum           \(($wall | tonumber) / $sum * 100 | round / 100)",
    "gzip -dc, in turn    \($gz | tonumber * 100 | round / 100) s",
    "build / gzip -dc     \(($wall | tonumber) / ($gz | tonumber) * 100 | round / 100)",
    "index bytes          \(.layers | map(.index.size // 0) | add) (\(((.layers | map(.index.size // 0) | add) / $gzb * 10000 | round) / 100)% of gzip)"
' "$work/out.json"
