"""Fetch only an adapter's own files from its source, safely: the dispatch over the source schemes of
vlmpool.patcher.sources (https://, hf://, s3://, pvc://, file://, or a bare local path).

Only ``adapter_config.json`` and ``adapter_model.safetensors`` are ever read or downloaded (see
vlmpool.patcher.sources.fetchlib). A remote scheme's fetch runs under vlmpool.patcher.egress: no
internal addresses unless allow-listed, no redirect off https, credentials only to the URI's origin,
and a whole-fetch deadline.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from vlmpool.patcher import egress
from vlmpool.patcher.errors import PatchError
from vlmpool.patcher.options import DEFAULT_FETCH_TIMEOUT, DEFAULT_MAX_FILE_BYTES
from vlmpool.patcher.sources import registry
from vlmpool.patcher.sources.fetchlib import FetchedAdapter, local_path
from vlmpool.patcher.sources.scheme import SOURCES_ROOT, FetchRequest

__all__ = ["DEFAULT_FETCH_TIMEOUT", "DEFAULT_MAX_FILE_BYTES", "FetchedAdapter", "fetch_adapter"]


def fetch_adapter(uri: str, workdir: Path, *, sha256: str | None = None,
                  max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, pvc_root: Path | str = SOURCES_ROOT,
                  allow: Iterable[str] | None = None,
                  fetch_timeout: float | None = DEFAULT_FETCH_TIMEOUT) -> FetchedAdapter:
    """Make the adapter's two files readable under a directory; workdir is scratch space (the caller
    removes it). Raises PatchError with a stable reason on any refusal. Remote sources connect only
    where vlmpool.patcher.egress allows: `allow` (default: $VLMPOOL_SOURCE_ALLOW) lists the
    internal hosts/CIDRs an admin allowed; a remote fetch ends at `fetch_timeout` seconds
    (FetchTimeout), however slowly its bytes arrive."""
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise PatchError("InvalidArguments", f"--sha256 must be 64 hex digits, not {sha256!r}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    scheme = registry.scheme_for(uri)
    if scheme is None:
        if "://" in uri:
            raise PatchError("InvalidSource", f"unsupported source scheme in {uri!r}; use a path, "
                             f"{', '.join(registry.prefixes())}")
        return local_path(Path(uri), uri, workdir, sha256, max_file_bytes)
    req = FetchRequest(uri, workdir, sha256, max_file_bytes, Path(pvc_root))
    if not scheme.remote:
        return scheme.fetch(req)
    policy = egress.EgressPolicy.parse(allow) if allow is not None else egress.EgressPolicy.from_env()
    with egress.guarded(policy, fetch_timeout) as guard:
        try:
            fetched = scheme.fetch(req)
        except Exception:
            if guard.refusal is not None:  # what a client library wrapped is the real reason
                raise guard.refusal from None
            raise
        guard.check()
        return fetched
