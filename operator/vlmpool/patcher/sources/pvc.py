"""pvc:// sources: pvc://<claim>/<path>, for air-gapped clusters. The patch Job mounts the claim read-only
at <SOURCES_ROOT>/<claim>; the patcher reads <pvc-root>/<claim>/<path> there as a local path (a
directory or an archive). No network: no egress guard."""

from __future__ import annotations

from pathlib import Path

from vlmpool.patcher.errors import PatchError
from vlmpool.patcher.sources.fetchlib import FetchedAdapter, local_path
from vlmpool.patcher.sources.scheme import SOURCES_ROOT, FetchRequest, JobSource, SourceScheme, well_formed

GRAMMAR = r"^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^/]+)+/?$"
FORM = "pvc://<claim>/<path>"


def parse(uri: str) -> tuple[str, list[str]] | None:
    """(claim, path segments) of a well-formed pvc:// URI ('.' segments dropped), else None: the
    grammar above (a DNS-label claim, a non-empty path of non-empty segments), no '..' segment."""
    if not well_formed(GRAMMAR, uri):
        return None
    claim, _, path = uri[len("pvc://"):].partition("/")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return claim, parts


def resolve(uri: str, pvc_root: Path) -> Path:
    if not well_formed(GRAMMAR, uri):
        raise PatchError("InvalidSource", f"a pvc:// source must be {FORM}, not {uri!r}")
    parsed = parse(uri)
    if parsed is None:
        raise PatchError("InvalidSource", f"{uri}: the path must be non-empty and must not contain '..'")
    claim, parts = parsed
    return Path(pvc_root) / claim / Path(*parts)


def fetch(req: FetchRequest) -> FetchedAdapter:
    return local_path(resolve(req.uri, req.pvc_root), req.uri, req.workdir, req.sha256, req.max_file_bytes)


def job_source(uri: str) -> JobSource | None:
    parsed = parse(uri)
    if parsed is None:
        return None
    claim = parsed[0]
    return JobSource(volume={"name": "source", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}},
                     mount={"name": "source", "mountPath": f"{SOURCES_ROOT}/{claim}", "readOnly": True},
                     options=(("pvc_root", SOURCES_ROOT),))


SCHEME = SourceScheme(
    name="pvc", prefix="pvc://", listed=4,
    form="pvc://claim/path (air-gapped; the claim is mounted read-only into the patch Job)",
    grammar=GRAMMAR, grammar_message=f"a pvc:// source must be {FORM} with a non-empty path",
    job_source=job_source, fetch=fetch,
)
