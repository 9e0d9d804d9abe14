"""Sources: local/file/pvc paths, archives, https (self-signed TLS on loopback), hf:// (a loopback
server speaking the Hub API through huggingface_hub) and s3:// (a loopback server speaking S3 to boto3);
and every fetch refusal with its message."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import tarfile
import zipfile

import pytest
from patcher_testlib import POOL_BASE

from vlmpool.patcher import PatchError, PatchOptions, fetch_adapter, patch_and_publish

FAM = "qwen2_vl"
CFG, W = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def files(lora_dirs) -> dict[str, bytes]:
    return {n: (lora_dirs[FAM] / n).read_bytes() for n in (CFG, W)}


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def make_tar(members: dict[str, bytes], *, gz=True, extra=None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        for ti in extra or []:
            tf.addfile(ti)
    return buf.getvalue()


def make_zip(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            zi = zipfile.ZipInfo(name)
            zi.external_attr = (0o120777 << 16)
            zf.writestr(zi, target)
    return buf.getvalue()


def refuse(uri, tmp_path, reason, match, **kw):
    with pytest.raises(PatchError) as ei:
        fetch_adapter(uri, tmp_path / "work", **kw)
    assert ei.value.reason == reason, ei.value
    assert __import__("re").search(match, ei.value.message), ei.value.message
    return ei.value


def opts():
    return PatchOptions(family=FAM, pool_base=POOL_BASE[FAM])


# ------------------------------------------------------------------ local paths

def test_local_dir_file_uri_and_pin(lora_dirs, files, tmp_path):
    d = lora_dirs[FAM]
    f = fetch_adapter(str(d), tmp_path / "w1")
    assert f.dir == d and f.sha256 == sha(files[W]) and f.sha256_of == W and not f.pinned
    f = fetch_adapter(f"file://{d}", tmp_path / "w2", sha256=sha(files[W]))
    assert f.pinned and f.config_path.read_bytes() == files[CFG]
    # A node file's digest is never revealed (the tenant may not be able to read the file).
    e = refuse(f"file://{d}", tmp_path, "ChecksumMismatch", rf"sha256 of .*{W} does not match the pin", sha256="0" * 64)
    assert sha(files[W]) not in e.message


def test_pvc_source(files, tmp_path):
    claim = tmp_path / "mnt" / "adapters-claim" / "team" / "a1"
    claim.mkdir(parents=True)
    for n, b in files.items():
        (claim / n).write_bytes(b)
    f = fetch_adapter("pvc://adapters-claim/team/a1", tmp_path / "w", pvc_root=tmp_path / "mnt")
    assert f.dir == claim
    refuse("pvc://adapters-claim/team/../../etc", tmp_path, "InvalidSource", r"must not contain '\.\.'",
           pvc_root=tmp_path / "mnt")
    refuse("pvc://Bad_Claim/x", tmp_path, "InvalidSource", r"pvc://<claim>/<path>", pvc_root=tmp_path / "mnt")
    refuse("pvc://adapters-claim/nope", tmp_path, "SourceNotFound", r"no such file or directory",
           pvc_root=tmp_path / "mnt")


def test_nested_directory_and_pickle_beside_safetensors(files, tmp_path):
    d = tmp_path / "src" / "checkpoint-100"
    d.mkdir(parents=True)
    for n, b in files.items():
        (d / n).write_bytes(b)
    (d / "training_args.bin").write_bytes(b"\x80\x04pickle")
    f = fetch_adapter(str(tmp_path / "src"), tmp_path / "w")
    assert f.dir == d
    assert any("ignored pickle files" in w and "training_args.bin" in w for w in f.warnings)


def test_local_archives(files, tmp_path):
    tgz = tmp_path / "a.tgz"
    tgz.write_bytes(make_tar({f"adapter/{n}": b for n, b in files.items()}))
    f = fetch_adapter(f"file://{tgz}", tmp_path / "w1", sha256=sha(tgz.read_bytes()))
    assert f.sha256_of == "archive" and (f.dir / W).read_bytes() == files[W]
    z = tmp_path / "a.zip"
    z.write_bytes(make_zip(files))
    f = fetch_adapter(str(z), tmp_path / "w2")
    assert (f.dir / CFG).read_bytes() == files[CFG]


def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    refuse(str(tmp_path / "empty"), tmp_path, "MissingConfig",
           r"has no adapter_config\.json: not a PEFT adapter directory")


def test_missing_weights(files, tmp_path):
    d = tmp_path / "cfgonly"
    d.mkdir()
    (d / CFG).write_bytes(files[CFG])
    refuse(str(d), tmp_path, "MissingWeights", r"has adapter_config\.json but no adapter_model\.safetensors")


def test_pickle_weights_refused(files, tmp_path):
    d = tmp_path / "pkl"
    d.mkdir()
    (d / CFG).write_bytes(files[CFG])
    (d / "adapter_model.bin").write_bytes(b"\x80\x04\x95pickle")
    refuse(str(d), tmp_path, "PickleWeights",
           r"the adapter weights are pickle files \(adapter_model\.bin\); pickle is never loaded")


def test_pickle_file_source_refused(tmp_path):
    p = tmp_path / "adapter.pt"
    p.write_bytes(b"\x80\x04pickle")
    refuse(str(p), tmp_path, "PickleWeights", r"is a pickle file; only safetensors adapters are accepted")


def test_symlinked_weights_refused(files, tmp_path):
    d = tmp_path / "ln"
    d.mkdir()
    (d / CFG).write_bytes(files[CFG])
    (tmp_path / "elsewhere.safetensors").write_bytes(files[W])
    os.symlink(tmp_path / "elsewhere.safetensors", d / W)
    refuse(str(d), tmp_path, "UnsafeSource", r"adapter_model\.safetensors is a symbolic link; links are refused")


def test_file_too_large_local(lora_dirs, tmp_path):
    refuse(str(lora_dirs[FAM]), tmp_path, "FileTooLarge",
           r"adapter_model\.safetensors is \d+ bytes, over the limit of 1000 bytes", max_file_bytes=1000)


def test_ambiguous_source(files, tmp_path):
    z = tmp_path / "two.zip"
    z.write_bytes(make_zip({f"{d}/{n}": b for d in ("a", "b") for n, b in files.items()}))
    refuse(str(z), tmp_path, "AmbiguousSource",
           r"holds several adapters \(a/adapter_config\.json, b/adapter_config\.json\)")


def test_unsupported_scheme_and_bad_pin(lora_dirs, tmp_path):
    refuse("ftp://host/a.tgz", tmp_path, "InvalidSource", r"unsupported source scheme")
    refuse(str(lora_dirs[FAM]), tmp_path, "InvalidArguments", r"--sha256 must be 64 hex digits", sha256="abc")


def test_not_an_archive(tmp_path):
    p = tmp_path / "a.tar.gz"
    p.write_bytes(b"plain text, not an archive" * 10)
    refuse(str(p), tmp_path, "InvalidSource", r"is not a tar, tar\.gz or zip archive")


# ------------------------------------------------------------------ unsafe archives

def _link(name, target, kind=tarfile.SYMTYPE):
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = kind, target
    return ti


@pytest.mark.parametrize("case,match", [
    ("traversal", r"member '\.\./evil\.txt' escapes the extraction directory"),
    ("absolute", r"member '/etc/cron\.d/x' has an absolute path"),
    ("symlink", r"member 'adapter/adapter_model\.safetensors' is a link \(to '/etc/passwd'\)"),
    ("hardlink", r"member 'h' is a link \(to 'adapter/adapter_config\.json'\)"),
    ("fifo", r"member 'fifo' is not a regular file"),
])
def test_unsafe_tar(files, tmp_path, case, match):
    members = {f"adapter/{n}": b for n, b in files.items()}
    extra = []
    if case == "traversal":
        members["../evil.txt"] = b"x"
    elif case == "absolute":
        members["/etc/cron.d/x"] = b"x"
    elif case == "symlink":
        members.pop(f"adapter/{W}")
        extra.append(_link(f"adapter/{W}", "/etc/passwd"))
    elif case == "hardlink":
        extra.append(_link("h", f"adapter/{CFG}", tarfile.LNKTYPE))
    elif case == "fifo":
        ti = tarfile.TarInfo("fifo")
        ti.type = tarfile.FIFOTYPE
        extra.append(ti)
    p = tmp_path / "bad.tar"
    p.write_bytes(make_tar(members, gz=False, extra=extra))
    refuse(str(p), tmp_path, "UnsafeArchive", match)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "work" / "evil.txt").exists()


def test_unsafe_zip(files, tmp_path):
    p = tmp_path / "t.zip"
    p.write_bytes(make_zip(dict(files, **{"../../evil.txt": b"x"})))
    refuse(str(p), tmp_path, "UnsafeArchive", r"member '\.\./\.\./evil\.txt' escapes")
    p.write_bytes(make_zip({CFG: files[CFG]}, symlinks={W: "/etc/passwd"}))
    refuse(str(p), tmp_path, "UnsafeArchive", r"member 'adapter_model\.safetensors' is a symbolic link")


def test_archive_member_too_large(files, tmp_path):
    p = tmp_path / "big.tgz"
    p.write_bytes(make_tar({CFG: files[CFG], W: b"\0" * 100_000}))  # compresses far below the limit
    assert p.stat().st_size < 4096
    refuse(str(p), tmp_path, "FileTooLarge",
           r"adapter_model\.safetensors is 100000 bytes, over the limit of 4096 bytes", max_file_bytes=4096)
    big = tmp_path / "bigger.tgz"
    big.write_bytes(make_tar(files))
    refuse(str(big), tmp_path, "FileTooLarge", r"bigger\.tgz is \d+ bytes, over the limit of 4096 bytes",
           max_file_bytes=4096)


def test_zip_member_with_lying_size_is_refused(files, tmp_path):
    """A deflated member whose headers claim 10 bytes but that inflates to 300 kB: zipfile stops at the
    declared size and the CRC check fails, so nothing past the declared size is ever written."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(CFG, files[CFG])
        zf.writestr(W, b"\0" * 300_000)
    raw = bytearray(buf.getvalue())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as zf:
        off = zf.getinfo(W).header_offset
    raw[off + 22:off + 26] = (10).to_bytes(4, "little")  # local header: uncompressed size
    i = 0
    while (i := bytes(raw).find(b"PK\x01\x02", i)) >= 0:  # central directory entries
        n = int.from_bytes(raw[i + 28:i + 30], "little")
        if bytes(raw[i + 46:i + 46 + n]) == W.encode():
            raw[i + 24:i + 28] = (10).to_bytes(4, "little")
        i += 4
    p = tmp_path / "liar.zip"
    p.write_bytes(bytes(raw))
    assert p.stat().st_size < 100_000
    refuse(str(p), tmp_path, "InvalidSource", r"corrupt zip member adapter_model\.safetensors", max_file_bytes=100_000)
    written = tmp_path / "work" / "adapter" / W
    assert not written.exists() or written.stat().st_size <= 10


