"""bench/proxy.py runs end to end (a short run): a bench that no longer imports (it once named an error
class the proxy's client had dropped) is found by the suite, not by the next person who measures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "proxy.py"


def test_the_proxy_bench_runs_and_reports_no_errors():
    res = subprocess.run([sys.executable, str(BENCH), "--levels", "1", "--duration", "1", "--warmup", "0.3",
                          "--repeat", "1"], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    (level,) = report["levels"]
    assert level["errors"] == 0 and level["direct_rps"] > 0 and level["proxy_rps"] > 0, level
