"""hack/node.sh (make node, test-node, node-down) says what is wrong before touching anything: an
unknown command, a test run without a node."""

from __future__ import annotations

import os
import subprocess

from helmtest import REPO


def _run(*args, **env):
    return subprocess.run(["bash", str(REPO / "hack" / "node.sh"), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env}, cwd=REPO)


def test_unknown_command_prints_the_usage():
    res = _run("sideways")
    assert res.returncode == 1
    assert res.stderr.startswith("node: usage:") and "up|down|env|test|dev|images" in res.stderr


def test_test_without_a_node_says_so(tmp_path):
    res = _run("test", NODE_STATE=str(tmp_path / "none"))
    assert res.returncode == 1
    assert "no node: run make node" in res.stderr, res.stderr
    assert not (tmp_path / "none").exists()
