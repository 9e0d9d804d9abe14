"""Helpers of the patcher tests (imported by conftest.py and the tests): tiny Qwen VL models and
real PEFT adapters made from them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vlmpool.patcher import PatchError, PatchOptions, patch_and_publish
from vlmpool.testing.adapters import (  # noqa: F401 - re-exported for the patcher tests
    FAMILIES,
    LANG_TARGETS,
    POOL_BASE,
    VISION_TARGETS,
    make_adapter,
    tiny_model,
)


def refuse(src, tmp_path, reason, match, adapter="ad", **kw):
    """Patch `src` expecting the refusal `reason` with a message matching `match`, and nothing published
    (family qwen2_vl unless given)."""
    kw.setdefault("family", "qwen2_vl")
    kw.setdefault("pool_base", POOL_BASE["qwen2_vl"])
    with pytest.raises(PatchError) as ei:
        patch_and_publish(str(src), adapter, tmp_path / "vol", PatchOptions(**kw))
    assert ei.value.reason == reason, ei.value
    assert re.search(match, ei.value.message), ei.value.message
    versions = tmp_path / "vol" / adapter / "versions"
    assert not versions.exists() or not any(versions.iterdir())
    return ei.value


def edit_config(adapter_dir: Path, **changes) -> None:
    p = adapter_dir / "adapter_config.json"
    data = json.loads(p.read_text())
    for k, v in changes.items():
        if v is _DELETE:
            data.pop(k, None)
        else:
            data[k] = v
    p.write_text(json.dumps(data, indent=2))


_DELETE = object()


def load_peft(family: str, adapter_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(tiny_model(family), str(adapter_dir)).eval()


HOLD_SCRIPT = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()  # until the test closes our stdin
fcntl.flock(fd, fcntl.LOCK_UN)
"""


class LockHolder:
    """Another process holding an adapter's publish lock (flock) until :meth:`release`: the contention
    a second Job (a publish, a prune) meets on a shared volume."""

    def __init__(self, lock_path: Path):
        import subprocess
        import sys

        lock_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(lock_path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=30)

    def __enter__(self) -> LockHolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def wait_for_line(stream, needle: str, timeout: float = 60.0) -> str:
    """Read lines from a subprocess pipe until one contains `needle` (AssertionError at the deadline)."""
    import selectors
    import time

    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        if sel.select(timeout=max(0.0, deadline - time.monotonic())):
            line = stream.readline()
            if not line:
                break
            seen.append(line)
            if needle in line:
                return line
    raise AssertionError(f"no line with {needle!r} within {timeout:g} s; got {seen!r}")
