#!/usr/bin/env bash
# Builds the container images of talaria-controller and talaria-node from this repository,
# without a Docker engine: static binaries (glibc, +crt-static) in OCI image layouts with a
# reproducible digest (fixed mtimes, owners, order, gzip -n; same sources → same digests).
#
# Usage: hack/images.sh [OUT_DIR]        (default ~/.cache/talaria/images)
#   IMAGE_TAG=0.1.0      tag in the layouts (default: the workspace version)
#   PUSH=host/prefix     also push to PUSH/talaria-controller:TAG and PUSH/talaria-node:TAG
#   CHECK=0              skip the self-check (push to a throwaway local registry, validate,
#                        compare digests, run each binary alone in an empty root)
#   BUILD_ONLY=1         build the static binaries only; print their directory
#   SKIP_BUILD=1         reuse the binaries of the last build
#
# DNS: both binaries resolve names with getaddrinfo. Static glibc (2.34+) has the "files" and
# "dns" NSS sources built in, so /etc/hosts and /etc/resolv.conf (which the kubelet mounts)
# work; NSS plugins (mdns, ldap, systemd-resolved's nss module) do not. /etc/nsswitch.conf in
# the image selects "files dns".
#
# Then: helm install ... --set controller.image.repository=REG/talaria-controller \
#   --set controller.image.digest=sha256:... (digests printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
. hack/env.sh
# A test that runs this script passes on cargo's per-package variables. ring's build script
# reruns when CARGO_MANIFEST_DIR changes, and everything above ring rebuilds with it: each
# caller (a node test, a cluster test, a shell) would rebuild for the previous one.
for v in $(compgen -e); do
  case $v in CARGO_MANIFEST_*|CARGO_PKG_*|CARGO_CRATE_NAME|CARGO_BIN_NAME|CARGO_PRIMARY_PACKAGE|CARGO_TARGET_TMPDIR) unset "$v" ;; esac
done
. hack/lib/oci-layout.sh

out=${1:-$HOME/.cache/talaria/images}
tag=${IMAGE_TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)}
target=x86_64-unknown-linux-gnu
# Own target dir: RUSTFLAGS differ from the test builds', sharing would rebuild both ways.
export CARGO_TARGET_DIR=${IMAGES_TARGET_DIR:-$HOME/.cache/talaria/target-images}
bins=(talaria-controller talaria-node)
log() { echo "[images] $*" >&2; }

[ "$(uname -m)" = x86_64 ] || { log "only linux/amd64 images are built (hack/lib/oci-layout.sh)"; exit 1; }
for t in jq gzip tar sha256sum readelf curl python3; do command -v "$t" >/dev/null || { log "$t missing: run hack/setup.sh"; exit 1; }; done

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  log "building ${bins[*]} (release, static)"
  # --target keeps RUSTFLAGS off build scripts and proc macros (they must stay dynamic);
  # path remapping keeps the build directory out of the binaries (reproducible anywhere).
  RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=$root=/talaria --remap-path-prefix=$HOME/.cargo=/cargo" \
    cargo build --release --locked --target "$target" \
      -p talaria-controller --bin talaria-controller -p talaria-node --bin talaria-node --bin talaria-fuse-holder \
      --config 'profile.release.strip="symbols"'
fi
bindir=$CARGO_TARGET_DIR/$target/release
for b in "${bins[@]}" talaria-fuse-holder; do
  [ -x "$bindir/$b" ] || { log "$bindir/$b missing (build first)"; exit 1; }
  if readelf -d "$bindir/$b" | grep -q '(NEEDED)'; then log "$b needs shared libraries"; exit 1; fi
done

# BUILD_ONLY=1: the static release binaries only (node/tests/survive.rs upgrades to them).
if [ "${BUILD_ONLY:-0}" = 1 ]; then echo "$bindir"; exit 0; fi

