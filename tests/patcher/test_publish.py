"""Atomic publication: the publish runs in a subprocess that SIGKILLs itself at each step
(VLMPOOL_PATCH_CRASH_AT); after every crash only the old version or the complete new one is visible,
and the next run finishes the job and cleans the leftovers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from patcher_testlib import POOL_BASE, LockHolder, make_adapter, wait_for_line

from vlmpool.patcher import STEPS, PatchOptions, config_json, patch_adapter, patch_and_publish
from vlmpool.patcher.publish import REPORT_NAME, VERSION_FILES

FAM = "qwen2_vl"
REPO = Path(__file__).resolve().parents[2]

PUBLISH_SCRIPT = """
import json, sys
from pathlib import Path
from vlmpool.patcher.publish import publish
d = Path(sys.argv[3])
p = publish(sys.argv[1], sys.argv[2], (d / "version").read_text(), (d / "config").read_bytes(),
            (d / "weights").read_bytes(), json.loads((d / "report").read_text()), lock_timeout=60)
print(json.dumps({"version": p.version, "already": p.already_existed, "cleaned": p.cleaned}))
"""


def run_publish(root: Path, adapter: str, inputs: Path, crash_at: str | None = None,
                **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("VLMPOOL_PATCH_CRASH_AT", None)
    if crash_at:
        env["VLMPOOL_PATCH_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-c", PUBLISH_SCRIPT, str(root), adapter, str(inputs)],
                          env=env, capture_output=True, text=True, timeout=120, **popen)


@pytest.fixture(scope="module")
def versions(tmp_path_factory, lora_dirs):
    """An old version already published (the template volume) and the inputs of a new one."""
    root = tmp_path_factory.mktemp("pub")
    old = patch_and_publish(str(lora_dirs[FAM]), "ad", root / "template",
                            PatchOptions(family=FAM, pool_base=POOL_BASE[FAM]))
    other = make_adapter(FAM, root / "other-src", seed=7)
    new = patch_adapter(other, PatchOptions(family=FAM, pool_base=POOL_BASE[FAM]))
    inputs = root / "inputs"
    inputs.mkdir()
    (inputs / "version").write_text(new.version)
    (inputs / "config").write_bytes(config_json(new.config))
    (inputs / "weights").write_bytes(new.weights_bytes)
    (inputs / "report").write_text(json.dumps(new.report))
    assert old["version"] != new.version
    return {"template": root / "template", "old": old["version"], "new": new.version, "inputs": inputs}


def assert_consistent(root: Path, adapter: str, allowed: set[str | None]) -> str | None:
    """What a reader sees: `current` is absent or resolves to a complete version whose weights match its
    report; every directory in versions/ is complete. Returns the visible version."""
    adir = root / adapter
    for v in (adir / "versions").iterdir():
        assert all((v / n).is_file() for n in VERSION_FILES), f"partial version directory visible: {v}"
        report = json.loads((v / REPORT_NAME).read_text())
        digest = hashlib.sha256((v / "adapter_model.safetensors").read_bytes()).hexdigest()
        assert digest == report["patched_weights_digest"]
        assert report["version"] == v.name
    cur = adir / "current"
    visible = Path(os.readlink(cur)).name if cur.is_symlink() else None
    assert visible in allowed, f"current -> {visible}, expected one of {allowed}"
    if visible:
        assert os.readlink(cur) == f"versions/{visible}"  # relative: valid wherever the volume is mounted
        assert (cur / "adapter_config.json").is_file()
    return visible


@pytest.mark.parametrize("step", STEPS)
def test_crash_at_each_step_leaves_old_or_complete_new(step, versions, tmp_path):
    root = tmp_path / "vol"
    shutil.copytree(versions["template"], root, symlinks=True)
    old, new = versions["old"], versions["new"]

    res = run_publish(root, "ad", versions["inputs"], crash_at=step)
    assert res.returncode == -signal.SIGKILL, res.stderr
    visible = assert_consistent(root, "ad", {old, new})
    assert visible == (new if step in ("current-swapped", "done") else old)
    new_dir = root / "ad" / "versions" / new
    assert new_dir.exists() == (STEPS.index(step) >= STEPS.index("version-renamed"))
    leftovers = list((root / ".staging").iterdir()) + list((root / "ad").glob(".current.tmp-*"))
    if step in ("staging-created", "weights-partial", "files-written", "files-synced", "link-created"):
        assert leftovers, "the crash left something to clean"

    res = run_publish(root, "ad", versions["inputs"])
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["version"] == new and out["already"] == (STEPS.index(step) >= STEPS.index("version-renamed"))
    assert sorted(out["cleaned"]) == sorted(str(p) for p in leftovers)
    assert assert_consistent(root, "ad", {new}) == new
    assert list((root / ".staging").iterdir()) == []
    assert list((root / "ad").glob(".current.tmp-*")) == []
    assert sorted(p.name for p in (root / "ad" / "versions").iterdir()) == sorted([old, new])


@pytest.mark.parametrize("step", ["files-synced", "version-renamed", "link-created"])
def test_crash_during_first_publish(step, versions, tmp_path):
    root = tmp_path / "vol"
    res = run_publish(root, "fresh", versions["inputs"], crash_at=step)
    assert res.returncode == -signal.SIGKILL
    # nothing, or (after the rename) a complete unpointed version
    assert assert_consistent(root, "fresh", {None}) is None
    assert run_publish(root, "fresh", versions["inputs"]).returncode == 0
    assert assert_consistent(root, "fresh", {versions["new"]}) == versions["new"]


def test_rerun_is_a_no_op(versions, tmp_path):
    root = tmp_path / "vol"
    shutil.copytree(versions["template"], root, symlinks=True)
    vdir = root / "ad" / "versions" / versions["old"]
    before = {n: (vdir / n).stat().st_mtime_ns for n in VERSION_FILES}
    assert run_publish(root, "ad", versions["inputs"]).returncode == 0
    # switching back to the old version is a repoint only: its directory is untouched (immutable)
    from vlmpool.patcher.publish import publish

    d = versions["template"] / "ad" / "versions" / versions["old"]
    p = publish(root, "ad", versions["old"], (d / "adapter_config.json").read_bytes(),
                (d / "adapter_model.safetensors").read_bytes(), {})
    assert p.already_existed and p.previous == versions["new"]
    assert assert_consistent(root, "ad", {versions["old"]}) == versions["old"]
    assert {n: (vdir / n).stat().st_mtime_ns for n in VERSION_FILES} == before
    assert all((vdir / n).stat().st_mode & 0o222 == 0 for n in VERSION_FILES)


def test_lock_serialises_publishes(versions, tmp_path):
    """Another process holds the adapter's lock: the publish reaches the lock, waits, and goes on only
    once it is released."""
    root = tmp_path / "vol"
    shutil.copytree(versions["template"], root, symlinks=True)
    env = dict(os.environ)
    env.pop("VLMPOOL_PATCH_CRASH_AT", None)
    with LockHolder(root / "ad" / ".lock") as holder:
        proc = subprocess.Popen([sys.executable, "-c", PUBLISH_SCRIPT, str(root), "ad", str(versions["inputs"])],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_line(proc.stderr, "waiting for the publish lock")
        assert proc.poll() is None, "publish went ahead while another held the lock"
        assert not (root / "ad" / "versions" / versions["new"]).exists()
        assert list((root / ".staging").iterdir()) == []
        holder.release()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert assert_consistent(root, "ad", {versions["new"]}) == versions["new"]


def test_stale_staging_of_other_adapters(versions, tmp_path):
    root = tmp_path / "vol"
    shutil.copytree(versions["template"], root, symlinks=True)
    fresh = root / ".staging" / "other+abc+1234"
    stale = root / ".staging" / "gone+def+5678"
    for d in (fresh, stale):
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(b"x")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    assert run_publish(root, "ad", versions["inputs"]).returncode == 0
    assert fresh.exists() and not stale.exists()


def test_full_cli_crash_and_recover(lora_dirs, tmp_path):
    """The real `vlmpool patch` process killed between fsync and rename, then run again."""
    root = tmp_path / "vol"
    args = [sys.executable, "-m", "vlmpool.cli", "patch", "--source", str(lora_dirs[FAM]), "--adapter", "ad",
            "--root", str(root), "--pool-base", POOL_BASE[FAM], "--family", FAM,
            "--termination-log", str(tmp_path / "term")]
    env = dict(os.environ, VLMPOOL_PATCH_CRASH_AT="files-synced")
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == -signal.SIGKILL
    assert assert_consistent(root, "ad", {None}) is None and len(list((root / ".staging").iterdir())) == 1
    env.pop("VLMPOOL_PATCH_CRASH_AT")
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "term").read_text())
    assert assert_consistent(root, "ad", {summary["version"]}) == summary["version"]
    assert list((root / ".staging").iterdir()) == []
