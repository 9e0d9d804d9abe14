"""`vlmpool dev` as a newcomer runs it: the quickstart comes up Ready on both pods, and the
printed Service address answers a chat request through the OpenAI SDK."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmpool.localcluster.runtime import mounts_supported

VLMPOOL = str(Path(sys.executable).with_name("vlmpool"))


@pytest.mark.skipif(not mounts_supported()[0], reason="the process kubelet needs root and unshare")
def test_vlmpool_dev_quickstart_serves_the_adapter(tmp_path):
    from openai import OpenAI

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([VLMPOOL, "dev", "--state-dir", str(tmp_path / "dev"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines: list[str] = []
    base = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"API is at (http://127\.0\.0\.1:\d+/v1)", line)
            if m:
                base = m.group(1)
                break
        assert base, "".join(lines[-40:])
        out = "".join(lines)
        assert "adapter Ready, LOADED 2/2" in out
        assert "an image chat through demo-adapter: HTTP 200, model demo-adapter" in out
        assert re.search(r"vlmadapter.vlmpool.io/demo-adapter\s+demo\s+Ready\s+[0-9a-f]+\s+2/2", out)
        client = OpenAI(base_url=base, api_key="unused", max_retries=0)
        ids = {m.id for m in client.models.list().data}
        assert {"qwen2.5-vl-3b", "demo-adapter"} <= ids
        answer = client.chat.completions.create(model="demo-adapter",
                                                messages=[{"role": "user", "content": "hello"}], max_tokens=8)
        assert answer.choices[0].message.content.startswith("sim:demo-adapter@")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rest, _ = proc.communicate()
    assert proc.returncode == 0, rest[-3000:]
    assert "stopping ..." in rest


def _processes_mentioning(text: str) -> list[str]:
    """Processes whose command line or environment names `text` (pod processes have their HOME
    under the state directory)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (d / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmd or text in env:
            found.append(f"{d.name}: {cmd[:200]}")
    return found


@pytest.mark.skipif(not mounts_supported()[0], reason="the process kubelet needs root and unshare")
def test_ctrl_c_while_waiting_stops_everything(tmp_path):
    state = tmp_path / "dev-interrupted"
    proc = subprocess.Popen([VLMPOOL, "dev", "--state-dir", str(state), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "waiting until the adapter is Ready" in line:
                break
        assert "waiting until the adapter is Ready" in "".join(lines), "".join(lines[-30:])
        assert _processes_mentioning(str(state)), "the cluster's processes should be running"
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, rest[-2000:]
    assert "stopping ..." in rest
    # etcd, kube-apiserver, kube-controller-manager, the operator and every pod process are gone.
    from vlmpool.testing.waiting import wait_for

    wait_for(lambda: not _processes_mentioning(str(state)), 30, what="no process of the cluster left")


@pytest.mark.skipif(not mounts_supported()[0], reason="the process kubelet needs root and unshare")
def test_gpus_flag_sets_the_node_capacity(tmp_path):
    """`vlmpool dev --gpus 3`: the node advertises 3 nvidia.com/gpu (it used to be 8 whatever the flag)."""
    import json

    state = tmp_path / "dev-gpus"
    proc = subprocess.Popen([VLMPOOL, "dev", "--state-dir", str(state), "--gpus", "3", "--no-quickstart"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 240
        kubeconfig = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"export KUBECONFIG=(\S+)", line)
            if m:
                kubeconfig = m.group(1)
                break
        assert kubeconfig, "".join(lines[-30:])
        from vlmpool.localcluster.controlplane import find_binaries

        out = subprocess.run([str(find_binaries() / "kubectl"), f"--kubeconfig={kubeconfig}", "get", "nodes",
                              "-o", "json"], capture_output=True, text=True, timeout=60, check=True).stdout
        caps = [n["status"]["capacity"].get("nvidia.com/gpu") for n in json.loads(out)["items"]]
        assert caps == ["3"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
