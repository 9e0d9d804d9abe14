"""file:// sources: file:///<absolute path> on the node (a directory or an archive), for tests and
`vlmpool dev`. Off unless a cluster admin named node directories (operator --allow-host-path): the
patch Job mounts the path read-only as a hostPath volume. No network: no egress guard. A pin mismatch
never reveals the digest of a node file."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from vlmpool.patcher.errors import PatchError
from vlmpool.patcher.sources.fetchlib import FetchedAdapter, local_path
from vlmpool.patcher.sources.scheme import FetchRequest, JobSource, SourceScheme


def refusal(uri: str, allowed_dirs: list[str] | tuple[str, ...]) -> str | None:
    """Why a file:// source may not become a hostPath volume, or None. file:// is off unless a cluster
    admin named node directories (operator --allow-host-path); the path must be absolute, plain (no
    '.', '..' or empty segments) and equal to or under one of them. The message names only the
    setting, never anything about the node's files."""
    if not uri.startswith("file://"):
        return None
    if not allowed_dirs:
        return ("file:// sources are disabled on this cluster (a cluster admin enables them for named node "
                "directories with the operator's --allow-host-path)")
    p = urllib.parse.urlsplit(uri)
    path = p.path
    parts = path.split("/")[1:]
    if p.netloc not in ("", "localhost") or not path.startswith("/") or p.query or p.fragment or "%" in path \
            or any(seg in ("", ".", "..") for seg in parts):
        return f"{uri!r} is not a plain file:///<absolute path> (no '.', '..', '//', escapes or query)"
    for d in allowed_dirs:
        base = "/" + d.strip("/")
        if base == "/" or path == base or path.startswith(base + "/"):
            return None
    return f"{path} is not under a node directory this cluster allows for file:// sources ({', '.join(allowed_dirs)})"


def fetch(req: FetchRequest) -> FetchedAdapter:
    p = urllib.parse.urlsplit(req.uri)
    if p.netloc not in ("", "localhost"):
        raise PatchError("InvalidSource", f"a file:// source must be file:///<absolute path>, not {req.uri!r}")
    return local_path(Path(urllib.parse.unquote(p.path)), req.uri, req.workdir, req.sha256, req.max_file_bytes,
                      reveal=False)


def job_source(uri: str) -> JobSource | None:
    path = urllib.parse.urlsplit(uri).path
    return JobSource(volume={"name": "source", "hostPath": {"path": path}},
                     mount={"name": "source", "mountPath": path, "readOnly": True})


SCHEME = SourceScheme(
    name="file", prefix="file://", listed=5, head="file:///",
    form="file:///path (a path on the node, for tests and `vlmpool dev`)",
    job_source=job_source, fetch=fetch,
)
