"""Measurement helpers shared by the benchmarks (imported by name: each bench runs as a script
from this directory)."""

from __future__ import annotations

import os
import time
import urllib.request

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
