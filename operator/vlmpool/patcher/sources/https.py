"""https:// sources: an archive (.tar, .tar.gz, .tgz, .zip) or a directory URL ending in '/' from which
adapter_config.json and adapter_model.safetensors are fetched by name (urllib). An AUTHORIZATION
credential is sent as the Authorization header, to the URI's origin only; redirects never leave https."""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from vlmpool.patcher import egress
from vlmpool.patcher.errors import PatchError
from vlmpool.patcher.sources.fetchlib import (
    ARCHIVE_SUFFIXES,
    CONFIG_MAX_BYTES,
    CONFIG_NAME,
    WEIGHTS_NAME,
    FetchedAdapter,
    check_pin,
    copy_limited,
    extract_adapter_archive,
    human,
    is_pickle,
    sizes_of,
)
from vlmpool.patcher.sources.scheme import FetchRequest, SourceScheme


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to https, and sends the credential only back to the URI's origin."""

    def __init__(self, first: str, auth: str | None):
        self.first, self.auth = first, auth

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # urllib's signature
        same_origin = egress.check_redirect(self.first, newurl, _redact(self.first))
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and same_origin and self.auth:
            new.add_unredirected_header("Authorization", self.auth)
        return new


def _http_get(url: str, dst: Path, limit: int, label: str, timeout: float = 60.0) -> tuple[int, str]:
    where = _redact(url) if label in (url, _redact(url)) else f"{label}: {_redact(url)}"
    auth = os.environ.get("AUTHORIZATION") or None
    req = urllib.request.Request(url, headers={"User-Agent": "vlmpool-patch"})
    if auth:
        # An unredirected header is never copied onto a redirect; _Redirects puts it back for the
        # URI's own origin only.
        req.add_unredirected_header("Authorization", auth)
    opener = urllib.request.build_opener(_Redirects(url, auth))
    try:
        resp = opener.open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            raise PatchError("SourceNotFound", f"HTTP {e.code} for {where}") from None
        raise PatchError("SourceUnavailable", f"HTTP {e.code} {e.reason} for {where}") from None
    except (urllib.error.URLError, OSError) as e:
        raise PatchError("SourceUnavailable", f"cannot fetch {where}: {getattr(e, 'reason', e)}") from e
    with resp:
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > limit:
            raise PatchError("FileTooLarge", f"{where} is {human(int(length))}, over the limit of {human(limit)}")
        try:
            return copy_limited(resp, dst, limit, where)
        except (OSError, urllib.error.URLError) as e:
            raise PatchError("SourceUnavailable", f"download of {where} failed: {e}") from e


def _redact(url: str) -> str:
    p = urllib.parse.urlsplit(url)
    netloc = p.hostname or ""
    if p.port:
        netloc += f":{p.port}"
    return urllib.parse.urlunsplit((p.scheme, netloc, p.path, "", ""))


def fetch(req: FetchRequest) -> FetchedAdapter:
    uri, workdir, sha256, max_file_bytes = req.uri, req.workdir, req.sha256, req.max_file_bytes
    path = urllib.parse.urlsplit(uri).path
    if path.endswith("/"):
        adir = workdir / "adapter"
        adir.mkdir(parents=True, exist_ok=True)
        _http_get(uri + CONFIG_NAME, adir / CONFIG_NAME, CONFIG_MAX_BYTES, uri)
        # A pickle-only directory answers 404 for the safetensors: say why when a pickle is there.
        try:
            _, digest = _http_get(uri + WEIGHTS_NAME, adir / WEIGHTS_NAME, max_file_bytes, uri)
        except PatchError as e:
            if e.reason == "SourceNotFound":
                raise PatchError("MissingWeights", f"{_redact(uri)} has {CONFIG_NAME} but no {WEIGHTS_NAME} "
                                 "(pickle weights are never fetched)") from None
            raise
        check_pin(sha256, digest, f"{_redact(uri)}{WEIGHTS_NAME}")
        return FetchedAdapter(adir, uri, "https", digest, WEIGHTS_NAME, sha256 is not None, sizes_of(adir))
    lower = path.lower()
    if is_pickle(lower):
        raise PatchError("PickleWeights", f"{_redact(uri)} is a pickle file; only safetensors adapters are accepted")
    if not lower.endswith(ARCHIVE_SUFFIXES):
        raise PatchError("InvalidSource", f"an https source must be an archive ({', '.join(ARCHIVE_SUFFIXES)}) "
                         f"or a directory URL ending in '/', not {_redact(uri)}")
    archive = workdir / "download"
    _, digest = _http_get(uri, archive, max_file_bytes, _redact(uri))
    check_pin(sha256, digest, _redact(uri))
    adir, warnings = extract_adapter_archive(archive, workdir / "adapter", max_file_bytes, _redact(uri))
    archive.unlink()
    return FetchedAdapter(adir, uri, "https", digest, "archive", sha256 is not None, sizes_of(adir), warnings)


SCHEME = SourceScheme(
    name="https", prefix="https://", listed=1,
    form="https://host/path (a .tar/.tar.gz/.zip or a single-directory listing)",
    credential_keys=("AUTHORIZATION",), remote=True, fetch=fetch,
)
