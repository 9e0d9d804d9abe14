"""`vlmpool proxy` as a process: refuses to start without an admin token, serves, stops on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from vlmtest.proxy import BASE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**kw: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMPOOL_")}
    env.update(kw)
    return env


def test_refuses_to_start_without_admin_token():
    res = subprocess.run([sys.executable, "-m", "vlmpool", "proxy", "--port", "0", "--admin-port", "0"],
                         env=_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "admin token is required" in res.stderr


def test_bad_env_concurrency_is_refused():
    res = subprocess.run([sys.executable, "-m", "vlmpool", "proxy"], env=_env(
        VLMPOOL_ADMIN_TOKEN="t", VLMPOOL_PROXY_CONCURRENCY="lots"), capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "VLMPOOL_PROXY_CONCURRENCY" in res.stderr


def test_serves_with_token_file_and_env_and_stops_on_sigterm(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    port, admin_port = _free_port(), _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmpool", "proxy", "--host", "127.0.0.1", "--port", str(port),
         "--admin-port", str(admin_port)],
        env=_env(VLMPOOL_ADMIN_TOKEN_FILE=str(token_file), VLMPOOL_PROXY_CONCURRENCY="7",
                 VLMPOOL_ENGINE_URL="http://127.0.0.1:9", VLMPOOL_BASE_MODEL=BASE),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    assert r.status == 200
                    break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline
                time.sleep(0.1)
        req = urllib.request.Request(f"http://127.0.0.1:{admin_port}/admin/v1/state",
                                     headers={"Authorization": "Bearer file-token"})
        with urllib.request.urlopen(req, timeout=5) as r:
            state = json.loads(r.read())
        assert state["concurrency"] == 7 and state["applied"] is False
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
            assert json.loads(r.read())["data"][0]["id"] == BASE
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        lines = [json.loads(x) for x in proc.stderr.read().splitlines() if x.startswith("{")]
        assert any(x["msg"] == "proxy listening" for x in lines)
        assert any(x["msg"] == "request" and x["path"] == "/v1/models" and x["request_id"] for x in lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_default_concurrency_is_16_from_one_constant(monkeypatch):
    """Before the first push the limiter has the documented default: 16, the one declared in the settings
    table, which is also the VLMPool's spec.proxy.concurrency default (the CLI used to hard-code its own 16)."""
    import argparse

    from vlmpool.api.pool import ProxySpec
    from vlmpool.proxy import cli, settings

    for key in list(os.environ):
        if key.startswith("VLMPOOL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("VLMPOOL_ADMIN_TOKEN", "t")
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    assert cli.build_config(parser.parse_args([])).concurrency == settings.default("concurrency") == 16
    assert ProxySpec().concurrency == 16
    monkeypatch.setenv("VLMPOOL_PROXY_CONCURRENCY", "7")
    assert cli.build_config(parser.parse_args([])).concurrency == 7
    assert cli.build_config(parser.parse_args(["--concurrency", "9"])).concurrency == 9
