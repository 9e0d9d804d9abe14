"""The byte path: a plain LoRA is patched from the safetensors header and byte ranges, without torch,
into the same bytes (and version) as the torch path; the header is hostile input."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from patcher_testlib import FAMILIES, LANG_TARGETS, POOL_BASE, VISION_TARGETS, make_adapter
from safetensors.torch import load_file, save_file

from vlmpool.patcher import PatchError, PatchOptions, patch_adapter, patch_and_publish
from vlmpool.patcher.weights import HEADER_MAX_BYTES, Weights, parse_header

REPO = Path(__file__).resolve().parents[2]

# (name, make_adapter kwargs, PatchOptions kwargs, source-key rewrite): the adapter shapes of the patcher
SHAPES = [
    ("lora-vision", dict(targets=LANG_TARGETS + ["VISION"]), {}, None),
    ("lora-base-weights", dict(), {"base_weights": "BASE"}, None),
    ("qv-r4-rslora", dict(targets=["q_proj", "v_proj"], r=4, alpha=8, rslora=True), {}, None),
    ("legacy-keys-adapter-name", dict(), {}, "legacy"),
    ("no-peft-prefix", dict(targets=["q_proj", "o_proj"]), {}, "noprefix"),
    ("trained-vision-over-threshold", dict(targets=LANG_TARGETS + ["VISION"], train_vision=True),
     {"vision_norm_threshold": 1e6}, None),
    ("dora-strip", dict(dora=True), {"dora_policy": "strip"}, None),
    ("dora-strip-measured", dict(dora=True), {"dora_policy": "strip", "base_weights": "BASE"}, None),
    ("dora-svd", dict(dora=True, r=4, alpha=8), {"dora_policy": "svd", "svd_rank": 2, "base_weights": "BASE"}, None),
]


def _rewrite_keys(d: Path, how: str) -> None:
    p = d / "adapter_model.safetensors"
    t = load_file(str(p))
    if how == "legacy":  # transformers < 4.52 layout, adapter name kept
        t = {k.replace("model.language_model.layers.", "model.layers.").replace(".weight", ".default.weight"): v
             for k, v in t.items()}
    else:
        t = {k.removeprefix("base_model.model."): v for k, v in t.items()}
    p.unlink()
    save_file(t, str(p), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def shaped(tmp_path_factory, base_dirs):
    root = tmp_path_factory.mktemp("shapes")
    out = {}
    for fam in FAMILIES:
        for name, kw, opts, rewrite in SHAPES:
            kw = dict(kw)
            if "targets" in kw:
                kw["targets"] = [t for t in kw["targets"] if t != "VISION"] + (
                    VISION_TARGETS[fam] if "VISION" in kw["targets"] else [])
            d = make_adapter(fam, root / f"{fam}-{name}", **kw)
            if rewrite:
                _rewrite_keys(d, rewrite)
            o = {k: (base_dirs[fam] if v == "BASE" else v) for k, v in opts.items()}
            out[(fam, name)] = (d, PatchOptions(family=fam, pool_base=POOL_BASE[fam], **o))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_byte_path_equals_torch_path(family, shaped):
    """Every adapter shape: same file bytes, same version, same report (norms to float rounding)."""
    for (fam, name), (d, opts) in shaped.items():
        if fam != family:
            continue
        by = patch_adapter(d, opts, tensor_io="bytes")
        tp = patch_adapter(d, opts, tensor_io="torch")
        assert by.weights_bytes == tp.weights_bytes, name
        assert by.version == tp.version, name
        assert by.config == tp.config and by.summary == tp.summary, name
        rb, rt = dict(by.report), dict(tp.report)
        nb, nt = rb.pop("vision_lora_b_norm_max"), rt.pop("vision_lora_b_norm_max")
        assert rb == rt, name
        assert (nb is None) == (nt is None) and (nb is None or nb == pytest.approx(nt, rel=1e-6)), name
        if name == "trained-vision-over-threshold":
            assert nb > 0
        # what was written is what load_file reads back, under the output keys
        back = load_file(str(_write(by.weights_bytes, d.parent / f"{d.name}.out.safetensors")))
        assert sorted(back) == sorted(by.tensors)


def _write(data: bytes, path: Path) -> Path:
    path.write_bytes(data)
    return path


def test_trained_vision_tower_refused_on_both_paths(shaped):
    d, opts = shaped[("qwen2_vl", "trained-vision-over-threshold")]
    opts = PatchOptions(family="qwen2_vl", pool_base=POOL_BASE["qwen2_vl"])
    for io in ("bytes", "torch"):
        with pytest.raises(PatchError) as ei:
            patch_adapter(d, opts, tensor_io=io)
        assert ei.value.reason == "TrainedVisionTower"


def _patch_in_subprocess(src: Path, root: Path, *extra: str, block_torch: bool = False, rc: int = 0
                         ) -> tuple[dict, set[str]]:
    """`vlmpool patch` in a fresh interpreter under -X importtime: its summary and the modules it imported.
    block_torch: `import torch` fails there, as in the torch-free patcher image."""
    code = ("import sys; " + ("sys.modules['torch'] = None; " if block_torch else "")
            + "from vlmpool.cli import main; sys.exit(main())")
    env = {**os.environ, "PYTHONPATH": str(REPO / "operator")}
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", code, "patch", "--source", str(src),
                        "--adapter", "a", "--root", str(root), "--termination-log", "", *extra],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == rc, p.stderr[-3000:]
    mods = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
    return json.loads(p.stdout.strip().splitlines()[-1]), mods


@pytest.mark.parametrize("family", FAMILIES)
def test_vlmpool_patch_of_a_plain_lora_never_imports_torch(family, shaped, tmp_path):
    d, opts = shaped[(family, "lora-vision")]
    summary, mods = _patch_in_subprocess(d, tmp_path / "vol", "--family", family, "--pool-base", POOL_BASE[family])
    assert summary["ok"] and summary["tensorsDropped"] > 0
    assert not {m for m in mods if m == "torch" or m.startswith("torch.")}, "torch was imported"
    assert "numpy" not in mods  # an untrained vision lora_B is all zero bytes: no maths at all
    assert summary["version"] == patch_adapter(d, opts, tensor_io="torch").version


def test_base_weights_shape_check_and_strip_need_no_torch(shaped, base_dirs, tmp_path):
    d, _ = shaped[("qwen2_5_vl", "lora-base-weights")]
    summary, mods = _patch_in_subprocess(d, tmp_path / "v1", "--family", "qwen2_5_vl", "--pool-base",
                                         POOL_BASE["qwen2_5_vl"], "--base-weights", str(base_dirs["qwen2_5_vl"]))
    assert summary["ok"] and "torch" not in mods
    d, _ = shaped[("qwen2_5_vl", "dora-strip")]
    summary, mods = _patch_in_subprocess(d, tmp_path / "v2", "--family", "qwen2_5_vl", "--pool-base",
                                         POOL_BASE["qwen2_5_vl"], "--dora-policy", "strip")
    assert summary["ok"] and summary["doraPolicy"] == "strip" and "torch" not in mods


def test_without_torch_plain_lora_patches_and_dora_maths_is_refused(shaped, base_dirs, tmp_path):
    """The torch-free image: a plain LoRA patches to the same version; svd is a NeedsTorch refusal."""
    d, opts = shaped[("qwen3_vl", "lora-vision")]
    summary, _ = _patch_in_subprocess(d, tmp_path / "v1", "--family", "qwen3_vl", "--pool-base",
                                      POOL_BASE["qwen3_vl"], block_torch=True)
    assert summary["ok"] and summary["version"] == patch_adapter(d, opts, tensor_io="torch").version
    d, _ = shaped[("qwen3_vl", "dora-svd")]
    summary, _ = _patch_in_subprocess(d, tmp_path / "v2", "--family", "qwen3_vl", "--pool-base", POOL_BASE["qwen3_vl"],
                                      "--dora-policy", "svd", "--base-weights", str(base_dirs["qwen3_vl"]),
                                      block_torch=True, rc=1)
    assert summary["reason"] == "NeedsTorch" and "patcher-dora" in summary["message"]
    d, opts = shaped[("qwen3_vl", "dora-strip-measured")]  # strip: served unmeasured, same version
    summary, _ = _patch_in_subprocess(d, tmp_path / "v3", "--family", "qwen3_vl", "--pool-base", POOL_BASE["qwen3_vl"],
                                      "--dora-policy", "strip", "--base-weights", str(base_dirs["qwen3_vl"]),
                                      block_torch=True)
    assert summary["ok"] and summary["doraError"] is None and "error not measured" in summary["warnings"][-1]
    measured = patch_adapter(d, opts)
    assert measured.summary.dora_error is not None and summary["version"] == measured.version
    assert not (tmp_path / "v2" / "a" / "versions").exists() or not any((tmp_path / "v2" / "a" / "versions").iterdir())


def test_dora_svd_does_import_torch(shaped, base_dirs, tmp_path):
    """The import check is not vacuous: the DoRA maths imports torch in the same harness."""
    d, _ = shaped[("qwen2_vl", "dora-svd")]
    summary, mods = _patch_in_subprocess(d, tmp_path / "vol", "--family", "qwen2_vl", "--pool-base",
                                         POOL_BASE["qwen2_vl"], "--dora-policy", "svd", "--svd-rank", "2",
                                         "--base-weights", str(base_dirs["qwen2_vl"]))
    assert summary["ok"] and summary["doraPolicy"] == "svd" and "torch" in mods


def test_two_layouts_of_one_layer_are_refused_not_overwritten(lora_dirs, tmp_path):
    """model.layers.0.X and model.language_model.layers.0.X both map to the canonical key of layer 0."""
    d = tmp_path / "a"
    shutil.copytree(lora_dirs["qwen2_vl"], d)
    p = d / "adapter_model.safetensors"
    t = load_file(str(p))
    extra = {k.replace("model.language_model.layers.", "model.layers."): v.clone()
             for k, v in t.items() if "language_model.layers.0.self_attn.q_proj" in k}
    assert len(extra) == 2
    save_file({**t, **extra}, str(p))
    for io in ("bytes", "torch"):
        with pytest.raises(PatchError) as ei:
            patch_adapter(d, PatchOptions(family="qwen2_vl", pool_base=POOL_BASE["qwen2_vl"]), tensor_io=io)
        assert ei.value.reason == "UnrecognisedTensor"
        assert "map to the same output key" in ei.value.message


# ------------------------------------------------------------------ hostile headers

def _file(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytearray:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return bytearray(struct.pack("<Q", len(h) if length is None else length) + h + data)


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "BF16", "shape": [1, 2], "data_offsets": [8, 12]}}


def _with(**over) -> dict:
    h = json.loads(json.dumps(GOOD))
    for k, v in over.items():
        name, field = k.split("__")
        h[name][field] = v
    return h


HOSTILE = [
    ("short", bytearray(b"\x01\x02"), r"shorter than the 8-byte header length"),
    ("huge-length", _file(b"{}", length=HEADER_MAX_BYTES + 1), r"over the 16777216-byte limit"),
    ("length-past-end", _file(b"{}", length=100), r"claims 100 bytes but the file has only 2"),
    ("not-utf8", _file(b"{\xff}"), r"not UTF-8"),
    ("not-an-object", _file(b"[1, 2]"), r"not a JSON object"),
    ("not-json", _file(b"{nope"), r"not valid JSON"),
    ("duplicate-name", _file(b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, '
                             b'"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'), r"names 'a' twice"),
    ("unknown-dtype", _file(_with(a__dtype="F128"), bytes(12)), r"unknown dtype 'F128'"),
    ("negative-dim", _file(_with(a__shape=[-2]), bytes(12)), r"invalid shape"),
    ("bool-dim", _file(_with(a__shape=[True, 2]), bytes(12)), r"invalid shape"),
    ("float-dim", _file(_with(a__shape=[2.0]), bytes(12)), r"invalid shape"),
    ("three-offsets", _file(_with(a__data_offsets=[0, 4, 8]), bytes(12)), r"invalid data_offsets"),
    ("reversed-offsets", _file(_with(a__data_offsets=[8, 0]), bytes(12)), r"invalid data_offsets"),
    ("negative-offset", _file(_with(a__data_offsets=[-4, 4]), bytes(12)), r"invalid data_offsets"),
    ("past-the-data", _file(_with(b__data_offsets=[8, 14]), bytes(12)), r"ends at byte 14, past the 12 bytes"),
    ("dtype-shape-vs-length", _file(_with(a__shape=[3]), bytes(12)),
     r"F32 \[3\], 12 bytes, but its data_offsets span 8"),
    ("huge-shape", _file(_with(a__shape=[2**40, 2**40]), bytes(12)), r"but its data_offsets span 8"),
    ("overlap", _file(_with(b__data_offsets=[4, 8], b__shape=[2]), bytes(12)), r"'b' overlaps the tensor before it"),
    ("hole", _file({"a": GOOD["a"], "b": {"dtype": "BF16", "shape": [1], "data_offsets": [10, 12]}}, bytes(12)),
     r"2 unused bytes before tensor 'b'"),
    ("trailing-bytes", _file(GOOD, bytes(16)), r"4 bytes after the last tensor"),
    ("extra-field", _file(_with(a__extra=1), bytes(12)), r"exactly dtype, shape and data_offsets"),
    ("not-a-dict", _file({"a": [1]}), r"exactly dtype, shape and data_offsets"),
    ("bad-metadata", _file({"__metadata__": {"format": 1}, **GOOD}, bytes(12)), r"__metadata__ must map strings"),
    ("empty-name", _file({"": GOOD["a"], "b": GOOD["b"]}, bytes(12)), r"empty name"),
]


def test_a_good_header_parses():
    meta, entries = parse_header(_file({"__metadata__": {"format": "pt"}, **GOOD}, bytes(12)))
    assert meta == {"format": "pt"}
    n = 8 + len(json.dumps({"__metadata__": {"format": "pt"}, **GOOD}))
    assert entries == {"a": ("F32", (2,), n, n + 8), "b": ("BF16", (1, 2), n + 8, n + 12)}


@pytest.mark.parametrize("name,buf,match", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_header_is_refused(name, buf, match):
    with pytest.raises(PatchError) as ei:
        Weights(buf)
    assert ei.value.reason == "InvalidWeights"
    assert ei.value.message.startswith("adapter_model.safetensors is not a readable safetensors file: ")
    import re

    assert re.search(match, ei.value.message), ei.value.message


@pytest.mark.parametrize("name", ["overlap", "dtype-shape-vs-length", "duplicate-name"])
def test_hostile_weights_publish_nothing(name, lora_dirs, tmp_path):
    buf = dict((h[0], h[1]) for h in HOSTILE)[name]
    d = tmp_path / "src"
    shutil.copytree(lora_dirs["qwen2_vl"], d)
    (d / "adapter_model.safetensors").write_bytes(bytes(buf))
    with pytest.raises(PatchError) as ei:
        patch_and_publish(str(d), "ad", tmp_path / "vol",
                          PatchOptions(family="qwen2_vl", pool_base=POOL_BASE["qwen2_vl"]))
    assert ei.value.reason == "InvalidWeights"
    versions = tmp_path / "vol" / "ad" / "versions"
    assert not versions.exists() or not any(versions.iterdir())


def test_every_dtype_round_trips_byte_for_byte(tmp_path):
    """The serialiser's dtype names and sizes agree with torch's save for every safetensors dtype."""
    from safetensors.torch import save

    from vlmpool.patcher.weights import serialize

    g = torch.Generator().manual_seed(0)
    ts = {"f32": torch.randn(3, 4, generator=g), "f16": torch.randn(5, generator=g).half(),
          "bf16": torch.randn(2, 3, generator=g).bfloat16(), "f64": torch.randn(2, generator=g).double(),
          "i64": torch.arange(4), "i32": torch.arange(3, dtype=torch.int32), "i16": torch.arange(3, dtype=torch.int16),
          "i8": torch.arange(3, dtype=torch.int8), "u8": torch.arange(3, dtype=torch.uint8),
          "bool": torch.tensor([True, False]), "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
          "f8b": torch.randn(4, generator=g).to(torch.float8_e5m2), "empty": torch.zeros(0, 3)}
    want = save(ts, metadata={"format": "pt"})
    w = Weights(bytearray(want))
    assert serialize({k: w.raw(k) for k in w.keys()}, {"format": "pt"}) == want
    for k, t in ts.items():
        assert torch.equal(w.tensor(k), t), k
        assert w.norm(k) == pytest.approx(float(torch.linalg.vector_norm(t.float())), rel=1e-6), k