# ------------------------------------------------------------------ https

def test_https_archive_with_pin_and_auth(https_server, files, tmp_path, monkeypatch):
    body = make_tar({f"my-adapter/{n}": b for n, b in files.items()})
    https_server.files["/adapters/a.tar.gz"] = body
    monkeypatch.setenv("AUTHORIZATION", "Bearer s3cret")
    s = patch_and_publish(f"{https_server.url}/adapters/a.tar.gz", "ad", tmp_path / "vol", opts(), sha256=sha(body))
    assert s["ok"] and https_server.seen_auth[-1] == "Bearer s3cret"
    report = __import__("json").loads((tmp_path / "vol/ad/current/patch_report.json").read_text())
    assert report["source"]["sha256"] == sha(body) and report["source"]["pinned"] is True


def test_https_pin_mismatch(https_server, files, tmp_path):
    https_server.files["/a.zip"] = make_zip(files)
    refuse(f"{https_server.url}/a.zip", tmp_path, "ChecksumMismatch",
           r"sha256 of https://127\.0\.0\.1:\d+/a\.zip is [0-9a-f]{64}, the pin says f{64}", sha256="f" * 64)


def test_https_directory_url(https_server, files, tmp_path):
    for n, b in files.items():
        https_server.files[f"/dir/{n}"] = b
    f = fetch_adapter(f"{https_server.url}/dir/", tmp_path / "w", sha256=sha(files[W]))
    assert (f.dir / W).read_bytes() == files[W] and f.sha256_of == W
    # only the two adapter files were asked for
    assert sorted(p for p in https_server.requests) == ["/dir/adapter_config.json", "/dir/adapter_model.safetensors"]


