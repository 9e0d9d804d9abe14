#!/usr/bin/env bash
# Obtain the control-plane binaries the tests and `vlmpool dev` run:
#   etcd, kube-apiserver, kube-controller-manager, kubectl, helm, and the real node's kubelet,
#   kube-proxy and kube-scheduler (hack/node.sh).
# Order of preference for each binary:
#   1. $KUBEBUILDER_ASSETS/<bin> if the version matches (kubectl: also PATH, within one minor),
#   2. the cache  ${XDG_CACHE_HOME:-~/.cache}/vlmpool/k8s/<k8s-version>/bin/<bin>,
#   3. a build from its Go module through the Go module proxy into that cache.
# PATH is deliberately not trusted for the server binaries: a kube-apiserver of another minor
# release would silently change what the tests prove. A second run costs nothing.
# Prints the bin directory on the last line of stdout.
# The versions are pinned in operator/vlmpool/pins.py (read here with the system python3: no venv needed);
# $VLMPOOL_K8S_VERSION, $VLMPOOL_ETCD_VERSION and $VLMPOOL_HELM_VERSION override them.
set -euo pipefail

PINS="$(cd "$(dirname "$0")/.." && pwd)/operator/vlmpool/pins.py"
K8S_VERSION="${VLMPOOL_K8S_VERSION:-$(python3 "$PINS" K8S_VERSION)}"
ETCD_VERSION="${VLMPOOL_ETCD_VERSION:-$(python3 "$PINS" ETCD_VERSION)}"
HELM_VERSION="${VLMPOOL_HELM_VERSION:-$(python3 "$PINS" HELM_VERSION)}"
CACHE="${VLMPOOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vlmpool}"
BIN="$CACHE/k8s/v$K8S_VERSION/bin"
WORK="$CACHE/k8s/v$K8S_VERSION/src"
mkdir -p "$BIN" "$WORK"

log() { echo "[k8s-bins] $*" >&2; }

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
export GOPATH="${GOPATH:-$HOME/go}"

want=("$@")
# By default everything the suites use, the real node's kubelet, kube-proxy and kube-scheduler included:
# one `go build` of all the Kubernetes commands shares its compiled packages (cold: the node's three add
# minutes, not the 15 a separate build would take).
[ ${#want[@]} -gt 0 ] || want=(etcd kube-apiserver kube-controller-manager kubectl helm kubelet kube-proxy kube-scheduler)

have() { [ -x "$BIN/$1" ] && [ -f "$BIN/.$1.ok" ]; }

from_assets() {
  local b=$1
  [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/$b" ] || return 1
  case $b in
    kube-apiserver|kube-controller-manager|kubectl)
      "$KUBEBUILDER_ASSETS/$b" --version 2>/dev/null | grep -q "v$K8S_VERSION" || { [ "$b" = kubectl ] && "$KUBEBUILDER_ASSETS/$b" version --client 2>/dev/null | grep -q "v$K8S_VERSION"; } || return 1 ;;
    etcd) "$KUBEBUILDER_ASSETS/$b" --version 2>/dev/null | grep -q "etcd Version: 3\.\(5\.\(1[3-9]\|[2-9][0-9]\)\|[6-9]\)" || return 1 ;;
    *) return 1 ;;
  esac
  ln -sf "$KUBEBUILDER_ASSETS/$b" "$BIN/$b"; touch "$BIN/.$b.ok"; log "$b: using $KUBEBUILDER_ASSETS/$b"
}

