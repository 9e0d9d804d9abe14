#!/usr/bin/env bash
# `make kind-e2e`: the e2e suite (tests/e2e) on a kind cluster, with the operator installed by the Helm
# chart from locally built images and the vLLM simulator image in place of vLLM.
#
#   1. create a kind cluster (one node; the work directory is mounted into it at the same path),
#   2. build the images (images/build.sh) and load them into the node; inside the node the simulator
#      image is also tagged as the pools' default engine image (vllm/vllm-openai:<tag>), so pools run
#      it unchanged,
#   3. advertise 4 fake nvidia.com/gpu on the node (the pools request GPUs; the simulator needs none),
#   4. helm install charts/vlmpool (release vlmpool in vlmpool-system, a NetworkPolicy per pool),
#   5. run tests/e2e with VLMPOOL_E2E_KUBECONFIG (pods reached by kubectl port-forward / exec; pool
#      claims provisioned as hostPath volumes under the shared work directory).
#
# Needs: a Docker engine, kind, go (helm and kubectl come from hack/k8s-bins.sh, cached), the .venv.
# Env: KIND_CLUSTER (vlmpool-e2e), KIND_NODE_IMAGE (kind's default), WORK (/tmp/vlmpool-kind-e2e),
#      KEEP_CLUSTER=1 to leave the cluster running, PYTEST_ARGS, DOCKER (docker), KIND (kind).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "kind-e2e: $*" >&2; exit 1; }
log() { echo "kind-e2e: $*" >&2; }

# ---- preflight: fail fast and say why ---------------------------------------------------------------
export DOCKER=${DOCKER:-docker}
KIND=${KIND:-kind}
command -v "$DOCKER" >/dev/null 2>&1 || die "docker is not installed; the kind path needs a Docker engine (the local e2e suite needs none: make test)"
"$DOCKER" info >/dev/null 2>&1 || die "no Docker engine answers ('docker info' failed); start Docker or set DOCKER_HOST. The local e2e suite needs none: make test"
command -v "$KIND" >/dev/null 2>&1 || die "kind is not installed (https://kind.sigs.k8s.io: go install sigs.k8s.io/kind@latest)"
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || die "$PY not found: run make install"

CLUSTER=${KIND_CLUSTER:-vlmpool-e2e}
WORK=${WORK:-/tmp/vlmpool-kind-e2e}
NS=vlmpool-system
RELEASE=vlmpool
TAG=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/vlmpool/Chart.yaml)
ENGINE_IMAGE=$("$PY" -c 'from vlmpool.api.pool import DEFAULT_ENGINE_IMAGE as i; print(i)')

BIN=$(bash hack/k8s-bins.sh kubectl helm | tail -n1)
KUBECTL="$BIN/kubectl"; HELM="$BIN/helm"
mkdir -p "$WORK/volumes" "$WORK/pytest"
WORK=$(cd "$WORK" && pwd)
KUBECONFIG_FILE="$WORK/kubeconfig"

cleanup() {
  if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
    log "keeping cluster $CLUSTER (kubeconfig $KUBECONFIG_FILE); delete it with: $KIND delete cluster --name $CLUSTER"
  else
    "$KIND" delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

# ---- cluster ----------------------------------------------------------------------------------------
if ! "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  log "creating kind cluster $CLUSTER"
  cat > "$WORK/kind.yaml" <<YAML
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
    extraMounts:
      - hostPath: $WORK
        containerPath: $WORK
YAML
  "$KIND" create cluster --name "$CLUSTER" --config "$WORK/kind.yaml" --kubeconfig "$KUBECONFIG_FILE" \
    ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"} --wait 120s
else
  "$KIND" get kubeconfig --name "$CLUSTER" > "$KUBECONFIG_FILE"
fi
k() { "$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

# ---- images -----------------------------------------------------------------------------------------
log "building images (tag $TAG)"
mapfile -t IMAGES < <(TAG="$TAG" bash images/build.sh operator proxy patcher simulator)
SIM_IMAGE=$(printf '%s\n' "${IMAGES[@]}" | grep -- '-sim:')
for img in "${IMAGES[@]}"; do
  log "loading $img"
  "$KIND" load docker-image --name "$CLUSTER" "$img"
done
# The simulator answers as the engine: tag it as the pools' default engine image inside the nodes only
# (containerd's k8s.io namespace), never on this host where a real vLLM image may carry that name.
qualify() { case $1 in */*/*|*.*/*) echo "$1" ;; */*) echo "docker.io/$1" ;; *) echo "docker.io/library/$1" ;; esac; }
for node in $("$KIND" get nodes --name "$CLUSTER"); do
  log "tagging $SIM_IMAGE as $ENGINE_IMAGE on $node"
  "$DOCKER" exec "$node" ctr -n k8s.io images tag --force "$(qualify "$SIM_IMAGE")" "$(qualify "$ENGINE_IMAGE")" >/dev/null
done

# ---- node: fake GPUs; pool claims from the e2e provisioner, not kind's RWO-only local-path ----------
for node in $(k get nodes -o name); do
  k patch "$node" --subresource=status --type=json \
    -p '[{"op":"add","path":"/status/capacity/nvidia.com~1gpu","value":"4"}]'
done
k annotate storageclass standard storageclass.kubernetes.io/is-default-class- >/dev/null 2>&1 || true

# ---- the chart ----------------------------------------------------------------------------------------
k create namespace e2e --dry-run=client -o yaml | k apply -f -
log "helm install $RELEASE"
"$HELM" upgrade --install "$RELEASE" charts/vlmpool --kubeconfig "$KUBECONFIG_FILE" \
  --namespace "$NS" --create-namespace --wait --timeout 300s \
  --set operator.resyncSeconds=15 \
  --set "sources.allowHostPaths={$WORK/pytest}"

# ---- the suite ----------------------------------------------------------------------------------------
log "running tests/e2e against $CLUSTER"
VLMPOOL_E2E_KUBECONFIG="$KUBECONFIG_FILE" VLMPOOL_E2E_VOLUME_ROOT="$WORK/volumes" VLMPOOL_KUBECTL="$KUBECTL" \
  "$PY" -m pytest tests/e2e --basetemp="$WORK/pytest" ${PYTEST_ARGS:-}
