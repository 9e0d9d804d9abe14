"""Where the tests find the Gateway API Inference Extension build (hack/epp.sh, `make epp`): the EPP
binary and the InferencePool CRD of the release pinned as GIE_VERSION."""

from __future__ import annotations

import os
from pathlib import Path

from vlmpool.pins import GIE_VERSION

INFERENCEPOOL_CRD = "inference.networking.k8s.io_inferencepools.yaml"


def gie_dir() -> Path:
    """$VLMPOOL_EPP_DIR (what `make test` passes), else hack/epp.sh's cache directory."""
    if env := os.environ.get("VLMPOOL_EPP_DIR"):
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("VLMPOOL_CACHE_DIR") or cache / "vlmpool") / "gie" / f"v{GIE_VERSION}"


def missing_reason() -> str | None:
    """Why the GIE build cannot be used (None: it can): the tests skip on it, or fail under CI."""
    d = gie_dir()
    if not (d / "bin" / "epp").is_file() or not (d / "crds" / INFERENCEPOOL_CRD).is_file():
        return f"no EPP build at {d}: run `make epp` (bash hack/epp.sh)"
    return None
