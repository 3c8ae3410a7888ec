#!/usr/bin/env bash
# Build CoreDNS from the Go module proxy at the version pinned in versions.env, with only the plugins
# the local cluster needs (bind, ready, errors, log, cache, kubernetes), into a cache outside git:
#   ${TAUON_DNS_CACHE:-~/.cache/tauon-dns}/<versions-hash>/bin/coredns
# Prints the bin directory on stdout. A second run with the same versions does nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck disable=SC1091
source "$here/versions.env"
key=$(sha256sum < "$here/versions.env" | cut -c1-12)
cache=${TAUON_DNS_CACHE:-$HOME/.cache/tauon-dns}
bin=$cache/$key/bin
if [[ -x $bin/coredns ]]; then echo "$bin"; exit 0; fi

log() { echo "[build-dns] $*" >&2; }
mkdir -p "$bin"
export GOFLAGS=-buildvcs=false GOTOOLCHAIN=${GOTOOLCHAIN:-auto}
export GOMODCACHE=${GOMODCACHE:-$cache/gomod} GOCACHE=${GOCACHE_TAUON:-$cache/gocache}
log "coredns $COREDNS_VERSION (plugins: $COREDNS_PLUGINS)"
w=$cache/work/coredns-$COREDNS_VERSION-$key; rm -rf "$w"; mkdir -p "$w"; cd "$w"
# A main of our own (CoreDNS' documented way to choose plugins at compile time): the upstream main
# links every plugin, with the cloud SDKs, which costs many minutes on 2 cores for nothing used here.
{
  echo "module tauon.dev/dns-tools"
  echo
  echo "go 1.24.0"
  echo
  echo "require github.com/coredns/coredns $COREDNS_VERSION"
} > go.mod
{
  echo "package main"
  echo
  echo "import ("
  echo '	"github.com/coredns/coredns/core/dnsserver"'
  echo '	"github.com/coredns/coredns/coremain"'
  for p in $COREDNS_PLUGINS; do echo "	_ \"github.com/coredns/coredns/plugin/$p\""; done
  echo ")"
  echo
  printf 'var directives = []string{'
  sep=""
  for p in $COREDNS_PLUGINS; do printf '%s"%s"' "$sep" "$p"; sep=", "; done
  echo "}"
  echo
  echo "func init() { dnsserver.Directives = directives }"
  echo
  echo "func main() { coremain.Run() }"
} > main.go
go mod tidy >&2
go build -trimpath -ldflags "-s -w" -o "$bin/coredns" .
log "done: $bin"
echo "$bin"
