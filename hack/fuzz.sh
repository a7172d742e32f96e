#!/usr/bin/env bash
# Runs each layer-index fuzz target for a while (default 60 s each).
# Usage: hack/fuzz.sh [seconds_per_target]
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
# Seeds: small real layers (gzip and plain tar) and their encoded indexes.
mkdir -p corpus/index_layer corpus/decode_index
if [ ! -e corpus/index_layer/seed-gzip ]; then
  tmp=$(mktemp -d)
  tar -C / -cf "$tmp/l.tar" etc/hostname etc/passwd etc/group etc/os-release 2>/dev/null || true
  { printf '\0'; gzip -c -n < "$tmp/l.tar"; } > corpus/index_layer/seed-gzip
  { printf '\1'; cat "$tmp/l.tar"; } > corpus/index_layer/seed-tar
  cargo +nightly run -q --release --bin make_seeds -- "$tmp/l.tar" corpus/decode_index
  rm -rf "$tmp"
fi
for target in decode_index index_layer; do
  echo "== $target for ${secs}s" >&2
  cargo +nightly fuzz run "$target" "corpus/$target" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -max_len=262144 -timeout=10 2>&1 | tail -n 4
done
