"""bench/scale.py at a tiny size (2 adapters x 2 pods: a full-capacity roll needs a second pod to serve),
so the benchmark does not rot: every phase runs
against the local cluster and reports its figures, and the cluster is gone afterwards. Not a timed
test: the figures are only checked for shape and for the counts that must hold at any size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlmpool.localcluster.runtime import mounts_supported

REPO = Path(__file__).resolve().parents[2]


def _our_processes(marker: str) -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd:
                out.append(f"{pid}: {cmd[:200]}")
    return out


@pytest.mark.slow
def test_scale_bench_tiny_run(tmp_path):
    ok, why = mounts_supported()
    if not ok:
        pytest.skip(f"process kubelet unavailable here: {why}")
    results = tmp_path / "scale.jsonl"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "scale.py"), "--adapters", "2", "--pods", "2", "--timeout", "240",
         "--lora-load-ms", "20", "--load-threads", "2", "--results", str(results), "--label", "test",
         "--plot", str(tmp_path / "img")],
        capture_output=True, text=True, timeout=540, cwd=tmp_path, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(results.read_text().splitlines()[-1])
    phases = {p["phase"]: p for p in r["phases"]}
    assert list(phases) == ["apply_all", "operator_restart", "engine_restart", "swap", "roll"]
    assert not any(p.get("timed_out") for p in phases.values())
    # counts that hold at any size: one patch Job per adapter, N x M loads, nothing redone on a restart
    assert phases["apply_all"]["jobs_created"] == 2 and phases["apply_all"]["loads"] == 4
    assert phases["operator_restart"]["jobs_created"] == 0 and phases["operator_restart"]["loads"] == 0
    assert phases["engine_restart"]["loads"] == phases["engine_restart"]["expected_loads"] == 4
    assert phases["swap"]["failed_requests"] == 0 and phases["swap"]["requests"]["ok"] > 0
    # the full pool (2 pods, 2 GPUs) rolls one pod at a time, drained, with no failed request
    assert phases["roll"]["failed_requests"] == 0 and phases["roll"]["requests"]["ok"] > 0, phases["roll"]
    assert phases["apply_all"]["apiserver_writes_by_resource"].get("jobs") == 2
    assert r["proxy_rss_mib_with_all_adapters"] > 0 and phases["apply_all"]["operator"]["peak_rss_mib"] > 0
    assert "2 adapters x 2 pods" in proc.stdout and "failed requests" in proc.stdout
    assert (tmp_path / "img" / "scale-time.png").stat().st_size > 0
    assert (tmp_path / "img" / "scale-writes.png").stat().st_size > 0
    # torn down: no control plane or operator (their command lines name tmp_path), and no proxy or engine
    # (theirs name the pod's address) of this run left
    assert _our_processes(str(tmp_path)) == []
    for ip in r["pod_ips"]:
        assert _our_processes(f"http://{ip}:") == [] and _our_processes(f"--host {ip} ") == []
