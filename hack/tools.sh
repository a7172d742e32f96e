#!/usr/bin/env bash
# Builds the Go-only test tools (kube-apiserver, kube-controller-manager, kube-scheduler,
# kube-proxy, kubelet, etcd, helm, crane, cosign, containerd 2.x)
# from the Go module proxy into a versioned cache dir, once. A second run only checks that
# the binaries are there.
#
# Usage: hack/tools.sh [tool ...]     (default: all)
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

tools=("$@")
[ ${#tools[@]} -gt 0 ] || tools=(etcd kube helm crane cosign containerd2)
for t in "${tools[@]}"; do
  start=$(date +%s)
  "build_$t"
  end=$(date +%s)
  [ $((end - start)) -lt 2 ] || log "$t done in $((end - start))s"
done
