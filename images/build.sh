#!/usr/bin/env bash
# Build the vlmpool images (operator, proxy, patcher, simulator) from images/Dockerfile.
#   images/build.sh                 build all four, tagged $REGISTRY/<name>:$TAG
#   images/build.sh operator proxy  build some
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
    *) die "unknown image '$1' (operator, proxy, patcher, patcher-dora, simulator)" ;;
  esac
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(operator proxy simulator patcher)
for t in "${targets[@]}"; do
  ref=$(image_name "$t")
  echo "images: building $t -> $ref" >&2
  # shellcheck disable=SC2086
  DOCKER_BUILDKIT=1 "$DOCKER" build -f "$DOCKERFILE" --target "$t" -t "$ref" ${BUILD_ARGS:-} . >&2
  echo "$ref"
done
