"""Issue #23, bounds in the patch Job, as a hostile tenant would try them: archives whose metadata
(tar extended headers, a zip central directory) or inflated size is huge while the file is small,
members the patcher cannot read, listings without end, a download larger than its listing says, and
sources that trickle. Real tar/zip files made here, real HTTPS servers on loopback; memory measured
with tracemalloc around the fetch."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from test_sources import CFG, FILES, LOOPBACK, W, _hf_routes, refused, tgz

from vlmpool.names import API_VERSION
from vlmpool.patcher import fetch_adapter
from vlmpool.patcher.sources.fetchlib import MAX_ARCHIVE_MEMBERS

MIB = 1024 * 1024


def write(tmp_path: Path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def tar_bytes(add, *, fmt=tarfile.PAX_FORMAT, gz=True, **kw) -> bytes:
    """A tar(.gz) whose members `add(tf)` writes, followed by the adapter's two files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=fmt, **kw) as tf:
        add(tf)
        for name, data in FILES.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def member(tf: tarfile.TarFile, name: str, data: bytes = b"", **pax) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    if pax:
        ti.pax_headers = pax
    tf.addfile(ti, io.BytesIO(data))


def peak_while(fn) -> tuple[int, object]:
    tracemalloc.start()
    try:
        out = fn()
        return tracemalloc.get_traced_memory()[1], out
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------------ tar extended headers

def test_a_huge_pax_header_is_refused_before_tarfile_reads_it(tmp_path):
    """The probe's 6.9 MB tar.gz cost 1.6 GB: tarfile reads a pax header whole. Here a 64 MB one
    (64 kB compressed) is refused with memory far below its size."""
    data = tar_bytes(lambda tf: member(tf, "README", b"hi", comment="x" * (64 * MIB)))
    assert len(data) < 1 * MIB
    src = write(tmp_path, "pax.tgz", data)
    del data
    peak, e = peak_while(lambda: refused(src, tmp_path, "UnsafeArchive"))
    assert "pax extended header of" in e.message and "over the limit of 65536 bytes" in e.message
    assert peak < 8 * MIB, peak


def test_a_huge_gnu_long_name_is_refused(tmp_path):
    data = tar_bytes(lambda tf: member(tf, "d/" * 60_000 + "f", b"x"), fmt=tarfile.GNU_FORMAT)
    peak, e = peak_while(lambda: refused(write(tmp_path, "long.tgz", data), tmp_path, "UnsafeArchive"))
    assert "GNU long name header" in e.message
    assert peak < 8 * MIB, peak


def test_pax_global_headers_are_bounded(tmp_path):
    """A global header is copied into every member after it: 1 KiB of them in all."""
    data = tar_bytes(lambda tf: None, pax_headers={"comment": "g" * 2000})
    e = refused(write(tmp_path, "global.tgz", data), tmp_path, "UnsafeArchive")
    assert "pax global headers add up to more than 1024 bytes" in e.message
    # a small one (git archive writes its commit id as one) is fine
    fetch_adapter(write(tmp_path, "git.tgz", tar_bytes(lambda tf: None, pax_headers={"comment": "a" * 40})),
                  tmp_path / "ok")


def test_extended_headers_are_bounded_in_all(tmp_path):
    """Each under the per-header bound, together over 16 MiB: members keep their pax headers."""
    def add(tf):
        for i in range(300):
            member(tf, f"m{i}", b"", comment="c" * 60_000)

    e = refused(write(tmp_path, "many.tgz", tar_bytes(add)), tmp_path, "UnsafeArchive")
    assert "extended headers add up to more than" in e.message


@pytest.mark.parametrize("kind", ["gnu", "pax-1.0"])
def test_sparse_members_are_refused(tmp_path, kind):
    if kind == "gnu":
        def add(tf):
            ti = tarfile.TarInfo("sparse")
            ti.type = tarfile.GNUTYPE_SPARSE
            tf.addfile(ti)
        data = tar_bytes(add, fmt=tarfile.GNU_FORMAT)
    else:
        data = tar_bytes(lambda tf: member(tf, "sparse", b"10\n" + b"0\n" * 20, **{
            "GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s", "GNU.sparse.realsize": "10"}))
    e = refused(write(tmp_path, "sparse.tar.gz", data), tmp_path, "UnsafeArchive")
    assert "sparse" in e.message


