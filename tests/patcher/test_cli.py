"""`vlmpool patch` as the patch Job runs it: exit codes, stdout and the termination message."""

from __future__ import annotations

import json

import pytest
from patcher_testlib import POOL_BASE

from vlmpool.cli import main
from vlmpool.patcher import fit_summary
from vlmpool.patcher.api import SUMMARY_MAX_BYTES

FAM = "qwen2_vl"
SUMMARY_FIELDS = {"tensorsKept", "tensorsRemapped", "tensorsDropped", "rank", "doraPolicy", "doraError",
                  "declaredBase", "poolBase", "baseCheck", "warnings"}


def argv(src, tmp_path, *extra):
    return ["patch", "--source", str(src), "--adapter", "my-adapter", "--root", str(tmp_path / "vol"),
            "--pool-base", POOL_BASE[FAM], "--family", FAM, "--termination-log", str(tmp_path / "term"), *extra]


def test_success_then_no_op(lora_dirs, tmp_path, capsys):
    assert main(argv(lora_dirs[FAM], tmp_path, "--served-base", "qwen2-vl")) == 0
    term = json.loads((tmp_path / "term").read_text())
    assert json.loads(capsys.readouterr().out) == term
    assert term["ok"] is True and SUMMARY_FIELDS <= set(term)
    assert term["path"] == str(tmp_path / "vol" / "my-adapter" / "versions" / term["version"])
    assert len(term["version"]) == 16 and term["servedBaseCheck"] == "match" and term["alreadyExisted"] is False
    assert term["tensorsKept"] == 28 and term["tensorsDropped"] == 4 and term["tensorsRemapped"] == 0
    assert term["doraPolicy"] == "none" and term["rank"] == 8 and term["poolBase"] == POOL_BASE[FAM]
    # the summary's fields fit the CRD status model
    from vlmpool.api.adapter import PatchSummary

    PatchSummary.model_validate({k: term[k] for k in SUMMARY_FIELDS})

    assert main(argv(lora_dirs[FAM], tmp_path, "--served-base", "qwen2-vl")) == 0
    again = json.loads((tmp_path / "term").read_text())
    assert again["version"] == term["version"] and again["alreadyExisted"] is True


def test_options_change_the_version(dora_dir, base_dirs, tmp_path):
    assert main(argv(dora_dir, tmp_path, "--dora-policy", "strip")) == 0
    strip = json.loads((tmp_path / "term").read_text())
    assert main(argv(dora_dir, tmp_path, "--dora-policy", "svd", "--svd-rank", "8",
                     "--base-weights", str(base_dirs[FAM]), "--device", "cpu")) == 0
    svd = json.loads((tmp_path / "term").read_text())
    assert strip["version"] != svd["version"] and svd["previousVersion"] == strip["version"]
    assert svd["doraPolicy"] == "svd" and 0 < svd["doraError"] < 1


def test_refusal_exit_code_and_message(dora_dir, tmp_path, capsys):
    assert main(argv(dora_dir, tmp_path)) == 1
    term = json.loads((tmp_path / "term").read_text())
    assert term["ok"] is False and term["reason"] == "DoraRejected" and "policy is reject" in term["message"]
    err = capsys.readouterr().err
    assert "refused (DoraRejected)" in err


def test_missing_source(tmp_path):
    assert main(argv(tmp_path / "nope", tmp_path)) == 1
    term = json.loads((tmp_path / "term").read_text())
    assert term == {"ok": False, "reason": "SourceNotFound",
                    "message": f"{tmp_path / 'nope'}: no such file or directory"}


def test_bad_arguments_exit_2(lora_dirs, tmp_path):
    with pytest.raises(SystemExit) as ei:
        main(argv(lora_dirs[FAM], tmp_path, "--dora-policy", "merge"))
    assert ei.value.code == 2
    with pytest.raises(SystemExit):
        main(argv(lora_dirs[FAM], tmp_path, "--max-rank", "0"))


def test_summary_fits_4kib():
    s = {"ok": True, "version": "0" * 16, "path": "/x", "warnings": [f"warning {i} " + "w" * 500 for i in range(40)]}
    data = fit_summary(s)
    assert len(data) <= SUMMARY_MAX_BYTES
    out = json.loads(data)
    assert out["version"] == "0" * 16 and out["warningsOmitted"] > 0 and all(len(w) <= 240 for w in out["warnings"])
    f = fit_summary({"ok": False, "reason": "X", "message": "m" * 10_000})
    assert len(f) <= SUMMARY_MAX_BYTES and json.loads(f)["message"].endswith("...")


@pytest.mark.parametrize("value", ["0", "-5", "inf", "soon"])
def test_fetch_timeout_must_be_a_positive_number(lora_dirs, tmp_path, value):
    with pytest.raises(SystemExit) as ei:
        main(argv(lora_dirs[FAM], tmp_path, "--fetch-timeout", value))
    assert ei.value.code == 2


def test_fetch_timeout_reaches_the_fetch(tmp_path, capsys, monkeypatch):
    """`--fetch-timeout` is the fetch's deadline: a server that accepts the connection and never
    answers (the TLS handshake waits) ends the patch as FetchTimeout after about that long."""
    import socket
    import time

    monkeypatch.setenv("VLMPOOL_SOURCE_ALLOW", "127.0.0.1")

    with socket.socket() as srv:  # accepts connections (the backlog), never answers
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        t0 = time.monotonic()
        code = main(argv(f"https://127.0.0.1:{srv.getsockname()[1]}/a.tgz", tmp_path, "--fetch-timeout", "1"))
        took = time.monotonic() - t0
    term = json.loads((tmp_path / "term").read_text())
    assert code == 1 and term["reason"] == "FetchTimeout", term
    assert 0.5 < took < 30, took
