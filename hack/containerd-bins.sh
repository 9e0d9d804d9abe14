#!/usr/bin/env bash
# containerd 2.x for the real node (hack/node.sh), built from its Go module through the Go module proxy:
#   bash hack/containerd-bins.sh        (prints the bin directory on its last line)
# Builds containerd, containerd-shim-runc-v2 and ctr into their own cache directory
#   ${VLMPOOL_CACHE_DIR:-~/.cache/vlmpool}/containerd/v<version>/bin
# under a lock (flock), so two callers never build the same cache at once; a second run costs nothing.
# Debian's containerd 1.6 is end of life, and Kubernetes 1.35 is the last release to support 1.x.
# Static (CGO_ENABLED=0) and without the btrfs snapshotter (it needs C headers); runc stays Debian's.
# The version: CONTAINERD_VERSION in operator/vlmpool/pins.py ($VLMPOOL_CONTAINERD_VERSION overrides it).
set -euo pipefail

VERSION="${VLMPOOL_CONTAINERD_VERSION:-$(python3 "$(dirname "$0")/../operator/vlmpool/pins.py" CONTAINERD_VERSION)}"
CACHE="${VLMPOOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vlmpool}"
DIR="$CACHE/containerd/v$VERSION"
BIN="$DIR/bin"
mkdir -p "$BIN" "$DIR/src"
log() { echo "[containerd-bins] $*" >&2; }

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
export GOPATH="${GOPATH:-$HOME/go}"

have() { [ -x "$BIN/containerd" ] && [ -x "$BIN/containerd-shim-runc-v2" ] && [ -x "$BIN/ctr" ] && [ -f "$BIN/.ok" ]; }

if ! have; then
  exec 9>"$DIR/.lock"
  flock 9  # another build of this cache is under way: wait for it, then use what it made
  if ! have; then
    cd "$DIR/src"
    [ -f go.mod ] || go mod init vlmpool.local/containerdbins >/dev/null 2>&1
    mod=github.com/containerd/containerd/v2
    log "resolving $mod v$VERSION"
    go get "$mod/cmd/containerd@v$VERSION" "$mod/cmd/containerd-shim-runc-v2@v$VERSION" "$mod/cmd/ctr@v$VERSION" >&2
    ld="-s -w -X $mod/version.Version=v$VERSION -X $mod/version.Revision=vlmpool-build"
    log "building containerd v$VERSION (cold: a few minutes on 2 cores)"
    go build -trimpath -tags no_btrfs -ldflags "$ld" -o "$BIN/" \
      "$mod/cmd/containerd" "$mod/cmd/containerd-shim-runc-v2" "$mod/cmd/ctr" >&2
    touch "$BIN/.ok"
  fi
fi
echo "$BIN"
