#!/usr/bin/env bash
# Builds the Go-only test tools (kube-apiserver, kube-controller-manager, kube-scheduler,
# kube-proxy, kubelet, etcd, helm, crane, cosign, containerd 2.x)
# from the Go module proxy into a versioned cache dir, once. A second run only checks that
# the binaries are there.
#
# Usage: hack/tools.sh [tool ...]     (default: the test tools: etcd kube helm crane cosign
#                                      containerd2)
# Benchmark-only peers (issue 25), built only when named, never by default:
#   soci     soci + soci-snapshotter-grpc (AWS SOCI snapshotter), cgo (zlib: zlib1g-dev)
#   stargz   talaria-stargz-grpc + talaria-estargz-convert: small mains in hack/peers/stargz
#            over the stargz-snapshotter library module (its cmd module is not on the proxy)
# Prints nothing but progress on stderr; the binaries end up in $TALARIA_TOOLS/bin.
set -euo pipefail

KUBE_VERSION=${KUBE_VERSION:-v1.35.4}
ETCD_VERSION=${ETCD_VERSION:-v3.5.35}
HELM_VERSION=${HELM_VERSION:-v3.21.4}
CRANE_VERSION=${CRANE_VERSION:-v0.22.1}
# Checks that Talaria's artifact signatures are what `cosign verify --key` accepts.
COSIGN_VERSION=${COSIGN_VERSION:-v2.6.5}
# The current containerd LTS line, next to Debian's 1.6 (runc comes from Debian for both).
CONTAINERD2_VERSION=${CONTAINERD2_VERSION:-v2.3.0}
# Benchmark peers (issue 25). SOCI's cmd module has no release tag on the proxy: the pseudo
# version is the v0.16.1 commit.
SOCI_VERSION=${SOCI_VERSION:-v0.16.1}
SOCI_CMD_VERSION=${SOCI_CMD_VERSION:-v0.0.0-20260930233240-61147fe7c929}
STARGZ_VERSION=${STARGZ_VERSION:-v0.19.1}

CACHE=${TALARIA_CACHE:-$HOME/.cache/talaria}
TOOLS=${TALARIA_TOOLS:-$CACHE/tools}
BIN=$TOOLS/bin
mkdir -p "$BIN"
export GOFLAGS=-mod=mod
export GOTOOLCHAIN=local
export CGO_ENABLED=0

log() { echo "[tools] $*" >&2; }

# have NAME VERSION: true when the versioned binary exists and the stable link points at it.
have() {
  [ -x "$TOOLS/$1-$2/$1" ] || return 1
  ln -sfn "$TOOLS/$1-$2/$1" "$BIN/$1"
}

