#!/usr/bin/env bash
# Build SeaweedFS's `weed` from the Go module proxy at the version pinned in versions.env, into a cache
# outside git:  ${TAUON_S3_CACHE:-~/.cache/tauon-s3}/<versions-hash>/bin/weed
# Its go.mod has replace directives, so `go install pkg@version` refuses it: the module is downloaded,
# copied into a writable work dir and built there. Prints the bin directory on stdout; a second run with
# the same versions does nothing. First build on 2 cores: ~7 minutes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck disable=SC1091
source "$here/versions.env"
key=$(sha256sum < "$here/versions.env" | cut -c1-12)
cache=${TAUON_S3_CACHE:-$HOME/.cache/tauon-s3}
bin=$cache/$key/bin
if [[ -x $bin/weed ]]; then echo "$bin"; exit 0; fi

log() { echo "[s3-build] $*" >&2; }
mkdir -p "$bin" "$cache/work"
export GOFLAGS=-buildvcs=false GOTOOLCHAIN=${GOTOOLCHAIN:-auto}
export GOMODCACHE=${GOMODCACHE:-$cache/gomod} GOCACHE=${GOCACHE_TAUON:-$cache/gocache}
log "seaweedfs $SEAWEEDFS_VERSION (first build on 2 cores takes a while)"
dir=$(cd "$cache/work" && go mod download -json "github.com/seaweedfs/seaweedfs@$SEAWEEDFS_VERSION" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
w=$cache/work/seaweedfs-$SEAWEEDFS_VERSION
rm -rf "$w"; cp -r "$dir" "$w"; chmod -R u+w "$w"
cd "$w"
go build -trimpath -ldflags "-s -w" -o "$bin/weed.tmp" ./weed
mv "$bin/weed.tmp" "$bin/weed"
rm -rf "$w"
log "done: $bin"
echo "$bin"
