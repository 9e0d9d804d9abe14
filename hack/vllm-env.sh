#!/usr/bin/env bash
# Make (or reuse) the separate environment that `make test-vllm` runs vLLM's own LoRA loader in.
#   bash hack/vllm-env.sh [VENV]        (prints the venv's python on its last line)
# Default VENV: ~/.cache/vlmpool/vllm-<release>/venv ($VLMPOOL_VLLM_VENV overrides): like the Kubernetes
# binaries it depends on the pinned release only, so every checkout (and CI's fresh clone) shares it.
# The vLLM release is pinned in one place, VLLM_RELEASE in operator/vlmpool/sim/contract.py (the
# simulator follows it, the pool's default engine image runs it). To move it: docs/sim.md, "Moving the
# pinned vLLM release". The torch that release requires comes with it from PyPI.
# Caching: an existing venv with the pinned release is reused untouched (stamp file). The wheels are kept
# in a wheelhouse (default ~/.cache/vlmpool/wheels/vllm-<release>, VLMPOOL_VLLM_WHEELS overrides), filled
# by `pip download` (which skips files already there) and installed from with --no-index, so a rebuilt
# venv downloads nothing: the index here answers without cacheable headers, so pip's HTTP cache stays empty.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VERSION="$(sed -n 's/^VLLM_RELEASE = "\(.*\)"$/\1/p' operator/vlmpool/sim/contract.py)"
[[ -n "$VERSION" ]] || { echo "VLLM_RELEASE not found in operator/vlmpool/sim/contract.py" >&2; exit 1; }
VENV="${1:-${VLMPOOL_VLLM_VENV:-$HOME/.cache/vlmpool/vllm-$VERSION/venv}}"
WHEELS="${VLMPOOL_VLLM_WHEELS:-$HOME/.cache/vlmpool/wheels/vllm-$VERSION}"
STAMP="$VENV/.vllm-$VERSION"
# One build of this venv at a time (another checkout's, CI's prereqs): wait for it, then use what it made.
if [[ ! -f "$STAMP" ]]; then mkdir -p "$(dirname "$VENV")"; exec 9>"$VENV.lock"; flock 9; fi
if [[ ! -f "$STAMP" ]]; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2
  mkdir -p "$WHEELS"
  "$VENV/bin/pip" download -q -d "$WHEELS" "vllm==$VERSION" >&2
  "$VENV/bin/pip" install -q --no-index --find-links "$WHEELS" "vllm==$VERSION" >&2
  "$VENV/bin/python" -c "import vllm, sys; assert vllm.__version__ == sys.argv[1], vllm.__version__" "$VERSION" >&2
  touch "$STAMP"
fi
echo "$(cd "$VENV" && pwd)/bin/python"