work=$(mktemp -d)
reg_pid=
cleanup() {
  [ -z "$reg_pid" ] || kill "$reg_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Base layer shared by both images: users, NSS, CA certificates, /tmp.
base=$work/base
mkdir -p "$base/etc/ssl/certs" "$base/tmp" "$base/usr/local/bin" "$base/var/lib/talaria-node" "$base/run/talaria"
chmod 1777 "$base/tmp"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$base/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$base/etc/group"
printf 'hosts: files dns\n' > "$base/etc/nsswitch.conf"
ca=/etc/ssl/certs/ca-certificates.crt
[ -s "$ca" ] || { log "$ca missing: apt-get install ca-certificates"; exit 1; }
cp "$ca" "$base/etc/ssl/certs/ca-certificates.crt"
chmod 0644 "$base"/etc/passwd "$base"/etc/group "$base"/etc/nsswitch.conf "$base"/etc/ssl/certs/ca-certificates.crt

config_of() { # BIN USER
  jq -cn --arg b "/usr/local/bin/$1" --arg u "$2" --arg v "$tag" '{
    Entrypoint: [$b], User: $u, WorkingDir: "/",
    Env: ["PATH=/usr/local/bin:/usr/bin:/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],
    Labels: {"org.opencontainers.image.title": ($b | split("/") | last),
             "org.opencontainers.image.version": $v,
             "org.opencontainers.image.source": "https://github.com/talaria-dev/talaria",
             "org.opencontainers.image.licenses": "Apache-2.0"}}'
}
user_of() { # the controller runs as nonroot; the node agent needs root for FUSE and mounts
  case $1 in talaria-controller) echo 65532:65532 ;; *) echo 0:0 ;; esac
}

mkdir -p "$out"
declare -A digest
for b in "${bins[@]}"; do
  app=$work/app-$b
  mkdir -p "$app/usr/local/bin"
  install -m 0755 "$bindir/$b" "$app/usr/local/bin/$b"
  # The node image also holds the agent's FUSE fd holder (its own DaemonSet, docs/survive.md).
  [ "$b" != talaria-node ] || install -m 0755 "$bindir/talaria-fuse-holder" "$app/usr/local/bin/talaria-fuse-holder"
  cfg=$(config_of "$b" "$(user_of "$b")")
  d1=$(oci_layout "$work/$b-1" "$tag" "$cfg" "$base" "$app")
  d2=$(oci_layout "$work/$b-2" "$tag" "$cfg" "$base" "$app")
  [ "$d1" = "$d2" ] || { log "$b: packing twice gave $d1 and $d2 (not reproducible)"; exit 1; }
  rm -rf "$out/$b" "$work/$b-2"
  mv "$work/$b-1" "$out/$b"
  digest[$b]=$d1
  log "$b: $out/$b $d1 ($(du -sh "$out/$b" | cut -f1))"
done

if [ "${CHECK:-1}" = 1 ]; then
  command -v crane >/dev/null || { log "crane missing: run hack/tools.sh crane"; exit 1; }
  command -v docker-registry >/dev/null || { log "docker-registry missing: run hack/setup.sh"; exit 1; }
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  cat > "$work/registry.yml" <<EOF
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: 127.0.0.1:$port
EOF
  docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
  reg_pid=$!
  for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$port/v2/" >/dev/null 2>&1 && break; sleep 0.1; done
  for b in "${bins[@]}"; do
    ref=127.0.0.1:$port/$b:$tag
    crane push --insecure "$out/$b" "$ref" >/dev/null
    crane validate --insecure --remote "$ref" >&2
    got=$(crane digest --insecure "$ref")
    [ "$got" = "${digest[$b]}" ] || { log "$b: registry digest $got != layout ${digest[$b]}"; exit 1; }
    # Pulled back and run alone: no shared library, no file of this machine.
    rootfs=$work/rootfs-$b
    mkdir -p "$rootfs"
    crane export --insecure "$ref" - | tar -x -C "$rootfs"
    if [ "$(id -u)" = 0 ]; then
      chroot --userspec="$(user_of "$b")" "$rootfs" "/usr/local/bin/$b" --version >&2
    else
      unshare -r chroot "$rootfs" "/usr/local/bin/$b" --version >&2
    fi
  done
  log "check passed: layouts pushed, validated, digests equal, binaries run in an empty root"
fi

if [ -n "${PUSH:-}" ]; then
  for b in "${bins[@]}"; do
    crane push "$out/$b" "$PUSH/$b:$tag" >/dev/null
    log "pushed $PUSH/$b:$tag@${digest[$b]}"
  done
fi
for b in "${bins[@]}"; do echo "$b ${digest[$b]}"; done
