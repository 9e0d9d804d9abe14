"""hf:// and s3:// sources: the Hugging Face Hub (huggingface_hub) and S3 (boto3) halves of
vlmpool.patcher.fetch, each held to the egress rules of vlmpool.patcher.egress (no downgrade from
https, credentials only to the endpoint's origin, no internal addresses unless allow-listed)."""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlmpool.patcher import egress
from vlmpool.patcher.errors import PatchError
from vlmpool.patcher.fetch import (
    ARCHIVE_SUFFIXES,
    CHUNK,
    CONFIG_MAX_BYTES,
    CONFIG_NAME,
    MAX_ARCHIVE_MEMBERS,
    WANTED,
    WEIGHTS_NAME,
    FetchedAdapter,
    _check_pin,
    _copy_limited,
    _human,
    _sizes,
    choose_adapter_files,
    copy_chunks_limited,
    extract_adapter_archive,
    sha256_file,
)

# ---------------------------------------------------------------- hf://

HF_READ_TIMEOUT = 60.0  # seconds per connect/read of a download (the whole fetch has --fetch-timeout)
_HF_URI = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<rev>[A-Za-z0-9._/-]+))?$")


def hf(uri: str, workdir: Path, sha256: str | None, max_file_bytes: int) -> FetchedAdapter:
    m = _HF_URI.fullmatch(uri)
    if not m:
        raise PatchError("InvalidSource", f"an hf:// source must be hf://<org>/<repo>[@<revision>], not {uri!r}")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError as e:  # pragma: no cover - the extra is installed in the image
        raise PatchError("InvalidSource", "hf:// sources need huggingface_hub (pip install 'vlmpool[hf]')") from e
    repo, rev = m.group("repo"), m.group("rev") or "main"
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
    _check_pin(sha256, digest, f"{uri} {WEIGHTS_NAME}")
    return FetchedAdapter(adir, uri, "hf", digest, WEIGHTS_NAME, sha256 is not None, _sizes(adir), warnings)


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
                raise PatchError("FileTooLarge", f"{what} is {_human(int(length))}, over the limit of {_human(limit)}")
            copy_chunks_limited(r.iter_bytes(CHUNK), dst, limit, what)
    except PatchError:
        raise
    except Exception as e:  # network and protocol errors of the hub client
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PatchError("SourceUnavailable", f"{what}: download failed: {first}") from e


# ---------------------------------------------------------------- s3://

_S3_URI = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>.*))?$")


def _held_to_endpoint(endpoint: str, uri: str, aws: tuple[str, ...]) -> Any:
    """botocore's before-send hook: signed requests go to the endpoint (or a bucket-named host under it,
    or, without a custom endpoint, any AWS S3 regional endpoint), never elsewhere."""

    def hook(request: Any, **_: Any) -> None:
        if not egress.check_redirect(endpoint, request.url, uri):
            host, ep_host = egress.origin(request.url)[1], egress.origin(endpoint)[1]
            if not host.endswith(("." + ep_host, *aws)):
                g = egress.current()
                msg = f"{uri}: a request to {host}, not the endpoint {ep_host}, was refused"
                raise g.refuse("SourceRedirectRefused", msg) if g else PatchError("SourceRedirectRefused", msg)

    return hook


def s3(uri: str, workdir: Path, sha256: str | None, max_file_bytes: int) -> FetchedAdapter:
    m = _S3_URI.fullmatch(uri)
    if not m:
        raise PatchError("InvalidSource", f"an s3:// source must be s3://<bucket>[/<prefix>], not {uri!r}")
    try:
        import boto3
        import botocore.exceptions
    except ImportError as e:  # pragma: no cover
        raise PatchError("InvalidSource", "s3:// sources need boto3 (pip install 'vlmpool[s3]')") from e
    bucket, prefix = m.group("bucket"), (m.group("prefix") or "")
    custom = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    client = boto3.client("s3", endpoint_url=custom)
    endpoint = client.meta.endpoint_url
    # AWS itself: any S3 regional endpoint (botocore follows a bucket's region there).
    aws = () if custom else (".amazonaws.com", ".amazonaws.com.cn")

    client.meta.events.register("before-send.s3", _held_to_endpoint(endpoint, uri, aws))

    def err(e: Exception, what: str) -> PatchError:
        code = ""
        if isinstance(e, botocore.exceptions.ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchBucket", "NoSuchKey", "404", "NotFound"):
                return PatchError("SourceNotFound", f"{uri}: {what}: {code}")
        return PatchError("SourceUnavailable", f"{uri}: {what}: {code or type(e).__name__}: {e}")

    def download(key: str, dst: Path, limit: int) -> tuple[int, str]:
        try:
            obj = client.get_object(Bucket=bucket, Key=key)
        except Exception as e:
            raise err(e, f"get {key}") from e
        if int(obj.get("ContentLength") or 0) > limit:
            raise PatchError("FileTooLarge",
                             f"{uri}: {key} is {_human(int(obj['ContentLength']))}, over the limit of {_human(limit)}")
        body = obj["Body"]
        try:
            return _copy_limited(body, dst, limit, f"{uri}: {key}")
        finally:
            body.close()

    if prefix.lower().endswith(ARCHIVE_SUFFIXES):
        archive = workdir / "download"
        _, digest = download(prefix, archive, max_file_bytes)
        _check_pin(sha256, digest, uri)
        adir, warnings = extract_adapter_archive(archive, workdir / "adapter", max_file_bytes, uri)
        archive.unlink()
        return FetchedAdapter(adir, uri, "s3", digest, "archive", sha256 is not None, _sizes(adir), warnings)
    list_prefix = prefix.rstrip("/") + "/" if prefix else ""
    listing: dict[str, int] = {}
    try:
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=list_prefix):
            for obj in page.get("Contents", []) or []:
                rel = obj["Key"][len(list_prefix):]
                if rel and not rel.endswith("/"):
                    listing[rel] = int(obj.get("Size") or 0)
                if len(listing) > MAX_ARCHIVE_MEMBERS:
                    raise PatchError("UnsafeSource", f"{uri} lists more than {MAX_ARCHIVE_MEMBERS} objects")
    except PatchError:
        raise
    except Exception as e:
        raise err(e, "list") from e
    if not listing:
        raise PatchError("SourceNotFound", f"{uri}: no objects under this prefix")
    top, warnings = choose_adapter_files(listing, uri, max_file_bytes)
    adir = workdir / "adapter"
    adir.mkdir(parents=True, exist_ok=True)
    for wanted in WANTED:
        rel = posixpath.join(top, wanted) if top else wanted
        download(list_prefix + rel, adir / wanted, CONFIG_MAX_BYTES if wanted == CONFIG_NAME else max_file_bytes)
    digest = sha256_file(adir / WEIGHTS_NAME)
    _check_pin(sha256, digest, f"{uri} {WEIGHTS_NAME}")
    return FetchedAdapter(adir, uri, "s3", digest, WEIGHTS_NAME, sha256 is not None, _sizes(adir), warnings)