def test_https_directory_without_weights(https_server, files, tmp_path):
    https_server.files["/d/adapter_config.json"] = files[CFG]
    refuse(f"{https_server.url}/d/", tmp_path, "MissingWeights",
           r"has adapter_config\.json but no adapter_model\.safetensors")


def test_https_not_found(https_server, tmp_path):
    refuse(f"{https_server.url}/missing.tgz", tmp_path, "SourceNotFound", r"HTTP 404 for https://127\.0\.0\.1:\d+/missing\.tgz")


def test_https_not_an_archive_url(https_server, tmp_path):
    refuse(f"{https_server.url}/adapter.safetensors", tmp_path, "InvalidSource",
           r"must be an archive .* or a directory URL ending in '/'")
    refuse(f"{https_server.url}/adapter_model.bin", tmp_path, "PickleWeights", r"is a pickle file")


def test_https_too_large_by_header_and_by_stream(https_server, files, tmp_path):
    body = make_zip(files)
    https_server.files["/a.zip"] = body
    refuse(f"{https_server.url}/a.zip", tmp_path, "FileTooLarge",
           rf"is {len(body)} bytes, over the limit of 2048 bytes", max_file_bytes=2048)
    # a server that sends no Content-Length (chunked) is cut while streaming
    https_server.files["/b.zip"] = body
    https_server.headers["/b.zip"] = {"Transfer-Encoding": "chunked"}
    refuse(f"{https_server.url}/b.zip", tmp_path, "FileTooLarge", r"larger than the limit of 2048 bytes",
           max_file_bytes=2048)