build_kube() {
  local v=$KUBE_VERSION
  local cmds=(kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubelet)
  local missing=()
  for c in "${cmds[@]}"; do have "$c" "$v" || missing+=("$c"); done
  [ ${#missing[@]} -gt 0 ] || return 0
  log "building ${missing[*]} $v (takes a while)"
  local minor=${v#v1.}; minor=${minor%%.*}
  local staging="v0.${v#v1.}"
  local w; w=$(mktemp -d)
  # k8s.io/kubernetes points its staging modules at ./staging with replace directives, which
  # go install ignores; a wrapper module replaces each with its published v0.X version.
  local mod; mod=$(curl -fsS "${GOPROXY_URL:-https://proxy.golang.org}/k8s.io/kubernetes/@v/$v.mod")
  {
    echo "module talaria.dev/kubetools"
    echo "go 1.25"
    echo "require k8s.io/kubernetes $v"
    echo "$mod" | sed -n 's#^\s*\(k8s\.io/[a-z0-9-]*\) => ./staging/src/.*#replace \1 => \1 '"$staging"'#p'
  } > "$w/go.mod"
  cat > "$w/tools.go" <<'EOF'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
EOF
  local ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    ld="$ld -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  (
    cd "$w"
    go mod tidy -e >/dev/null 2>&1 || true
    go get k8s.io/kubernetes@"$v" >&2
    # kubelet too builds without cgo (Kubernetes links it dynamically only for optional
    # cadvisor probes); CGO_ENABLED=0 is set above.
    for c in "${missing[@]}"; do
      mkdir -p "$TOOLS/$c-$v"
      go build -trimpath -ldflags "$ld" -o "$TOOLS/$c-$v/$c.tmp" "k8s.io/kubernetes/cmd/$c"
      mv "$TOOLS/$c-$v/$c.tmp" "$TOOLS/$c-$v/$c"
    done
  )
  rm -rf "$w"
  for c in "${cmds[@]}"; do have "$c" "$v"; done
}

build_etcd() {
  local v=$ETCD_VERSION
  if have etcd "$v"; then return 0; fi
  log "building etcd $v"
  local w; w=$(mktemp -d)
  # The server module has replace directives too; a wrapper main requires it at the release tag.
  cat > "$w/go.mod" <<EOF
module talaria.dev/etcdtool
go 1.23
require go.etcd.io/etcd/server/v3 $v
EOF
  cat > "$w/main.go" <<'EOF'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  (
    cd "$w"
    go mod tidy >&2
    mkdir -p "$TOOLS/etcd-$v"
    go build -trimpath -ldflags "-s -w" -o "$TOOLS/etcd-$v/etcd.tmp" .
    mv "$TOOLS/etcd-$v/etcd.tmp" "$TOOLS/etcd-$v/etcd"
  )
  rm -rf "$w"
  have etcd "$v"
}

# go_install NAME VERSION PKG [LDFLAGS]
go_install() {
  local name=$1 v=$2 pkg=$3 extra=${4:-}
  if have "$name" "$v"; then return 0; fi
  log "building $name $v"
  mkdir -p "$TOOLS/$name-$v"
  GOBIN="$TOOLS/$name-$v" go install -trimpath -ldflags "-s -w $extra" "$pkg@$v"
  have "$name" "$v"
}

# helm reports its version (and checks Kubernetes compatibility) from ldflags.
build_helm() {
  go_install helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm \
    "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
}
build_crane() { go_install crane "$CRANE_VERSION" github.com/google/go-containerregistry/cmd/crane; }
# containerd 2.x and its runc shim from the same module, linked as containerd2 and
# containerd2-shim-runc-v2 so Debian's 1.6 stays `containerd` (testenv puts the versioned dir
# first on the 2.x daemon's PATH, so it starts its own shim).
build_containerd2() {
  local v=$CONTAINERD2_VERSION d=$TOOLS/containerd2-$CONTAINERD2_VERSION
  if [ -x "$d/containerd" ] && [ -x "$d/containerd-shim-runc-v2" ]; then
    ln -sfn "$d/containerd" "$BIN/containerd2"
    return 0
  fi
  log "building containerd $v"
  mkdir -p "$d"
  local m=github.com/containerd/containerd/v2
  GOBIN="$d" go install -trimpath -tags "no_btrfs no_devmapper no_zfs" \
    -ldflags "-s -w -X $m/version.Version=$v -X $m/version.Revision=talaria" \
    "$m/cmd/containerd@$v" "$m/cmd/containerd-shim-runc-v2@$v"
  ln -sfn "$d/containerd" "$BIN/containerd2"
}
build_cosign() { go_install cosign "$COSIGN_VERSION" github.com/sigstore/cosign/v2/cmd/cosign; }

# SOCI: its cmd module requires the library module at v0.0.0-local with a replace to ../, which
# go install refuses; a wrapper module requires both (the library at the release tag), repeats
# the library's own replaces (replaces of dependencies do not apply) and builds both commands.
# cgo: the ztoc code links zlib statically (-l:libz.a, from Debian's zlib1g-dev).
build_soci() {
  local v=$SOCI_VERSION cmds=(soci soci-snapshotter-grpc) missing=() c
  for c in "${cmds[@]}"; do have "$c" "$v" || missing+=("$c"); done
  [ ${#missing[@]} -gt 0 ] || return 0
  [ -f /usr/lib/x86_64-linux-gnu/libz.a ] || [ -f /usr/lib/libz.a ] || [ -f /usr/lib64/libz.a ] \
    || ensure_debs zlib1g-dev
  log "building ${missing[*]} $v (cmd module $SOCI_CMD_VERSION)"
  local w; w=$(mktemp -d)
  local m=github.com/awslabs/soci-snapshotter
  cat > "$w/go.mod" <<EOF
module talaria.dev/socitools
go 1.26
require (
	$m $v
	$m/cmd $SOCI_CMD_VERSION
)
replace $m v0.0.0-local => $m $v
replace github.com/hashicorp/golang-lru => github.com/ktock/golang-lru v0.5.5-0.20211029085301-ec551be6f75c
replace cyphar.com/go-pathrs => github.com/cyphar/libpathrs/go-pathrs v0.2.1
EOF
  cat > "$w/tools.go" <<'EOF'
//go:build tools

package tools

import (
	_ "github.com/awslabs/soci-snapshotter/cmd/soci"
	_ "github.com/awslabs/soci-snapshotter/cmd/soci-snapshotter-grpc"
)
EOF
  (
    cd "$w"
    export CGO_ENABLED=1
    go mod tidy >&2
    for c in "${missing[@]}"; do
      mkdir -p "$TOOLS/$c-$v"
      go build -trimpath -ldflags "-s -w -X $m/version.Version=$v -X $m/version.Revision=$SOCI_CMD_VERSION" \
        -o "$TOOLS/$c-$v/$c.tmp" "$m/cmd/$c"
      mv "$TOOLS/$c-$v/$c.tmp" "$TOOLS/$c-$v/$c"
    done
  )
  rm -rf "$w"
  for c in "${cmds[@]}"; do have "$c" "$v"; done
}

# stargz-snapshotter: only the library module is on the proxy (its cmd module, with
# containerd-stargz-grpc and ctr-remote, is not), so two small mains of ours in hack/peers/stargz
# use it: talaria-stargz-grpc (the proxy snapshotter gRPC server) and talaria-estargz-convert
# (eStargz conversion, optionally with prioritized files). Keyed by the library version and the
# sources' hash, so an edit rebuilds.
build_stargz() {
  local src; src=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/peers/stargz
  local key; key=$(cat "$src/go.mod" "$src"/*/*.go | sha256sum | cut -c1-8)
  local v=$STARGZ_VERSION-$key cmds=(talaria-stargz-grpc talaria-estargz-convert) missing=() c
  for c in "${cmds[@]}"; do have "$c" "$v" || missing+=("$c"); done
  [ ${#missing[@]} -gt 0 ] || return 0
  log "building ${missing[*]} (stargz-snapshotter $STARGZ_VERSION)"
  local w; w=$(mktemp -d)
  cp -r "$src/." "$w/"
  (
    cd "$w"
    go mod edit -require "github.com/containerd/stargz-snapshotter@$STARGZ_VERSION"
    go mod tidy >&2
    for c in "${missing[@]}"; do
      mkdir -p "$TOOLS/$c-$v"
      go build -trimpath -ldflags "-s -w -X main.stargzVersion=$STARGZ_VERSION" \
        -o "$TOOLS/$c-$v/$c.tmp" "./$c"
      mv "$TOOLS/$c-$v/$c.tmp" "$TOOLS/$c-$v/$c"
    done
  )
  rm -rf "$w"
  for c in "${cmds[@]}"; do have "$c" "$v"; done
}

# ensure_debs PKG...: installs Debian packages that are missing (as hack/setup.sh does).
ensure_debs() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  log "apt-get install ${missing[*]}"
  local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

tools=("$@")
[ ${#tools[@]} -gt 0 ] || tools=(etcd kube helm crane cosign containerd2)
for t in "${tools[@]}"; do
  start=$(date +%s)
  "build_$t"
  end=$(date +%s)
  [ $((end - start)) -lt 2 ] || log "$t done in $((end - start))s"
done
