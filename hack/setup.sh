#!/usr/bin/env bash
# Installs what Talaria needs, idempotently. A second run on a machine that has everything
# only checks, in a few seconds.
#
# Usage: hack/setup.sh [all|demo]
#   all (default; hack/test.sh): everything the tests, benchmarks and images need
#     - Debian packages (registry, containerd, runc, FUSE, JDK, protoc, tools)
#     - clippy and rustfmt
#     - Go-only tools built from the Go module proxy into ~/.cache/talaria/tools (hack/tools.sh)
#   demo (hack/demo.sh): only what the main job needs, a minute or two on a fresh machine
#     - a C compiler for the CLI's build scripts (ring, zstd-sys build bundled C; no pkg-config
#       or protoc: protoc is for talaria-testenv, a dev-dependency)
#     - busybox-static, perl's library, openssl, jq, gzip, tar, coreutils for the demo image
#       (hack/demo-image.sh, hack/lib/oci-layout.sh)
# Both check that a Rust toolchain new enough for the workspace is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-all}
case "$mode" in
  all | demo) ;;
  *) echo "usage: hack/setup.sh [all|demo]" >&2; exit 2 ;;
esac

# What hack/demo.sh, hack/demo-image.sh and hack/lib/oci-layout.sh use, and what building
# talaria-cli needs (gcc + libc6-dev: the linker and ring's/zstd-sys's C; ca-certificates:
# cargo fetching crates).
DEMO_PKGS=(busybox-static perl openssl jq gzip tar coreutils ca-certificates gcc libc6-dev)
# The rest: integration tests, benchmarks, images (g++: libFuzzer, built by hack/fuzz.sh;
# containernetworking-plugins, iptables, conntrack: the one-node cluster's pod network and
# kube-proxy).
TEST_PKGS=(docker-registry containerd runc fuse3 libfuse3-dev pkg-config iproute2
           debootstrap strace attr openjdk-17-jdk-headless protobuf-compiler curl git pigz
           e2fsprogs bc g++ containernetworking-plugins iptables conntrack)

PKGS=("${DEMO_PKGS[@]}")
[ "$mode" = all ] && PKGS+=("${TEST_PKGS[@]}")

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ "$mode" = all ]; then
    # The Debian units start these as services; tests start their own instances.
    for s in containerd docker-registry; do $SUDO systemctl disable --now "$s" >/dev/null 2>&1 || true; done
  fi
fi

# Rust: rustup's default location is not on PATH in every shell.
if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
need=$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' Cargo.toml | head -n1)
have=$(rustc --version 2>/dev/null | sed -n 's/^rustc \([0-9][0-9.]*\).*/\1/p' || true)
if ! command -v cargo >/dev/null || [ -z "$have" ]; then
  echo "[setup] no Rust toolchain (cargo, rustc) on PATH: install one (Rust $need or newer), e.g." >&2
  echo "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal" >&2
  echo "  . \"\$HOME/.cargo/env\"" >&2
  echo "  (curl: apt-get install curl)" >&2
  exit 1
fi
if [ -n "$need" ] && [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -n1)" != "$need" ]; then
  echo "[setup] Rust $have is older than the workspace's rust-version $need: run \`rustup update\`" >&2
  exit 1
fi

if [ "$mode" = demo ]; then
  echo "[setup] ok (demo): Rust $have" >&2
  exit 0
fi

rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

bash hack/tools.sh

echo "[setup] ok: tools in ${TALARIA_TOOLS:-$HOME/.cache/talaria/tools}/bin" >&2
