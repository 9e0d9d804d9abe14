#!/usr/bin/env bash
# Obtain the Gateway API Inference Extension's endpoint picker (EPP) and its InferencePool CRD, the
# real router the routing tests drive (tests/routing). The release is pinned in ONE place, with every
# other pin: GIE_VERSION in operator/vlmpool/pins.py ($VLMPOOL_GIE_VERSION overrides it). It is the last
# GIE tag that still has cmd/epp.
# `go install …/cmd/epp@vX` does not work through an allow-listing module proxy (it reads @v/list),
# so the EPP is built in a small wrapper module that requires the release and carries the release's own
# go.mod requirements and go.sum (dependency hashes checked against upstream's; only the GIE module
# itself is exempted from the checksum database, which may be unreachable).
# Cache: ${XDG_CACHE_HOME:-~/.cache}/vlmpool/gie/v<version>/{bin/epp,crds/}; a second run costs
# nothing; concurrent runs serialise on a lock. Prints that directory on the last line of stdout.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
GIE_VERSION="${VLMPOOL_GIE_VERSION:-$(python3 "$HERE/../operator/vlmpool/pins.py" GIE_VERSION)}"
[ -n "$GIE_VERSION" ] || { echo "[epp] no GIE_VERSION pinned in operator/vlmpool/pins.py" >&2; exit 2; }
CACHE="${VLMPOOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vlmpool}"
DIR="$CACHE/gie/v$GIE_VERSION"
MOD=sigs.k8s.io/gateway-api-inference-extension
CRD=inference.networking.k8s.io_inferencepools.yaml
mkdir -p "$DIR/bin" "$DIR/crds" "$DIR/src"
log() { echo "[epp] $*" >&2; }

done_already() { [ -x "$DIR/bin/epp" ] && [ -f "$DIR/bin/.epp.ok" ] && [ -f "$DIR/crds/$CRD" ]; }

exec 9>"$DIR/.lock"
flock 9
if ! done_already; then
  export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod GONOSUMDB="$MOD"
  export GOPATH="${GOPATH:-$HOME/go}"
  cd "$DIR/src"
  log "downloading $MOD v$GIE_VERSION"
  src=$(go mod download -json "$MOD@v$GIE_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -d "$src" ] || { log "module $MOD@v$GIE_VERSION not downloaded"; exit 1; }
  install -m 0644 "$src/config/crd/bases/$CRD" "$DIR/crds/$CRD"
  if [ ! -f go.mod ]; then
    cp "$src/go.mod" go.mod.tmp && cp "$src/go.sum" go.sum && chmod u+w go.mod.tmp go.sum
    mv go.mod.tmp go.mod
    go mod edit -module=vlmpool.local/eppbin -require="$MOD@v$GIE_VERSION"
  fi
  log "building $MOD/cmd/epp v$GIE_VERSION (cold: ~4 min on 2 cores, 1.2 GB peak)"
  t0=$(date +%s)
  go build -p 2 -trimpath -ldflags "-s -w" -o "$DIR/bin/epp" "$MOD/cmd/epp" >&2
  touch "$DIR/bin/.epp.ok"
  log "built in $(( $(date +%s) - t0 )) s"
fi
echo "$DIR"
