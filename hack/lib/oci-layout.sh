# Sourced: writes reproducible OCI image layouts from directories, one layer per directory.
#   oci_layout OUT TAG CONFIG_JSON ROOT...
# CONFIG_JSON is the image config's `config` object (Entrypoint, Cmd, ...). Layers are pax tars
# with fixed owner/mtime/order, gzip -n; the layout gets one manifest tagged TAG.

_oci_blob() { # FILE -> "<hex> <size>", stored under $OUT/blobs
  local hex; hex=$(sha256sum "$1" | cut -d' ' -f1)
  mv "$1" "$_OUT/blobs/sha256/$hex"
  echo "$hex $(stat -c %s "$_OUT/blobs/sha256/$hex")"
}

oci_layout() {
  local out=$1 tag=$2 cfg=$3; shift 3
  _OUT=$out
  local work; work=$(mktemp -d)
  rm -rf "$out"; mkdir -p "$out/blobs/sha256"
  local layers="[]" diffs="[]" root hex size diff
  for root in "$@"; do
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=pax \
        --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
        --ignore-failed-read -C "$root" -cf - . 2>/dev/null \
      | gzip -n -6 > "$work/layer"
    diff=$(gzip -dc "$work/layer" | sha256sum | cut -d' ' -f1)
    read -r hex size < <(_oci_blob "$work/layer")
    layers=$(jq -c --arg d "sha256:$hex" --argjson s "$size" \
      '. + [{mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $d, size: $s}]' <<<"$layers")
    diffs=$(jq -c --arg d "sha256:$diff" '. + [$d]' <<<"$diffs")
  done
  jq -cn --argjson c "$cfg" --argjson d "$diffs" '{architecture: "amd64", os: "linux",
    created: "1970-01-01T00:00:00Z", config: $c, rootfs: {type: "layers", diff_ids: $d}}' > "$work/config"
  local chex csize; read -r chex csize < <(_oci_blob "$work/config")
  jq -cn --arg c "sha256:$chex" --argjson cs "$csize" --argjson l "$layers" '{schemaVersion: 2,
    mediaType: "application/vnd.oci.image.manifest.v1+json",
    config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $c, size: $cs},
    layers: $l}' > "$work/manifest"
  local mhex msize; read -r mhex msize < <(_oci_blob "$work/manifest")
  echo '{"imageLayoutVersion":"1.0.0"}' > "$out/oci-layout"
  jq -n --arg m "sha256:$mhex" --argjson s "$msize" --arg tag "$tag" '{schemaVersion: 2,
    mediaType: "application/vnd.oci.image.index.v1+json",
    manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $m, size: $s,
                 platform: {architecture: "amd64", os: "linux"},
                 annotations: {"org.opencontainers.image.ref.name": $tag}}]}' > "$out/index.json"
  rm -rf "$work"
  echo "sha256:$mhex"
}
