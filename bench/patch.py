#!/usr/bin/env python
"""Time `vlmpool patch` on a Qwen2-VL-2B-shaped rank-64 DoRA adapter against the usual alternative:
load the base with transformers, load the adapter with PEFT, merge_and_unload and save the merged model.

The model is made here with random weights (nothing downloaded): Qwen2-VL-2B's language model
(hidden 1536, intermediate 8960, 28 layers, 12 heads / 2 KV heads, vocab 151936, tied embeddings)
with a one-block vision tower (the adapter targets the language model only). The adapter: DoRA,
rank 64, alpha 128, on q/k/v/o/gate/up/down of every layer, lora_B randomised (std 0.01), magnitudes moved by up to
1 % from the adapted weights' row norms; written straight in PEFT's format (no PEFT init: faster setup).

Timed runs (each end to end, files in and files out):
  baseline        transformers from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained
  strip           vlmpool patch --dora-policy strip (no base weights: nothing measured)
  strip+measure   vlmpool patch --dora-policy strip --base-weights (measures the error of stripping)
  svd             vlmpool patch --dora-policy svd --svd-rank 64 --base-weights (exact merge, truncated SVD)

Prints a table, the speed-up of each patch run over the baseline, and a final JSON line.
`--plain` times a plain LoRA instead: the byte path against the torch path (bench/patch_plain.py).
  python bench/patch.py                # 8 of the 28 layers, same shapes per layer (~3 min on 2 CPU cores)
  python bench/patch.py --layers 28    # the whole 2B language model (~6-10 min on 2 CPU cores)
  python bench/patch.py --plain --layers 8 28 --repeat 5   # plain LoRA: byte path vs torch path
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args, work: Path) -> tuple[Path, Path]:
    """Write the base checkpoint and the adapter straight from random tensors (no model forward, no
    PEFT init: minutes faster on 2 cores). Key names and shapes come from the real transformers class
    (built on the meta device); the adapter is in PEFT's saved format, with DoRA magnitudes derived
    from the adapted weights' row norms, moved by up to 1 % (as training moves them)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    dtype = getattr(torch, args.dtype)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=12, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=1, embed_dim=64, hidden_size=args.hidden, num_heads=2),
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        meta = Qwen2VLForConditionalGeneration(cfg)
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items() if k != "lm_head.weight"}
    del meta
    base_dir = work / "base"
    base_dir.mkdir()
    cfg.name_or_path = "Qwen/Qwen2-VL-2B-Instruct"
    cfg.save_pretrained(base_dir)
    g = torch.Generator().manual_seed(0)
    rank, alpha = args.rank, 2 * args.rank
    scale = alpha / rank
    adapter: dict[str, torch.Tensor] = {}
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    n_shard = 0

    def flush():
        nonlocal shard, n_shard
        if shard:
            name = f"model-{n_shard:05d}.safetensors"
            save_file(shard, str(base_dir / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, n_shard = {}, n_shard + 1

    size = 0
    for key, shape in shapes.items():
        if len(shape) >= 2:
            w = torch.randn(shape, generator=g).mul_(0.02)
        else:
            w = torch.ones(shape)
        module = key.removesuffix(".weight")
        if ".language_model.layers." in key and module.rsplit(".", 1)[-1] in TARGETS:
            out_f, in_f = shape
            a = torch.randn((rank, in_f), generator=g).mul_(1 / in_f ** 0.5)
            b = torch.randn((out_f, rank), generator=g).mul_(0.01)
            w_bf = w.to(dtype).float()  # the base as stored: PEFT merges against the bf16 weights
            norm = torch.linalg.vector_norm(w_bf + scale * (b @ a), dim=1)
            m = norm * (1 + 0.02 * (torch.rand(norm.shape, generator=g) - 0.5))
            p = f"base_model.model.{module}"
            adapter[f"{p}.lora_A.weight"], adapter[f"{p}.lora_B.weight"] = a, b
            adapter[f"{p}.lora_magnitude_vector"] = m
        shard[key] = w.to(dtype)
        size += shard[key].numel() * shard[key].element_size()
        if size > 1 << 30:
            flush()
            size = 0
    flush()
    (base_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    adapter_dir = work / "adapter"
    LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, use_dora=True, lora_dropout=0.0,
               base_model_name_or_path="Qwen/Qwen2-VL-2B-Instruct").save_pretrained(adapter_dir)
    save_file(adapter, str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return base_dir, adapter_dir


def baseline(args, base_dir: Path, adapter_dir: Path, out: Path) -> float:
    import torch
    from peft import PeftModel
    from transformers import Qwen2VLForConditionalGeneration

    t0 = time.perf_counter()
    model = Qwen2VLForConditionalGeneration.from_pretrained(base_dir, dtype=getattr(torch, args.dtype))
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out)
    dt = time.perf_counter() - t0
    del merged, model
    gc.collect()
    return dt


def patch(args, adapter_dir: Path, root: Path, name: str, **kw) -> tuple[float, dict]:
    from vlmpool.patcher import PatchOptions, patch_and_publish

    opts = PatchOptions(family="qwen2_vl", pool_base="Qwen/Qwen2-VL-2B-Instruct", max_rank=max(64, args.rank),
                        device=args.device, **kw)
    t0 = time.perf_counter()
    summary = patch_and_publish(str(adapter_dir), name, root, opts)
    return time.perf_counter() - t0, summary


def main() -> int:
    if "--plain" in sys.argv[1:]:  # plain LoRA: the byte path against the torch path (bench/patch_plain.py)
        from patch_plain import main as plain

        return plain(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8,
                    help="decoder layers (default 8, to stay within a few minutes on 2 CPU cores; Qwen2-VL-2B has 28)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--intermediate", type=int, default=8960)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default=None,
                    help="torch device of the patcher's DoRA math (default: cuda when available)")
    ap.add_argument("--svd-method", default="auto", choices=["auto", "exact", "randomized"])
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()

    import torch

    work = Path(tempfile.mkdtemp(prefix="vlmpool-bench-patch-", dir=args.workdir))
    try:
        t = time.perf_counter()
        base_dir, adapter_dir = build(args, work)
        setup_s = time.perf_counter() - t
        size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())  # noqa: E731
        print(f"setup: base {size(base_dir) / 1e9:.2f} GB, adapter {size(adapter_dir) / 1e6:.0f} MB, "
              f"made in {setup_s:.1f} s; torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"cuda={'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}", flush=True)
        results: dict[str, float | None] = {}
        results["baseline_s"] = None if args.skip_baseline else baseline(args, base_dir, adapter_dir, work / "merged")
        shutil.rmtree(work / "merged", ignore_errors=True)
        print(f"baseline (peft load + merge_and_unload + save): {results['baseline_s']}", flush=True)
        root = work / "volume"
        results["strip_s"], _ = patch(args, adapter_dir, root, "strip", dora_policy="strip")
        print(f"strip: {results['strip_s']:.2f} s", flush=True)
        results["strip_measured_s"], s_strip_m = patch(args, adapter_dir, root, "strip-measured", dora_policy="strip",
                                                       base_weights=base_dir)
        print(f"strip+measure: {results['strip_measured_s']:.2f} s (error {s_strip_m['doraError']:.4g})", flush=True)
        results["svd_s"], s_svd = patch(args, adapter_dir, root, "svd", dora_policy="svd", svd_rank=args.rank,
                                        base_weights=base_dir, svd_method=args.svd_method)
        report = json.loads((Path(s_svd["path"]) / "patch_report.json").read_text())
        print(f"svd: {results['svd_s']:.2f} s (error {s_svd['doraError']:.4g}, "
              f"methods {report['dora']['svd_methods']}, device {report['dora']['device']})", flush=True)
        b = results["baseline_s"]
        ratio = {k.replace("_s", ""): (round(b / v, 2) if b and v else None)
                 for k, v in results.items() if k != "baseline_s"}
        print("\nrun              seconds   speed-up vs baseline")
        for k, v in results.items():
            name = k.removesuffix("_s")
            speedup = "1.00 (baseline)" if name == "baseline" else ratio.get(name)
            print(f"{name:<16} {v if v is None else round(v, 2)!s:>8}   {speedup}")
        out = {
            "bench": "patch", "layers": args.layers, "rank": args.rank, "hidden": args.hidden,
            "intermediate": args.intermediate, "vocab": args.vocab, "dtype": args.dtype,
            "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            **{k: (round(v, 3) if v is not None else None) for k, v in results.items()},
            "speedup": ratio,
            "strip_error": s_strip_m["doraError"], "svd_error": s_svd["doraError"],
            "svd_error_total": report["dora"]["error_total"], "svd_methods": report["dora"]["svd_methods"],
            "svd_device": report["dora"]["device"], "tensors_kept": s_svd["tensorsKept"],
        }
        print(json.dumps(out))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
