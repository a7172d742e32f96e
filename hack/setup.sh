#!/usr/bin/env bash
# Installs everything Talaria's tests and demo need, idempotently. A second run on a machine
# that has everything only checks, in a few seconds.
#   - Debian packages (registry, containerd, runc, FUSE, tools)
#   - Go-only tools built from the Go module proxy into ~/.cache/talaria/tools (hack/tools.sh)
#   - cargo-fuzz
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(docker-registry containerd runc fuse3 libfuse3-dev pkg-config iproute2 jq busybox-static
      debootstrap strace attr openjdk-17-jdk-headless protobuf-compiler curl ca-certificates git gzip pigz e2fsprogs bc openssl)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The Debian units start these as services; tests start their own instances.
  for s in containerd docker-registry; do $SUDO systemctl disable --now "$s" >/dev/null 2>&1 || true; done
fi

rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

bash hack/tools.sh

echo "[setup] ok: tools in ${TALARIA_TOOLS:-$HOME/.cache/talaria/tools}/bin" >&2
