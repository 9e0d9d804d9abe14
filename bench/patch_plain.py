#!/usr/bin/env python
"""Plain LoRA: `vlmpool patch` on the byte path (the default: safetensors header and byte ranges, no
torch) against the torch path (`--tensor-io torch`: safetensors.torch load_file + save), as the patch
Job runs it: a fresh process each time, so imports are paid as a Job pays them.

The adapter: rank 64 on q/k/v/o/gate/up/down of every language layer of a Qwen2-VL-2B-shaped model
(hidden 1536, intermediate 8960, 2 KV heads), float32 as PEFT saves it, plus an untrained vision-tower
LoRA on one block (dropped). Both paths must give the same version (checked). Prints the median of
--repeat runs of each, the ratio, the same two paths timed in-process with every import already done
(patch_adapter alone: the tensor I/O without the imports), the machine, and a final JSON line.

  python bench/patch_plain.py                 # 8 layers, 5 runs of each path
  python bench/patch_plain.py --layers 28     # the whole 2B language model
  (also: python bench/patch.py --plain ...)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"self_attn.q_proj": ("h", "h"), "self_attn.k_proj": ("kv", "h"), "self_attn.v_proj": ("kv", "h"),
          "self_attn.o_proj": ("h", "h"), "mlp.gate_proj": ("i", "h"), "mlp.up_proj": ("i", "h"),
          "mlp.down_proj": ("h", "i")}


def build(work: Path, layers: int, rank: int, hidden: int, intermediate: int, kv: int) -> Path:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    dims = {"h": hidden, "i": intermediate, "kv": kv}
    g = torch.Generator().manual_seed(0)
    t: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        for mod, (o, i) in SHAPES.items():
            p = f"base_model.model.model.language_model.layers.{layer}.{mod}"
            t[f"{p}.lora_A.weight"] = torch.randn((rank, dims[i]), generator=g) / dims[i] ** 0.5
            t[f"{p}.lora_B.weight"] = torch.randn((dims[o], rank), generator=g) * 0.01
    for mod, (o, i) in (("attn.qkv", (3 * 1280, 1280)), ("mlp.fc1", (5120, 1280))):  # untrained: B = 0
        p = f"base_model.model.model.visual.blocks.0.{mod}"
        t[f"{p}.lora_A.weight"] = torch.randn((rank, i), generator=g)
        t[f"{p}.lora_B.weight"] = torch.zeros((o, rank))
    d = work / f"lora-{layers}"
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[m.split(".")[1] for m in SHAPES] + ["qkv", "fc1"],
               lora_dropout=0.0, base_model_name_or_path="Qwen/Qwen2-VL-2B-Instruct").save_pretrained(d)
    save_file(t, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    return d


def run_patch(adapter: Path, root: Path, io: str) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "vlmpool.cli", "patch", "--source", str(adapter), "--adapter", "a",
           "--root", str(root), "--pool-base", "Qwen/Qwen2-VL-2B-Instruct", "--family", "qwen2_vl",
           "--termination-log", "", "--tensor-io", io]
    env = {**os.environ, "PYTHONPATH": str(REPO / "operator")}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    dt = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"vlmpool patch failed: {p.stderr[-2000:]}")
    return dt, json.loads(p.stdout.strip().splitlines()[-1])


def warm_patch(adapter: Path, repeat: int) -> dict[str, float]:
    """patch_adapter alone in this process (torch already imported): the I/O of each path, no imports."""
    from vlmpool.patcher import PatchOptions, patch_adapter

    opts = PatchOptions(family="qwen2_vl", pool_base="Qwen/Qwen2-VL-2B-Instruct")
    times: dict[str, list[float]] = {"torch": [], "bytes": []}
    for _ in range(repeat):
        for io in times:
            t0 = time.perf_counter()
            patch_adapter(adapter, opts, tensor_io=io)
            times[io].append(time.perf_counter() - t0)
    return {io: statistics.median(v) for io, v in times.items()}


def import_seconds(module: str) -> float:
    """Cumulative import time of ``module`` in a fresh interpreter (python -X importtime)."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO / "operator")}, check=True)
    for line in reversed(p.stderr.splitlines()):
        parts = [x.strip() for x in line.split("|")]
        if len(parts) == 3 and parts[2] == module:
            return int(parts[1]) / 1e6
    return float("nan")


def machine() -> str:
    mem = next((int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0) / 2**20
    return f"{os.cpu_count()} CPUs, {mem:.0f} GiB RAM, load average {os.getloadavg()[0]:.1f} at start"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[8], help="language layers (default 8; 28 = the 2B model)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5, help="runs of each path (median reported; default 5)")
    ap.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)  # bench/patch.py --plain lands here
    args = ap.parse_args(argv)
    print(f"machine: {machine()}", flush=True)
    imports = {m: round(import_seconds(m), 3) for m in ("torch", "numpy", "safetensors", "vlmpool.patcher.api")}
    print("cold import (s, python -X importtime): " + ", ".join(f"{k} {v}" for k, v in imports.items()), flush=True)
    work = Path(tempfile.mkdtemp(prefix="vlmpool-bench-plain-"))
    rows = []
    try:
        for layers in args.layers:
            adapter = build(work, layers, args.rank, 1536, 8960, 256)
            mb = (adapter / "adapter_model.safetensors").stat().st_size / 1e6
            times: dict[str, list[float]] = {"torch": [], "bytes": []}
            versions = set()
            for i in range(args.repeat):
                for io in ("torch", "bytes"):  # interleaved, so load changes hit both alike
                    root = work / f"vol-{io}-{layers}-{i}"
                    dt, s = run_patch(adapter, root, io)
                    times[io].append(dt)
                    versions.add(s["version"])
                    shutil.rmtree(root)
            assert len(versions) == 1, f"the two paths gave different versions: {versions}"
            med = {io: statistics.median(v) for io, v in times.items()}
            warm = warm_patch(adapter, args.repeat)
            rows.append({"layers": layers, "adapter_mb": round(mb, 1), "tensors_kept": s["tensorsKept"],
                         "torch_s": round(med["torch"], 3), "bytes_s": round(med["bytes"], 3),
                         "torch_runs": [round(x, 3) for x in times["torch"]],
                         "bytes_runs": [round(x, 3) for x in times["bytes"]],
                         "speedup": round(med["torch"] / med["bytes"], 2), "version": versions.pop(),
                         "warm_torch_s": round(warm["torch"], 3), "warm_bytes_s": round(warm["bytes"], 3)})
            print(f"{layers} layers ({mb:.0f} MB): torch path {med['torch']:.2f} s, byte path {med['bytes']:.2f} s "
                  f"(median of {args.repeat}), {rows[-1]['speedup']}x; in-process with imports done: torch "
                  f"{warm['torch']:.2f} s, bytes {warm['bytes']:.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n                    vlmpool patch (process)          patch_adapter (imports done)")
    print("layers  adapter MB  torch s  bytes s  speed-up       torch s  bytes s")
    for r in rows:
        print(f"{r['layers']:>6}  {r['adapter_mb']:>10}  {r['torch_s']:>7}  {r['bytes_s']:>7}  {r['speedup']:>7}x"
              f"       {r['warm_torch_s']:>7}  {r['warm_bytes_s']:>7}")
    print(json.dumps({"bench": "patch-plain", "machine": machine(), "rank": args.rank, "repeat": args.repeat,
                      "import_s": imports, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
