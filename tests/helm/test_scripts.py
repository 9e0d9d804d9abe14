"""`make images` and `make kind-e2e` need Docker (and kind); without them they stop at once and say
which is missing instead of failing half-way. Here they are run with a missing and with a dead Docker."""

from __future__ import annotations

import os
import subprocess

import pytest
from helmtest import REPO


def _fake(tmp_path, name, rc):
    exe = tmp_path / name
    exe.write_text(f"#!/bin/sh\nexit {rc}\n")
    exe.chmod(0o755)
    return str(exe)


def _run(script, **env):
    return subprocess.run(["bash", str(REPO / script)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env}, cwd=REPO)


@pytest.mark.parametrize("script,prefix", [("images/build.sh", "images:"), ("hack/kind-e2e.sh", "kind-e2e:")])
def test_without_docker_the_scripts_stop_and_say_so(script, prefix, tmp_path):
    res = _run(script, DOCKER=str(tmp_path / "no-such-docker"))
    assert res.returncode == 1
    assert res.stderr.startswith(prefix) and "not installed" in res.stderr, res.stderr

    res = _run(script, DOCKER=_fake(tmp_path, "docker", 1))  # a client whose engine does not answer
    assert res.returncode == 1
    assert "no Docker engine answers" in res.stderr, res.stderr


def test_kind_e2e_without_kind_stops_and_says_so(tmp_path):
    res = _run("hack/kind-e2e.sh", DOCKER=_fake(tmp_path, "docker", 0), KIND=str(tmp_path / "no-such-kind"))
    assert res.returncode == 1
    assert "kind is not installed" in res.stderr, res.stderr


def test_images_build_refuses_an_unknown_image(tmp_path):
    res = subprocess.run(["bash", str(REPO / "images/build.sh"), "gpu-driver"], capture_output=True, text=True,
                         env={**os.environ, "DOCKER": _fake(tmp_path, "docker", 0)}, cwd=REPO, timeout=60)
    assert res.returncode == 1 and "unknown image 'gpu-driver'" in res.stderr, res.stderr