def test_https_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMPOOL_SOURCE_ALLOW", "127.0.0.1")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    refuse(f"https://127.0.0.1:{port}/a.tgz", tmp_path, "SourceUnavailable", r"cannot fetch https://127\.0\.0\.1:\d+/a\.tgz")


def test_https_untrusted_certificate(https_server, files, tmp_path, monkeypatch):
    https_server.files["/a.zip"] = make_zip(files)
    monkeypatch.delenv("SSL_CERT_FILE")
    refuse(f"{https_server.url}/a.zip", tmp_path, "SourceUnavailable",
           r"CERTIFICATE_VERIFY_FAILED|certificate verify failed")


# ------------------------------------------------------------------ hf://

def test_hf_source(hf_server, files, tmp_path):
    hf_server.repos[("acme/vl-adapter", "v1")] = dict(files, **{"README.md": b"# hi",
                                                                "base/model.safetensors": b"x" * 100})
    s = patch_and_publish("hf://acme/vl-adapter@v1", "ad", tmp_path / "vol", opts(), sha256=sha(files[W]))
    assert s["ok"]
    downloads = [r for r in hf_server.requests if "/resolve/" in r]
    assert downloads and all(r.endswith((CFG, W)) for r in downloads), downloads  # never README or base weights


def test_hf_not_found(hf_server, files, tmp_path):
    hf_server.repos[("acme/vl-adapter", "main")] = files
    refuse("hf://acme/other", tmp_path, "SourceNotFound", r"hf://acme/other: RepositoryNotFoundError")
    refuse("hf://acme/vl-adapter@nope", tmp_path, "SourceNotFound", r"hf://acme/vl-adapter@nope: RevisionNotFoundError")


def test_hf_pickle_only_is_refused_before_download(hf_server, files, tmp_path):
    hf_server.repos[("acme/old", "main")] = {CFG: files[CFG], "adapter_model.bin": b"\x80\x04pickle"}
    refuse("hf://acme/old", tmp_path, "PickleWeights",
           r"hf://acme/old: the adapter weights are pickle files \(adapter_model\.bin\)")
    assert not [r for r in hf_server.requests if "/resolve/" in r]


def test_hf_bad_uri(tmp_path):
    refuse("hf://just-a-name", tmp_path, "InvalidSource", r"hf://<org>/<repo>\[@<revision>\]")


# ------------------------------------------------------------------ s3://

def test_s3_prefix(s3_server, files, tmp_path):
    s3_server.buckets["models"] = {f"adapters/a1/{n}": b for n, b in files.items()}
    s3_server.buckets["models"]["adapters/a1/optimizer.pt"] = b"\x80\x04pickle"
    s3_server.buckets["models"]["adapters/a10/adapter_config.json"] = b"{}"  # a sibling prefix, not listed
    s = patch_and_publish("s3://models/adapters/a1", "ad", tmp_path / "vol", opts())
    assert s["ok"] and any("optimizer.pt" in w for w in s["warnings"])
    gets = [r for r in s3_server.requests if r.startswith("/models/adapters/")]
    assert sorted(g.split("?")[0] for g in gets) == ["/models/adapters/a1/adapter_config.json",
                                                     "/models/adapters/a1/adapter_model.safetensors"]


def test_s3_archive_key_with_pin(s3_server, files, tmp_path):
    body = make_tar(files)
    s3_server.buckets["models"] = {"a.tar.gz": body}
    f = fetch_adapter("s3://models/a.tar.gz", tmp_path / "w", sha256=sha(body))
    assert f.sha256_of == "archive" and (f.dir / W).read_bytes() == files[W]
    refuse("s3://models/a.tar.gz", tmp_path, "ChecksumMismatch", r"sha256 of s3://models/a\.tar\.gz is",
           sha256="1" * 64)


def test_s3_not_found(s3_server, tmp_path):
    s3_server.buckets["models"] = {}
    refuse("s3://models/none", tmp_path, "SourceNotFound", r"s3://models/none: no objects under this prefix")
    refuse("s3://nobucket/x", tmp_path, "SourceNotFound", r"s3://nobucket/x: list: NoSuchBucket")
    refuse("s3://models/x.tgz", tmp_path, "SourceNotFound", r"s3://models/x\.tgz: get x\.tgz: NoSuchKey")


def test_s3_too_large(s3_server, files, tmp_path):
    s3_server.buckets["models"] = {f"p/{n}": b for n, b in files.items()}
    refuse("s3://models/p", tmp_path, "FileTooLarge",
           r"s3://models/p: adapter_model\.safetensors is \d+ bytes, over the limit of 1000", max_file_bytes=1000)