# ------------------------------------------------------------------ inflation, members, listings

def test_skipped_members_count_toward_the_inflation_cap(tmp_path):
    """Walking a tar.gz inflates every member, skipped ones too: at most 2 x --max-file-bytes."""
    def add(tf):
        for i in range(3):
            member(tf, f"junk{i}.bin", b"\0" * (900 * 1024))

    data = tar_bytes(add)
    assert len(data) < 64 * 1024
    e = refused(write(tmp_path, "bomb.tgz", data), tmp_path, "ArchiveTooLarge", max_file_bytes=MIB)
    assert f"inflate to more than {2 * MIB} bytes" in e.message
    # a skipped member over the file limit is refused as one
    data = tar_bytes(lambda tf: member(tf, "optimizer.pt", b"\0" * (MIB + 1)))
    e = refused(write(tmp_path, "big.tgz", data), tmp_path, "FileTooLarge", max_file_bytes=MIB)
    assert "optimizer.pt is 1048577 bytes" in e.message


def test_directory_listing_is_capped(tmp_path):
    src = tmp_path / "src"
    (src / "many").mkdir(parents=True)
    for name, data in FILES.items():
        (src / name).write_bytes(data)
    for i in range(MAX_ARCHIVE_MEMBERS):
        (src / "many" / f"f{i}").touch()
    e = refused(str(src), tmp_path, "UnsafeSource")
    assert f"more than {MAX_ARCHIVE_MEMBERS} entries" in e.message


# ------------------------------------------------------------------ zip

def _patch_zip_member(data: bytes, name: str, *, flag: int | None = None, method: int | None = None) -> bytes:
    """Set a member's general-purpose flag bits or compression method in its local header and its
    central directory entry (the fields zipfile reads)."""
    raw = bytearray(data)
    enc = name.encode()
    local = raw.index(b"PK\x03\x04")
    while True:
        n = struct.unpack_from("<H", raw, local + 26)[0]
        if raw[local + 30:local + 30 + n] == enc:
            break
        local = raw.index(b"PK\x03\x04", local + 4)
    central = raw.index(b"PK\x01\x02")
    while True:
        n = struct.unpack_from("<H", raw, central + 28)[0]
        if raw[central + 46:central + 46 + n] == enc:
            break
        central = raw.index(b"PK\x01\x02", central + 4)
    for off, value in ((6, flag), (8, method)):
        if value is not None:
            struct.pack_into("<H", raw, local + off, value)
            struct.pack_into("<H", raw, central + off + 2, value)
    return bytes(raw)


def _zip(files: dict[str, bytes] = FILES) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("case,patch,match", [
    ("encrypted", {"flag": 0x1}, "is encrypted"),
    ("ppmd", {"method": 98}, "compression method 98"),
])
def test_zip_members_the_patcher_cannot_read_have_a_stable_reason(tmp_path, case, patch, match):
    data = _patch_zip_member(_zip(), W, **patch)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:  # the archive itself is well-formed
        assert zf.getinfo(W).flag_bits & 0x1 or zf.getinfo(W).compress_type == 98
    e = refused(write(tmp_path, f"{case}.zip", data), tmp_path, "UnsupportedArchive")
    assert match in e.message


