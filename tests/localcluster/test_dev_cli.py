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
