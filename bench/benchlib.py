"""Measurement helpers shared by the benchmarks (imported by name: each bench runs as a script
from this directory)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from vlmpool.localcluster.controlplane import free_port  # noqa: F401 - one free-port helper for all


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation between order statistics; NaN when empty."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def wait_http(url: str, timeout: float = 60.0) -> None:
    """Poll `url` until it answers 200 (a server still starting), else RuntimeError with the last error."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception as e:  # noqa: BLE001 - still starting
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up: {last}")


def uptime() -> str:
    """`uptime`'s line (the load with each figure: the benches share the machine), or the load averages."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def http(method: str, url: str, body: Any = None, token: str | None = None, timeout: float = 120) -> tuple[int, str]:
    """One plain HTTP call (admin, metrics, load/unload): (status, body text), HTTP errors included."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # loopback only
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def vllm_python(given: str | None) -> str:
    """The pinned vLLM environment's python: `given`, $VLMPOOL_VLLM_PYTHON, or what hack/vllm-env.sh finds
    or builds."""
    if given:
        return given
    if os.environ.get("VLMPOOL_VLLM_PYTHON"):
        return os.environ["VLMPOOL_VLLM_PYTHON"]
    script = Path(__file__).resolve().parents[1] / "hack" / "vllm-env.sh"
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def stop_all(procs: list[subprocess.Popen]) -> None:
    """Terminate the bench's processes, newest first, and kill any still there after 15 s."""
    for p in reversed(procs):
        p.terminate()
    for p in reversed(procs):
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
