#!/usr/bin/env bash
# Makes a small multi-layer OCI image layout from files of this machine, reproducibly:
#   layer 1: busybox-static as /bin with applet links, /etc/passwd, /etc/group, /etc/motd
#   layer 2: an "app" of real files (Perl's library: many small files, some large)
#   layer 3: overwrites /app/hello.txt, deletes /etc/motd (whiteout), adds /app/data (opaque dir)
# Usage: hack/demo-image.sh DIR [TAG]    (DIR is replaced)
set -euo pipefail
out=${1:?usage: demo-image.sh DIR [TAG]}
tag=${2:-latest}
command -v busybox >/dev/null || { echo "busybox-static missing: run hack/setup.sh" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$out"
mkdir -p "$out/blobs/sha256"

# Deterministic tars: fixed owner, mtime and order, gzip without name/time.
mklayer() { # mklayer ROOTDIR -> prints "<diff_id> <digest> <size>"
  local root=$1 tarf="$work/layer.tar"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=pax \
      --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime -C "$root" -cf "$tarf" .
  local diff; diff=$(sha256sum "$tarf" | cut -d' ' -f1)
  gzip -n -6 -c "$tarf" > "$work/layer.tgz"
  local dig; dig=$(sha256sum "$work/layer.tgz" | cut -d' ' -f1)
  mv "$work/layer.tgz" "$out/blobs/sha256/$dig"
  echo "$diff $dig $(stat -c %s "$out/blobs/sha256/$dig")"
}

r1="$work/l1"; mkdir -p "$r1/bin" "$r1/etc" "$r1/tmp" "$r1/app"
cp "$(command -v busybox)" "$r1/bin/busybox"
for a in sh ls cat echo env sleep head wc; do ln -s busybox "$r1/bin/$a"; done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$r1/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$r1/etc/group"
echo "welcome (deleted by layer 3)" > "$r1/etc/motd"
echo "hello from layer 1" > "$r1/app/hello.txt"
chmod 1777 "$r1/tmp"

r2="$work/l2"; mkdir -p "$r2/app/lib"
src=/usr/share/perl/5.36
[ -d "$src" ] || src=/usr/share/perl5
cp -a "$src/." "$r2/app/lib/"
mkdir -p "$r2/app/data"; echo "old data" > "$r2/app/data/old.txt"
# Incompressible but reproducible bytes (AES-CTR keystream of a fixed key).
{ openssl enc -aes-128-ctr -K 000102030405060708090a0b0c0d0e0f -iv 00000000000000000000000000000000 -nosalt </dev/zero 2>/dev/null || true; } \
  | head -c 3000000 > "$r2/app/data/blob.bin"

r3="$work/l3"; mkdir -p "$r3/app/data" "$r3/etc"
echo "hello from layer 3 (overwrites layer 1)" > "$r3/app/hello.txt"
: > "$r3/etc/.wh.motd"
: > "$r3/app/data/.wh..wh..opq"
echo "new data" > "$r3/app/data/new.txt"
ln "$r3/app/data/new.txt" "$r3/app/data/new-hardlink.txt"

read -r d1 g1 s1 < <(mklayer "$r1")
read -r d2 g2 s2 < <(mklayer "$r2")
read -r d3 g3 s3 < <(mklayer "$r3")

blob() { # blob FILE -> prints "<digest> <size>", stores it
  local dig; dig=$(sha256sum "$1" | cut -d' ' -f1)
  cp "$1" "$out/blobs/sha256/$dig"; echo "$dig $(stat -c %s "$1")"
}

jq -cn --arg d1 "sha256:$d1" --arg d2 "sha256:$d2" --arg d3 "sha256:$d3" '{
  architecture: "amd64", os: "linux", created: "1970-01-01T00:00:00Z",
  config: {Entrypoint: ["/bin/sh", "-c"], Cmd: ["cat /app/hello.txt"], WorkingDir: "/app",
           Env: ["PATH=/usr/local/bin:/usr/bin:/bin"]},
  rootfs: {type: "layers", diff_ids: [$d1, $d2, $d3]},
  history: [{created_by: "demo-image.sh layer 1"}, {created_by: "demo-image.sh layer 2"},
            {created_by: "demo-image.sh layer 3"}]}' > "$work/config.json"
read -r cg cs < <(blob "$work/config.json")

L=application/vnd.oci.image.layer.v1.tar+gzip
jq -cn --arg cg "sha256:$cg" --argjson cs "$cs" --arg L "$L" \
  --arg g1 "sha256:$g1" --argjson s1 "$s1" --arg g2 "sha256:$g2" --argjson s2 "$s2" \
  --arg g3 "sha256:$g3" --argjson s3 "$s3" '{
  schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
  config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $cg, size: $cs},
  layers: [{mediaType: $L, digest: $g1, size: $s1}, {mediaType: $L, digest: $g2, size: $s2},
           {mediaType: $L, digest: $g3, size: $s3}]}' > "$work/manifest.json"
read -r mg ms < <(blob "$work/manifest.json")

echo '{"imageLayoutVersion":"1.0.0"}' > "$out/oci-layout"
jq -n --arg mg "sha256:$mg" --argjson ms "$ms" --arg tag "$tag" '{
  schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
  manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $mg, size: $ms,
               platform: {architecture: "amd64", os: "linux"},
               annotations: {"org.opencontainers.image.ref.name": $tag}}]}' > "$out/index.json"
echo "$out: image sha256:$mg, layers $s1 + $s2 + $s3 bytes (gzip)" >&2
