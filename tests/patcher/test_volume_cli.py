"""`vlmpool patch prune` and `vlmpool patch cleanup`, the commands of the prune and cleanup Jobs, on real
directories, with the publish lock held by another process (the contention of two Jobs on one volume)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from patcher_testlib import LockHolder, wait_for_line

VLMPOOL = str(Path(sys.executable).parent / "vlmpool")


def volume(root: Path, adapter: str, versions: list[str], current: str | None) -> Path:
    adir = root / adapter
    for v in versions:
        (adir / "versions" / v).mkdir(parents=True)
        for name in ("adapter_config.json", "adapter_model.safetensors", "patch_report.json"):
            (adir / "versions" / v / name).write_text(v)
            os.chmod(adir / "versions" / v / name, 0o444)  # as published: read-only files
    if current:
        (adir / "current").symlink_to(f"versions/{current}")
    return adir


def names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def vlmpool(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([VLMPOOL, "patch", *args], capture_output=True, text=True, timeout=120, **kw)


def test_prune_keeps_the_kept_and_current_versions(tmp_path):
    adir = volume(tmp_path, "inv", ["v1", "v2", "v3", "v4"], current="v4")
    volume(tmp_path, "other", ["v1"], current="v1")
    (tmp_path / ".staging" / "inv+v9+abcd").mkdir(parents=True)  # a crashed publish of this adapter
    res = vlmpool("prune", "--root", str(tmp_path), "--adapter", "inv", "--keep", "v3")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"ok": True, "kept": ["v3", "v4"], "removed": ["v1", "v2"]}
    assert names(adir / "versions") == ["v3", "v4"] and names(tmp_path / "other" / "versions") == ["v1"]
    assert names(tmp_path / ".staging") == []
    res = vlmpool("prune", "--root", str(tmp_path), "--adapter", "missing", "--keep", "v1")
    assert res.returncode == 0 and json.loads(res.stdout)["removed"] == []


def test_prune_waits_for_a_publish_holding_the_lock(tmp_path):
    adir = volume(tmp_path, "inv", ["v1", "v2"], current="v2")
    with LockHolder(adir / ".lock") as holder:  # a publish of v3 in progress
        proc = subprocess.Popen([VLMPOOL, "patch", "prune", "--root", str(tmp_path), "--adapter", "inv",
                                 "--keep", "v2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_line(proc.stderr, "waiting for the publish lock")
        # The publish finishes under its lock: v3 appears and becomes current.
        (adir / "versions" / "v3").mkdir()
        (adir / "current").unlink()
        (adir / "current").symlink_to("versions/v3")
        assert proc.poll() is None and names(adir / "versions") == ["v1", "v2", "v3"]
        holder.release()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # The prune read `current` after the publish: the new version survives, the oldest goes.
    assert json.loads(out)["removed"] == ["v1"] and names(adir / "versions") == ["v2", "v3"]


def test_cleanup_waits_for_the_lock_and_removes_only_its_adapter(tmp_path):
    volume(tmp_path, "inv", ["v1", "v2"], current="v2")
    volume(tmp_path, "inv2", ["v1"], current="v1")  # a name with the same prefix
    for entry in ("inv+v3+0001", "inv2+v2+0002"):
        (tmp_path / ".staging" / entry).mkdir(parents=True)
    with LockHolder(tmp_path / "inv" / ".lock") as holder:
        proc = subprocess.Popen([VLMPOOL, "patch", "cleanup", "--root", str(tmp_path), "--adapter", "inv"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_line(proc.stderr, "waiting for the publish lock")
        assert proc.poll() is None and (tmp_path / "inv" / "versions" / "v1").is_dir()
        holder.release()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out)["ok"] and not (tmp_path / "inv").exists()
    assert names(tmp_path) == [".staging", "inv2"] and names(tmp_path / ".staging") == ["inv2+v2+0002"]
    assert vlmpool("cleanup", "--root", str(tmp_path), "--adapter", "inv").returncode == 0  # idempotent


def test_lock_held_too_long_and_bad_names_are_refusals(tmp_path):
    adir = volume(tmp_path, "inv", ["v1", "v2"], current="v2")
    with LockHolder(adir / ".lock"):
        res = vlmpool("prune", "--root", str(tmp_path), "--adapter", "inv", "--lock-timeout", "0.5")
    assert res.returncode == 1 and json.loads(res.stdout)["reason"] == "LockTimeout"
    assert names(adir / "versions") == ["v1", "v2"]
    for action in ("prune", "cleanup"):
        for bad in ("..", ".staging", "a/b", "UPPER"):
            res = vlmpool(action, "--root", str(tmp_path), "--adapter", bad)
            assert res.returncode == 1 and json.loads(res.stdout)["reason"] == "InvalidAdapterName", (action, bad)
    assert names(tmp_path) == ["inv"]
    res = vlmpool("--adapter", "inv")  # the patch itself still needs its arguments
    assert res.returncode == 2 and "--source" in res.stderr
