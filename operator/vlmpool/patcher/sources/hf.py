"""hf:// sources: hf://<org>/<repo>[@<revision>] on the Hugging Face Hub (huggingface_hub; HF_ENDPOINT
and HF_TOKEN honoured), held to the egress rules of vlmpool.patcher.egress (no downgrade from https,
the token only to the endpoint's origin, no internal addresses unless allow-listed)."""

from __future__ import annotations

import contextlib
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlmpool.patcher import egress
from vlmpool.patcher.errors import PatchError
from vlmpool.patcher.sources.fetchlib import (
    CHUNK,
    CONFIG_MAX_BYTES,
    CONFIG_NAME,
    MAX_ARCHIVE_MEMBERS,
    WANTED,
    WEIGHTS_NAME,
    FetchedAdapter,
    check_pin,
    choose_adapter_files,
    copy_chunks_limited,
    human,
    sha256_file,
    sizes_of,
)
from vlmpool.patcher.sources.scheme import FetchRequest, SourceScheme, well_formed

GRAMMAR = r"^hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$"
FORM = "hf://<org>/<repo>[@<revision>]"


def parse(uri: str) -> tuple[str, str] | None:
    """(repo, revision) of a well-formed hf:// URI (revision main when it names none), else None."""
    if not well_formed(GRAMMAR, uri):
        return None
    repo, _, rev = uri[len("hf://"):].partition("@")
    return repo, rev or "main"


HF_READ_TIMEOUT = 60.0  # seconds per connect/read of a download (the whole fetch has --fetch-timeout)


def fetch(req: FetchRequest) -> FetchedAdapter:
    uri, workdir, sha256, max_file_bytes = req.uri, req.workdir, req.sha256, req.max_file_bytes
    parsed = parse(uri)
    if parsed is None:
        raise PatchError("InvalidSource", f"an hf:// source must be {FORM}, not {uri!r}")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError as e:  # pragma: no cover - the extra is installed in the image
        raise PatchError("InvalidSource", "hf:// sources need huggingface_hub (pip install 'vlmpool[hf]')") from e
    repo, rev = parsed
    endpoint = os.environ.get("HF_ENDPOINT") or None
    token = os.environ.get("HF_TOKEN") or None
    with _hf_held_to(endpoint or "https://huggingface.co", uri):
        return _hf_fetch(uri, repo, rev, endpoint, token, workdir, sha256, max_file_bytes)


@contextlib.contextmanager
def _hf_held_to(endpoint: str, uri: str) -> Iterator[None]:
    """huggingface_hub's requests (and the redirects it follows) stay on https when the endpoint is
    https, and carry the token only to the endpoint's origin; xet transfers (a native client that
    does its own networking) are off."""
    import huggingface_hub
    from huggingface_hub import constants as hf_constants
    from huggingface_hub.utils._http import default_client_factory

    def hook(request: Any) -> None:
        guard = egress.current()
        if guard is not None and guard.refusal is not None:
            raise guard.refusal  # refused already: no retries with backoff
        if not egress.check_redirect(endpoint, str(request.url), uri):
            request.headers.pop("authorization", None)

    def factory() -> Any:
        client = default_client_factory()
        hooks = client.event_hooks
        client.event_hooks = {"request": [*hooks.get("request", []), hook], "response": hooks.get("response", [])}
        return client

    xet = hf_constants.HF_HUB_DISABLE_XET
    hf_constants.HF_HUB_DISABLE_XET = True
    huggingface_hub.set_client_factory(factory)
    try:
        yield
    finally:
        huggingface_hub.set_client_factory(default_client_factory)
        hf_constants.HF_HUB_DISABLE_XET = xet


def _hf_fetch(uri: str, repo: str, rev: str, endpoint: str | None, token: str | None, workdir: Path,
              sha256: str | None, max_file_bytes: int) -> FetchedAdapter:
    from huggingface_hub import HfApi, hf_hub_url
    from huggingface_hub import errors as hf_errors

    api = HfApi(endpoint=endpoint, token=token)
    not_found = (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError, hf_errors.EntryNotFoundError)
    try:
        listing: dict[str, int] = {}
        for n, entry in enumerate(api.list_repo_tree(repo, revision=rev, recursive=True)):
            if n >= MAX_ARCHIVE_MEMBERS:  # files and folders: the walk itself stops here
                raise PatchError("UnsafeSource", f"{uri} lists more than {MAX_ARCHIVE_MEMBERS} entries")
            size = getattr(entry, "size", None)
            if size is not None and type(entry).__name__ == "RepoFile":
                listing[entry.path] = int(size)
    except PatchError:
        raise
    except not_found as e:
        raise PatchError("SourceNotFound", f"{uri}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # network and HTTP errors of the hub client
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PatchError("SourceUnavailable", f"{uri}: cannot list the repository: {first}") from e
    top, warnings = choose_adapter_files(listing, uri, max_file_bytes)
    adir = workdir / "adapter"
    adir.mkdir(parents=True, exist_ok=True)
    for wanted in WANTED:
        name = posixpath.join(top, wanted) if top else wanted
        limit = CONFIG_MAX_BYTES if wanted == CONFIG_NAME else max_file_bytes
        _hf_download(uri, hf_hub_url(repo, name, revision=rev, endpoint=endpoint), token, adir / wanted, limit,
                     name)
    digest = sha256_file(adir / WEIGHTS_NAME)
    check_pin(sha256, digest, f"{uri} {WEIGHTS_NAME}")
    return FetchedAdapter(adir, uri, "hf", digest, WEIGHTS_NAME, sha256 is not None, sizes_of(adir), warnings)


def _hf_download(uri: str, url: str, token: str | None, dst: Path, limit: int, name: str) -> None:
    """GET one file of the repository through the hub client (its redirects held by _hf_held_to),
    written to dst as the bytes arrive: the size limit holds while they stream (a listing or a
    Content-Length that understates the file does not get past it), and only dst is written (the
    hub's own download wrote the whole file first, then it was checked)."""
    from huggingface_hub import get_session
    from huggingface_hub.utils import build_hf_headers

    what = f"{uri}: {name}"
    try:
        with get_session().stream("GET", url, headers=build_hf_headers(token=token), follow_redirects=True,
                                  timeout=HF_READ_TIMEOUT) as r:
            if r.status_code == 404:
                code = r.headers.get("X-Error-Code") or "404"
                raise PatchError("SourceNotFound", f"{what}: {code}")
            if r.status_code >= 400:
                raise PatchError("SourceUnavailable", f"{what}: download failed: HTTP {r.status_code}")
            length = r.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > limit:
                raise PatchError("FileTooLarge", f"{what} is {human(int(length))}, over the limit of {human(limit)}")
            copy_chunks_limited(r.iter_bytes(CHUNK), dst, limit, what)
    except PatchError:
        raise
    except Exception as e:  # network and protocol errors of the hub client
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PatchError("SourceUnavailable", f"{what}: download failed: {first}") from e


SCHEME = SourceScheme(
    name="hf", prefix="hf://", listed=3, form="hf://org/repo@revision",
    grammar=GRAMMAR, grammar_message=f"an hf:// source must be {FORM}",
    credential_keys=("HF_TOKEN", "HF_ENDPOINT"), remote=True, fetch=fetch,
)
