"""The process kubelet's mount namespaces keep the host directories its containers run from.

A checkout under /tmp (a new user's `git clone` into /tmp) has its venv and sources below a path that
the pool's pods mount an emptyDir at; without the kept binds every container of `make test` failed with
"exec: .../.venv/bin/vlmpool: not found". These run the real launcher (unshare, bind mounts) as root.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlmpool.localcluster.runtime import Mount, ProcessSpec, host_paths, mounts_supported

ok, why = mounts_supported()
pytestmark = pytest.mark.skipif(not ok, reason=why)


def run(spec: ProcessSpec) -> subprocess.CompletedProcess:
    spec.prepare_mount_points()
    return subprocess.run(spec.launcher(), capture_output=True, text=True, timeout=60)


def test_an_empty_dir_over_the_interpreters_parent_hides_nothing_it_runs_from(tmp_path: Path) -> None:
    empty = tmp_path / "emptydir"
    empty.mkdir()
    cover = Path(sys.prefix).resolve().parent  # e.g. the checkout holding .venv, as /tmp holds it
    probe = "import vlmpool, os, sys, json; print(sys.prefix); print(json.dumps(sorted(os.listdir(sys.argv[1]))))"
    spec = ProcessSpec(argv=[sys.executable, "-c", probe, str(cover)], env={"PATH": "/usr/bin:/bin"},
                       mounts=[Mount(empty, str(cover))])
    res = run(spec)
    assert res.returncode == 0, res.stderr
    # The volume is there (only the kept directories' mount points in it), the host's files are not.
    entries = json.loads(res.stdout.splitlines()[1])
    expected = sorted({k.relative_to(cover).parts[0] for k in host_paths() if cover in k.parents})
    assert entries == expected, (entries, expected)


def test_without_the_kept_paths_the_container_cannot_start(tmp_path: Path) -> None:
    """The failure the kept paths exist for: the same mount with nothing kept hides the program."""
    checkout = tmp_path / "tmpdir" / "checkout"
    (checkout / "bin").mkdir(parents=True)
    tool = checkout / "bin" / "tool"
    tool.write_text("#!/bin/sh\necho ran\n")
    tool.chmod(0o755)
    empty = tmp_path / "emptydir"
    empty.mkdir()
    mounts = [Mount(empty, str(tmp_path / "tmpdir"))]
    kept = run(ProcessSpec(argv=[str(tool)], env={"PATH": "/usr/bin:/bin"}, mounts=mounts, keep=[checkout]))
    assert kept.returncode == 0 and kept.stdout.strip() == "ran", kept.stderr
    lost = run(ProcessSpec(argv=[str(tool)], env={"PATH": "/usr/bin:/bin"}, mounts=mounts, keep=[]))
    assert lost.returncode != 0 and ("not found" in lost.stderr or "No such file" in lost.stderr), lost
    # The kept directory is read-only inside the container: a pod cannot write into the checkout.
    write = run(ProcessSpec(argv=["sh", "-c", f"touch {checkout}/x"], env={"PATH": "/usr/bin:/bin"},
                            mounts=mounts, keep=[checkout]))
    assert write.returncode != 0 and "Read-only" in write.stderr, write