build_k8s() {
  local d="$WORK/kubernetes" minor
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  local staging="v0.${K8S_VERSION#1.}"
  mkdir -p "$d"; cd "$d"
  if [ ! -f go.mod ]; then
    go mod init vlmpool.local/k8sbins >/dev/null 2>&1
    go mod edit -require="k8s.io/kubernetes@v$K8S_VERSION"
    for m in api apiextensions-apiserver apimachinery apiserver cli-runtime client-go \
      cloud-provider cluster-bootstrap code-generator component-base component-helpers \
      controller-manager cri-api cri-client csi-translation-lib dynamic-resource-allocation \
      endpointslice externaljwt kms kube-aggregator kube-controller-manager kube-proxy \
      kube-scheduler kubectl kubelet metrics mount-utils pod-security-admission \
      sample-apiserver sample-cli-plugin sample-controller; do
      go mod edit -replace="k8s.io/$m=k8s.io/$m@$staging"
    done
    if [ "$minor" -ge 36 ]; then
      for m in cri-streaming streaming; do go mod edit -replace="k8s.io/$m=k8s.io/$m@$staging"; done
    fi
  fi
  log "resolving k8s.io/kubernetes v$K8S_VERSION (first run downloads ~1 GB of modules)"
  local gets=() b0
  for b0 in "$@"; do gets+=("k8s.io/kubernetes/cmd/$b0@v$K8S_VERSION"); done
  go get "${gets[@]}" >&2
  local ld="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean -X $pkg.gitCommit=vlmpool-build"
  done
  local targets=() b
  for b in "$@"; do targets+=("k8s.io/kubernetes/cmd/$b"); done
  log "building ${*} (cold: 10-25 min on 2 cores)"
  go build -trimpath -ldflags "$ld" -o "$BIN/" "${targets[@]}" >&2
  for b in "$@"; do touch "$BIN/.$b.ok"; done
}

build_etcd() {
  local d="$WORK/etcd"; mkdir -p "$d"; cd "$d"
  [ -f go.mod ] || go mod init vlmpool.local/etcdbin >/dev/null 2>&1
  log "building etcd v$ETCD_VERSION"
  go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >&2
  go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3 >&2
  touch "$BIN/.etcd.ok"
}

build_helm() {
  local d="$WORK/helm"; mkdir -p "$d"; cd "$d"
  [ -f go.mod ] || go mod init vlmpool.local/helmbin >/dev/null 2>&1
  local minor; minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  log "building helm v$HELM_VERSION"
  go get "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION" >&2
  # Helm's default capabilities claim Kubernetes 1.20 unless set at link time.
  go build -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION \
    -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor" \
    -o "$BIN/helm" helm.sh/helm/v3/cmd/helm >&2
  touch "$BIN/.helm.ok"
}

# kubectl from PATH is fine when it is within the supported skew (one minor) of the server.
from_path_kubectl() {
  local k minor want_minor
  k=$(command -v kubectl 2>/dev/null) || return 1
  minor=$("$k" version --client -o json 2>/dev/null | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | head -n1)
  want_minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  [ -n "$minor" ] && [ $((minor - want_minor)) -le 1 ] && [ $((want_minor - minor)) -le 1 ] || return 1
  ln -sf "$k" "$BIN/kubectl"; touch "$BIN/.kubectl.ok"; log "kubectl: using $k (minor $minor)"
}

# One build of this cache at a time (another checkout's, CI's prereqs): wait for it, then use what it made.
for b in "${want[@]}"; do
  have "$b" || { exec 9>"$CACHE/k8s/v$K8S_VERSION/.lock"; flock 9; break; }
done
k8s_missing=()
for b in "${want[@]}"; do
  have "$b" && continue
  from_assets "$b" && continue
  [ "$b" = kubectl ] && from_path_kubectl && continue
  case $b in
    kube-apiserver|kube-controller-manager|kubectl|kubelet|kube-proxy|kube-scheduler) k8s_missing+=("$b") ;;
    etcd) build_etcd ;;
    helm) build_helm ;;
    *) log "unknown binary $b"; exit 2 ;;
  esac
done
[ ${#k8s_missing[@]} -eq 0 ] || build_k8s "${k8s_missing[@]}"
for b in "${want[@]}"; do have "$b" || { log "missing $b after build"; exit 1; }; done
echo "$BIN"
