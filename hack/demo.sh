#!/usr/bin/env bash
# The main job on the embedded default (an OCI image layout; no registry, no cluster):
# make a small multi-layer image, build its accelerated artifact into the same layout,
# show what a node would use, and read files of the image lazily through the artifact.
set -euo pipefail
cd "$(dirname "$0")/.."
# Only what this job needs (not the test tools: no JDK, containerd or Go builds).
bash hack/setup.sh demo
if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
echo "== building talaria (cargo build --release -p talaria-cli; a few minutes the first time)" >&2
cargo build --quiet --release -p talaria-cli
T=${CARGO_TARGET_DIR:-target}/release/talaria
dir=target/demo/image
bash hack/demo-image.sh "$dir"

echo; echo "\$ talaria build oci:$dir"
$T build "oci:$dir"
echo; echo "\$ talaria inspect oci:$dir"
$T inspect "oci:$dir"
echo; echo "\$ talaria cat oci:$dir /app/hello.txt      # layer 3 overwrote layer 1's copy"
$T cat "oci:$dir" /app/hello.txt
echo; echo "\$ talaria cat oci:$dir /etc/passwd"
$T cat "oci:$dir" /etc/passwd
echo; echo "\$ talaria cat oci:$dir /etc/motd           # deleted by a whiteout in layer 3"
$T cat "oci:$dir" /etc/motd || echo "(exit $?: not found, as expected)"
echo; echo "\$ talaria build oci:$dir                   # again: the artifact exists and is adopted"
$T build "oci:$dir"