def test_a_huge_zip_central_directory_is_refused_before_zipfile_reads_it(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(280):
            zf.writestr(f"{i:04d}" + "n" * 60_000, b"")
        for name, data in FILES.items():
            zf.writestr(name, data)
    src = write(tmp_path, "cd.zip", buf.getvalue())
    del buf
    peak, e = peak_while(lambda: refused(src, tmp_path, "UnsafeArchive"))
    assert "central directory of" in e.message
    assert peak < 8 * MIB, peak


# ------------------------------------------------------------------ remote sources: size while streaming

@pytest.fixture
def hub(monkeypatch, origin):
    """The Hub's HTTP API on the loopback https origin (as test_sources' hf_env)."""
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_ENDPOINT", origin.url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "5")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    import huggingface_hub
    huggingface_hub.close_session()  # its shared client must trust this test's certificate
    return origin


def test_hf_file_size_limit_holds_while_the_bytes_arrive(hub, tmp_path):
    """The listing says 256 bytes; the download streams 64 MiB without a Content-Length. The fetch
    stops at the limit: the server never gets to send most of it, and nothing over the limit is on
    disk."""
    _hf_routes(hub, FILES)
    sent = [0]

    def endless(h):
        def body():
            for _ in range(64):
                sent[0] += MIB
                yield b"\0" * MIB
        return 200, {"X-Repo-Commit": "0" * 40, "ETag": '"x"'}, body()

    hub.routes[f"/org/repo/resolve/main/{W}"] = endless
    e = refused("hf://org/repo", tmp_path, "FileTooLarge", allow=LOOPBACK, max_file_bytes=MIB)
    assert "larger than the limit of 1048576 bytes" in e.message
    assert sent[0] < 32 * MIB, sent[0]
    assert all(p.stat().st_size <= MIB for p in (tmp_path / "work").rglob("*") if p.is_file())


def test_hf_listing_is_capped(hub, tmp_path):
    entries = [{"type": "file", "path": f"f{i}", "size": 1, "oid": "0" * 40} for i in range(MAX_ARCHIVE_MEMBERS + 1)]
    hub.routes["/api/models/org/repo/tree/main"] = lambda h: (200, {"Content-Type": "application/json"},
                                                                 json.dumps(entries).encode())
    e = refused("hf://org/repo", tmp_path, "UnsafeSource", allow=LOOPBACK)
    assert f"more than {MAX_ARCHIVE_MEMBERS} entries" in e.message


# ------------------------------------------------------------------ the whole-fetch deadline

def _trickle(stop: threading.Event, total: int = 10_000, every: float = 0.2):
    def body():
        for _ in range(total):
            if stop.wait(every):
                return
            yield b"\0"
    return body()


@pytest.fixture
def stop():
    ev = threading.Event()
    yield ev
    ev.set()


@pytest.mark.parametrize("how", ["trickle", "no-answer"])
def test_https_fetch_ends_at_its_deadline(origin, tmp_path, stop, how):
    """1 byte every 0.2 s (each read well inside the per-read timeout), or an answer that never comes:
    the fetch ends at --fetch-timeout with a stable reason, not at the Job's deadline."""
    if how == "trickle":
        origin.routes["/a.tgz"] = lambda h: (200, {"Content-Length": "10000"}, _trickle(stop))
    else:
        origin.routes["/a.tgz"] = lambda h: (stop.wait(60), (200, {}, b""))[1]
    t0 = time.monotonic()
    e = refused(f"{origin.url}/a.tgz", tmp_path, "FetchTimeout", allow=LOOPBACK, fetch_timeout=2)
    took = time.monotonic() - t0
    assert "did not finish within 2 seconds" in e.message
    assert 1.5 < took < 20, took


def test_hf_fetch_ends_at_its_deadline(hub, tmp_path, stop):
    """The same through the hub client (another HTTP library): its blocked read ends at the deadline."""
    _hf_routes(hub, FILES)
    hub.routes[f"/org/repo/resolve/main/{W}"] = lambda h: (200, {"X-Repo-Commit": "0" * 40}, _trickle(stop))
    t0 = time.monotonic()
    refused("hf://org/repo", tmp_path, "FetchTimeout", allow=LOOPBACK, fetch_timeout=2)
    assert time.monotonic() - t0 < 20


def test_a_fetch_within_its_deadline_is_unaffected(origin, tmp_path):
    origin.routes["/a.tgz"] = tgz()
    f = fetch_adapter(f"{origin.url}/a.tgz", tmp_path / "work", allow=LOOPBACK, fetch_timeout=30)
    assert f.weights_path.read_bytes() == FILES[W] and f.config_path.read_bytes() == FILES[CFG]


# ------------------------------------------------------------------ names and versions: no trailing newline

@pytest.mark.parametrize("uri", ["hf://org/repo\n", "hf://org/repo@v1\n", "s3://bucket/a.tar.gz\n",
                                 "pvc://claim/adapter\n"])
def test_source_uris_with_a_trailing_newline_are_refused(tmp_path, uri):
    """`$` matches before a final newline; every check of a name, URI or version is a fullmatch."""
    refused(uri, tmp_path, "InvalidSource")


def test_names_keys_and_counts_with_a_trailing_newline_are_refused():
    from pydantic import ValidationError

    from vlmpool.api.pool import RolloutSpec
    from vlmpool.families import FAMILIES
    from vlmpool.patcher import PatchError
    from vlmpool.patcher.families import parse_key, tower_suffix
    from vlmpool.patcher.publish import validate_adapter_name

    validate_adapter_name("invoices")
    with pytest.raises(PatchError) as ei:
        validate_adapter_name("invoices\n")
    assert ei.value.reason == "InvalidAdapterName"
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert parse_key(key) is not None and parse_key(key + "\n") is None
    mag = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    assert parse_key(mag) is not None and parse_key(mag + "\n") is None
    fam = FAMILIES["qwen2_5_vl"]
    assert tower_suffix("visual.blocks.0.attn.qkv", fam) and tower_suffix("visual.blocks.0.attn.qkv\n", fam) is None
    assert RolloutSpec.model_validate({"maxUnavailable": "25%"}).max_unavailable == "25%"
    with pytest.raises(ValidationError):
        RolloutSpec.model_validate({"maxUnavailable": "1\n"})


# ------------------------------------------------------------------ the patch Job's own limits

async def test_the_bounded_patch_job_is_admitted_by_the_apiserver(kube, crds, namespace):
    """The patch Job with its memory and ephemeral-storage limits, its scratch sizeLimit and its
    --fetch-timeout is what the real apiserver admits and keeps (nothing dropped or defaulted away),
    and it runs this release's patcher image, not the pool's."""
    from vlmpool.api.objects import Adapter, Pool
    from vlmpool.kube.client import JOBS, VLMADAPTERS, VLMPOOLS
    from vlmpool.manifests import adapter as MA

    pool = await kube.create({"apiVersion": API_VERSION, "kind": "VLMPool", "metadata": {"name": "p"},
                              "spec": {"model": {"name": "Qwen/Qwen2.5-VL-3B-Instruct", "family": "qwen2_5_vl"},
                                       "replicas": 0, "proxy": {"image": "tenant.example.com/any:1"}}}, namespace)
    ad = await kube.create({"apiVersion": API_VERSION, "kind": "VLMAdapter", "metadata": {"name": "a"},
                            "spec": {"poolRef": {"name": "p"}, "source": {"uri": "https://example.com/a.tgz"}}},
                           namespace)
    job = MA.patch_job(Adapter.parse(ad), Pool.parse(pool))
    got = await kube.create(job, namespace)
    pod = got["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"] == job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert c["resources"]["limits"] == {"memory": "9Gi", "ephemeral-storage": "10Gi"}
    assert next(v for v in pod["volumes"] if v["name"] == "tmp")["emptyDir"] == {"sizeLimit": "9Gi"}
    assert c["args"][c["args"].index("--fetch-timeout") + 1] == "1800"
    assert c["image"] == MA.DEFAULT_PATCH_IMAGE
    await kube.delete(JOBS, got["metadata"]["name"], namespace)
    for res, name in ((VLMADAPTERS, "a"), (VLMPOOLS, "p")):
        await kube.patch(res, name, {"metadata": {"finalizers": None}}, namespace)
