"""The whole patch Job as one call: fetch, patch, publish, summarise."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vlmpool.patcher.errors import PatchError
from vlmpool.patcher.fetch import fetch_adapter
from vlmpool.patcher.options import DEFAULTS
from vlmpool.patcher.pipeline import PatchedAdapter, PatchOptions, config_json, patch_adapter
from vlmpool.patcher.publish import Published, publish, validate_adapter_name

SUMMARY_MAX_BYTES = 4096

def patch_and_publish(source: str, adapter: str, root: Path | str, opts: PatchOptions, *,
                      sha256: str | None = None, max_file_bytes: int = DEFAULTS["max_file_bytes"],
                      pvc_root: Path | str = DEFAULTS["pvc_root"], lock_timeout: float = DEFAULTS["lock_timeout"],
                      workdir: Path | str | None = None, tensor_io: str = DEFAULTS["tensor_io"],
                      fetch_timeout: float | None = DEFAULTS["fetch_timeout"]) -> dict[str, Any]:
    """Fetch ``source``, patch it, publish it under ``root``; return the success summary.
    Raises PatchError (with its stable reason) on any refusal."""
    validate_adapter_name(adapter)
    opts.validate()
    if not isinstance(max_file_bytes, int) or max_file_bytes < 1:
        raise PatchError("InvalidArguments", f"--max-file-bytes must be a positive integer, not {max_file_bytes!r}")
    if fetch_timeout is not None and not fetch_timeout > 0:
        raise PatchError("InvalidArguments", f"--fetch-timeout must be a positive number, not {fetch_timeout!r}")
    scratch = Path(tempfile.mkdtemp(prefix="vlmpool-patch-", dir=workdir))
    try:
        fetched = fetch_adapter(source, scratch, sha256=sha256, max_file_bytes=max_file_bytes, pvc_root=pvc_root,
                                fetch_timeout=fetch_timeout)
        patched = patch_adapter(fetched.dir, opts, source_uri=source, source_sha256=fetched.sha256,
                                fetch_warnings=fetched.warnings, tensor_io=tensor_io)
        patched.report["source"].update(
            {"sha256_of": fetched.sha256_of, "pinned": fetched.pinned, "sizes": fetched.sizes})
        published = publish(root, adapter, patched.version, config_json(patched.config), patched.weights_bytes,
                            patched.report, lock_timeout=lock_timeout)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return success_summary(adapter, patched, published)


def success_summary(adapter: str, patched: PatchedAdapter, published: Published) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ok": True,
        "adapter": adapter,
        "version": published.version,
        "path": str(published.path),
        "alreadyExisted": published.already_existed,
        "previousVersion": published.previous,
        "servedBaseCheck": patched.summary.base_check,
    }
    out.update(patched.summary.to_message())
    return out


def failure_summary(err: BaseException) -> dict[str, Any]:
    if isinstance(err, PatchError):
        return {"ok": False, "reason": err.reason, "message": err.message}
    return {"ok": False, "reason": "InternalError", "message": f"{type(err).__name__}: {err}"}


def fit_summary(summary: dict[str, Any], limit: int = SUMMARY_MAX_BYTES) -> bytes:
    """Serialise the summary in at most ``limit`` bytes (Kubernetes keeps 4 KiB of a termination
    message): long messages and warnings are shortened, then warnings dropped, counting what went."""
    s = dict(summary)

    def enc() -> bytes:
        return json.dumps(s, separators=(",", ":"), ensure_ascii=False).encode()

    data = enc()
    if len(data) <= limit:
        return data
    if isinstance(s.get("warnings"), list):
        s["warnings"] = [w if len(w) <= 240 else w[:237] + "..." for w in s["warnings"]]
        data = enc()
        while len(data) > limit and s["warnings"]:
            s["warnings"] = s["warnings"][:-1]
            s["warningsOmitted"] = s.get("warningsOmitted", 0) + 1
            data = enc()
    if len(data) > limit and isinstance(s.get("message"), str):
        over = len(data) - limit + 3
        msg = s["message"].encode()
        s["message"] = msg[: max(0, len(msg) - over)].decode(errors="ignore") + "..."
        data = enc()
    if len(data) > limit:  # pragma: no cover - only absurd field values
        s = {k: s[k] for k in ("ok", "reason", "version", "path") if k in s}
        s["truncated"] = True
        data = enc()
    return data


def write_termination_message(path: Path | str | None, summary: dict[str, Any]) -> None:
    if not path:
        return
    data = fit_summary(summary)
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError:  # a missing or read-only termination path must not change the exit code
        pass


def default_termination_log() -> str | None:
    return "/dev/termination-log" if os.path.exists("/dev/termination-log") else None
