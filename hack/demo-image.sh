#!/usr/bin/env bash
# Makes a small multi-layer OCI image layout from files of this machine, reproducibly:
#   layer 1: busybox-static as /bin with applet links, /etc/passwd, /etc/group, /etc/motd
#   layer 2: an "app" of real files (Perl's library: many small files, some large)
#   layer 3: overwrites /app/hello.txt, deletes /etc/motd (whiteout), adds /app/data (opaque dir)
# Usage: hack/demo-image.sh DIR [TAG]    (DIR is replaced)
set -euo pipefail
. "$(dirname "$0")/lib/oci-layout.sh"
out=${1:?usage: demo-image.sh DIR [TAG]}
tag=${2:-latest}
command -v busybox >/dev/null || { echo "busybox-static missing: run hack/setup.sh" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

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

cfg='{"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["cat /app/hello.txt"], "WorkingDir": "/app",
      "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]}'
digest=$(oci_layout "$out" "$tag" "$cfg" "$r1" "$r2" "$r3")
echo "$out: image $digest, $(du -sh "$out" | cut -f1)" >&2
