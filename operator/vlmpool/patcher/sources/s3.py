"""s3:// sources: s3://<bucket>[/<prefix>] (boto3; AWS_* honoured, AWS_ENDPOINT_URL too): a prefix holding
the two files, or the key of an archive. Signed requests are held to the endpoint (vlmpool.patcher.egress:
no internal addresses unless allow-listed)."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any

from vlmpool.patcher import egress
from vlmpool.patcher.errors import PatchError
from vlmpool.patcher.sources.fetchlib import (
    ARCHIVE_SUFFIXES,
    CONFIG_MAX_BYTES,
    CONFIG_NAME,
    MAX_ARCHIVE_MEMBERS,
    WANTED,
    WEIGHTS_NAME,
    FetchedAdapter,
    check_pin,
    choose_adapter_files,
    copy_limited,
    extract_adapter_archive,
    human,
    sha256_file,
    sizes_of,
)
from vlmpool.patcher.sources.scheme import FetchRequest, SourceScheme, well_formed

GRAMMAR = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"
FORM = "s3://<bucket>[/<prefix>]"


def parse(uri: str) -> tuple[str, str] | None:
    """(bucket, key prefix) of a well-formed s3:// URI, else None."""
    if not well_formed(GRAMMAR, uri):
        return None
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    return bucket, prefix


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


def fetch(req: FetchRequest) -> FetchedAdapter:
    uri, workdir, sha256, max_file_bytes = req.uri, req.workdir, req.sha256, req.max_file_bytes
    parsed = parse(uri)
    if parsed is None:
        raise PatchError("InvalidSource", f"an s3:// source must be {FORM}, not {uri!r}")
    try:
        import boto3
        import botocore.exceptions
    except ImportError as e:  # pragma: no cover
        raise PatchError("InvalidSource", "s3:// sources need boto3 (pip install 'vlmpool[s3]')") from e
    bucket, prefix = parsed
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
                             f"{uri}: {key} is {human(int(obj['ContentLength']))}, over the limit of {human(limit)}")
        body = obj["Body"]
        try:
            return copy_limited(body, dst, limit, f"{uri}: {key}")
        finally:
            body.close()

    if prefix.lower().endswith(ARCHIVE_SUFFIXES):
        archive = workdir / "download"
        _, digest = download(prefix, archive, max_file_bytes)
        check_pin(sha256, digest, uri)
        adir, warnings = extract_adapter_archive(archive, workdir / "adapter", max_file_bytes, uri)
        archive.unlink()
        return FetchedAdapter(adir, uri, "s3", digest, "archive", sha256 is not None, sizes_of(adir), warnings)
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
    check_pin(sha256, digest, f"{uri} {WEIGHTS_NAME}")
    return FetchedAdapter(adir, uri, "s3", digest, WEIGHTS_NAME, sha256 is not None, sizes_of(adir), warnings)


SCHEME = SourceScheme(
    name="s3", prefix="s3://", listed=2, form="s3://bucket/prefix",
    grammar=GRAMMAR, grammar_message=f"an s3:// source must be {FORM}",
    credential_keys=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                     "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"),
    remote=True, fetch=fetch,
)
