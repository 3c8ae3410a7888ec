#!/usr/bin/env bash
# Build etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok and helm from the
# Go module proxy at the versions pinned in versions.env, into a cache outside git:
#   ${TAUON_K8S_CACHE:-~/.cache/tauon-k8s}/<versions-hash>/bin
# Prints the bin directory on stdout. A second run with the same versions does nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck disable=SC1091
source "$here/versions.env"
key=$(sha256sum < "$here/versions.env" | cut -c1-12)
cache=${TAUON_K8S_CACHE:-$HOME/.cache/tauon-k8s}
bin=$cache/$key/bin
want=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm)
missing=()
for b in "${want[@]}"; do [[ -x $bin/$b ]] || missing+=("$b"); done
if ((${#missing[@]} == 0)); then echo "$bin"; exit 0; fi

log() { echo "[build] $*" >&2; }
mkdir -p "$bin" "$cache/work"
export GOFLAGS=-buildvcs=false GOTOOLCHAIN=${GOTOOLCHAIN:-auto}
export GOMODCACHE=${GOMODCACHE:-$cache/gomod} GOCACHE=${GOCACHE_TAUON:-$cache/gocache}
minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
staging_ver=v0.${K8S_VERSION#v1.}

if [[ ! -x $bin/kube-apiserver || ! -x $bin/kube-controller-manager || ! -x $bin/kube-scheduler || ! -x $bin/kubectl ]]; then
  log "kubernetes $K8S_VERSION (first build on 2 cores takes a while)"
  w=$cache/work/kube-$K8S_VERSION; mkdir -p "$w"; cd "$w"
  # k8s.io/kubernetes replaces its staging modules with ./staging paths; mirror its replace block
  # with the published v0.N.P versions so the module builds outside its own repository.
  modfile=$(mktemp)
  curl -fsSL "${GOPROXY_URL:-https://proxy.golang.org}/k8s.io/kubernetes/@v/$K8S_VERSION.mod" -o "$modfile"
  {
    echo "module tauon.dev/k8s-tools"
    echo
    echo "go 1.24.0"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    sed -n '/^replace (/,/^)/p' "$modfile" | grep '=> ./staging' | awk -v v="$staging_ver" '{print "\t" $1 " => " $1 " " v}'
    echo ")"
  } > go.mod
  rm -f "$modfile"
  cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  go mod tidy -e >&2 2>&1 | tail -5 >&2 || true
  ld="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
  ld="$ld -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  go build -trimpath -ldflags "$ld" -o "$bin/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
fi

if [[ ! -x $bin/etcd ]]; then
  log "etcd $ETCD_VERSION"
  w=$cache/work/etcd-$ETCD_VERSION; mkdir -p "$w"; cd "$w"
  cat > go.mod <<MOD
module tauon.dev/etcd-tools

go 1.24.0

require (
	go.etcd.io/etcd/server/v3 $ETCD_VERSION
	go.etcd.io/etcd/api/v3 $ETCD_VERSION
	go.etcd.io/etcd/client/pkg/v3 $ETCD_VERSION
	go.etcd.io/etcd/client/v3 $ETCD_VERSION
	go.etcd.io/etcd/pkg/v3 $ETCD_VERSION
)
MOD
  cat > tools.go <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
  go mod tidy -e >&2 2>&1 | tail -5 >&2 || true
  go build -trimpath -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3
fi

if [[ ! -x $bin/kwok ]]; then
  log "kwok $KWOK_VERSION"
  GOBIN=$bin go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
fi
if [[ ! -x $bin/helm ]]; then
  log "helm $HELM_VERSION"
  GOBIN=$bin go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
fi
log "done: $bin"
echo "$bin"
