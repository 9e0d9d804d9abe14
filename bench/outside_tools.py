#!/usr/bin/env python3
"""The engine and `vlmpool proxy` measured by the field's own load generators (issue #27): the same skewed
multi-LoRA streaming workload sent by `inference-perf` (the Gateway API Inference Extension's benchmarking
tool) and by `vllm bench serve` (vLLM's), straight to the engine and through the proxy.

    .venv/bin/python bench/outside_tools.py                 # sim, both tools, direct + proxy, rates 4,16: ~5 min
    .venv/bin/python bench/outside_tools.py --paths direct,proxy,proxy-nolog --rates 16 --duration 30
    .venv/bin/python bench/outside_tools.py --tools inference-perf --images --rates 8
    .venv/bin/python bench/outside_tools.py --engine vllm --rates 1,2 --duration 30   # vLLM's CPU build

Setup (nothing is fetched at run time, all traffic is on loopback):
- inference-perf 0.7.0 in its own venv (it needs Python >= 3.12), from PyPI:
      ~/.pyenv/versions/3.12.1/bin/python -m venv ~/.cache/vlmpool/inference-perf-venv
      ~/.cache/vlmpool/inference-perf-venv/bin/pip install inference-perf==0.7.0
- `vllm bench serve` from the vLLM CPU venv (`bash hack/vllm-env.sh | tail -n1`), run through
  images/vllm-cpu/vllm_cli.py as the engine image runs vLLM's CLI.

What runs: the tiny Qwen2.5-VL `vlmpool testing make-model` writes (its tokenizer is the one both tools
count tokens with) and --adapters PEFT LoRAs made for it; the engine is `vlmpool sim` on that model
directory (fixed latency model: --ttft-ms, --tpot-ms) or, with --engine vllm, vLLM's CPU server started as
bench/real_engine.py starts it. `vlmpool proxy` runs in front as its own process and gets the adapters by
PUT /admin/v1/state (the operator's push); path `proxy-nolog` is a second proxy with --no-access-log.
Direct requests name an adapter by its engine name `<name>@<version>`, proxied ones by its served name.

The workload: chat completions, streamed, --input-tokens in, exactly --output-tokens out (ignore_eos),
adapters drawn per request with the skewed split --split (default 40/30/20/10 over 4 adapters; vllm bench
serve draws uniformly from --lora-modules, so each name is repeated in proportion to its split), Poisson
arrivals at each --rates rate for --duration seconds. --images adds one synthetic --image-size PNG per
request (inference-perf's synthetic multimodal datagen, vllm bench serve's random-mm dataset).

Per tool, path and rate: throughput, TTFT, TPOT, ITL (p50/p99), errors, the per-adapter request split
where the tool reports it (inference-perf), the ratios proxy/direct, and the proxy process's CPU
(utime+stime from /proc/<pid>/stat around the run, the tool's own start-up and tokenizer load included, so
an upper bound) per request and per streamed event (one SSE event per output token, plus the role and
[DONE] events). Everything shares this machine's cores; the header prints nproc and `uptime`. The last line
is one JSON object with every figure; --keep keeps the tools' raw reports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from benchlib import cpu_seconds, free_port, http, stop_all, uptime, vllm_python, wait_http  # noqa: E402

TOKEN = "bench-outside-token-0123456789abcdef"
BASE = "base"
VERSION = "0123abcd"  # the patcher publishes hex versions
INFERENCE_PERF = Path.home() / ".cache" / "vlmpool" / "inference-perf-venv" / "bin" / "inference-perf"
VLLM_CLI = REPO / "images" / "vllm-cpu" / "vllm_cli.py"








def pct(d: dict | None, key: str) -> float | None:
    return None if not d or d.get(key) is None else float(d[key])


# ---- inference-perf ------------------------------------------------------------------------------------------

def inference_perf_config(args, url: str, names: list[str], rate: float, out: Path, tokenizer: Path,
                          stream: bool) -> dict:
    data: dict[str, Any] = {
        "type": "synthetic",
        "input_distribution": {"min": args.input_tokens, "max": args.input_tokens, "mean": args.input_tokens,
                               "std_dev": 0},
        "output_distribution": {"min": args.output_tokens, "max": args.output_tokens,
                                "mean": args.output_tokens, "std_dev": 0},
    }
    # "synthetic" with a `multimodal` block is inference-perf's chat generator (plain "synthetic" is completions
    # only); with no media configured its requests are text chat
    data["multimodal"] = {}
    if args.images:
        data["multimodal"] = {"image": {"count": {"min": 1, "max": 1, "mean": 1, "std_dev": 0},
                                        "resolutions": {"height": args.image_size, "width": args.image_size},
                                        "representation": "png"}}
    return {
        "api": {"type": "chat", "streaming": stream},
        "data": data,
        "load": {
            "type": "poisson",
            "stages": [{"rate": rate, "duration": int(args.duration)}],
            "num_workers": args.ip_workers,
            "request_timeout": 120,
            # vllm bench: --seed 1 (the same schedule on every path); in inference-perf 0.7.0 this did not
            # reproduce the adapter draws across runs (docs/performance.md, "Outside tools")
            "base_seed": 1,
            "lora_traffic_split": [{"name": n, "split": s} for n, s in zip(names, args.split, strict=True)],
        },
        "server": {"type": "vllm", "model_name": BASE, "base_url": url, "ignore_eos": True},
        "tokenizer": {"pretrained_model_name_or_path": str(tokenizer)},
        "report": {"request_lifecycle": {"summary": True, "per_stage": False, "per_adapter": True,
                                         "percentiles": [50, 99],
                                         # output tokens from the server's usage (stream_options.include_usage),
                                         # not re-counted with the tokenizer: the sim's words are several
                                         # tokens each to the tiny model's tokenizer
                                         "use_server_output_tokens": True}},
        "storage": {"local_storage": {"path": str(out)}},
    }


def _find_report(out: Path, contains: str) -> list[Path]:
    return sorted(p for p in out.rglob("*.json") if contains in p.name)


def parse_inference_perf(out: Path) -> dict:
    """The summary report (and one per adapter) inference-perf writes under local_storage.path."""
    res: dict[str, Any] = {}
    summ = _find_report(out, "summary_lifecycle_metrics")
    if not summ:
        return {"error": f"no summary report under {out}: {sorted(p.name for p in out.rglob('*'))}"}
    s = json.loads(summ[0].read_text())
    load = s.get("load_summary", {})
    succ = s.get("successes", {})
    fail = s.get("failures", {})
    lat = succ.get("latency", {})
    thr = succ.get("throughput", {})
    n_ok, n_fail = succ.get("count") or 0, fail.get("count") or 0
    res.update({
        "requests": n_ok, "errors": n_fail,
        "error_rate": (n_fail / (n_ok + n_fail)) if (n_ok + n_fail) else None,
        "achieved_rate": pct(load, "achieved_rate"),
        "rps": pct(thr, "requests_per_sec"),
        "output_tok_s": pct(thr, "output_tokens_per_sec"),
    })
    for key, name in (("time_to_first_token", "ttft"), ("time_per_output_token", "tpot"),
                      ("inter_token_latency", "itl"), ("request_latency", "e2e")):
        m = lat.get(key) or {}
        for q in ("p50", "p99", "mean"):
            v = m.get(q) if q in m else m.get({"p50": "median"}.get(q, q))
            res[f"{name}_{q}_ms"] = None if v is None else round(float(v) * 1000, 3)
    adapters = {}
    for p in out.rglob("*.json"):
        if "adapter" in p.name and "summary" not in p.name:
            try:
                a = json.loads(p.read_text())
            except ValueError:
                continue
            name = p.stem.split("adapter_", 1)[-1].removesuffix("_lifecycle_metrics").split("@")[0]
            adapters[name] = (a.get("successes") or {}).get("count")
    if adapters:
        res["per_adapter"] = adapters
    return res


def run_inference_perf(args, url: str, names: list[str], rate: float, work: Path, tag: str, tokenizer: Path,
                       stream: bool) -> dict:
    out = work / f"ip-{tag}"
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "config.yml"
    cfg.write_text(json.dumps(inference_perf_config(args, url, names, rate, out / "reports", tokenizer, stream),
                              indent=1))  # JSON is YAML
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    with open(out / "stdout.log", "w") as log:
        rc = subprocess.run([str(args.inference_perf), "--config_file", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=out, timeout=args.duration * 4 + 300).returncode
    res = parse_inference_perf(out / "reports")
    if rc != 0:
        res["rc"] = rc
        res["log_tail"] = (out / "stdout.log").read_text(errors="replace")[-1500:]
    return res


# ---- vllm bench serve ----------------------------------------------------------------------------------------

def run_vllm_bench(args, url: str, names: list[str], rate: float, work: Path, tag: str, tokenizer: Path) -> dict:
    out = work / f"vb-{tag}"
    out.mkdir(parents=True, exist_ok=True)
    # uniform choice over the list: each adapter repeated in proportion to its split (40/30/20/10 -> 4,3,2,1)
    unit = min(args.split)
    modules = [n for n, s in zip(names, args.split, strict=True) for _ in range(max(1, round(s / unit)))]
    num = max(1, round(rate * args.duration))
    cmd = [args.vllm_python, str(VLLM_CLI), "bench", "serve", "--backend", "openai-chat",
           "--base-url", url, "--endpoint", "/v1/chat/completions", "--model", BASE,
           "--tokenizer", str(tokenizer), "--num-prompts", str(num), "--request-rate", str(rate),
           "--seed", "1", "--ignore-eos", "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl,e2el",
           "--metric-percentiles", "50,99", "--lora-modules", *modules,
           "--save-result", "--result-dir", str(out), "--result-filename", "result.json"]
    if args.images:
        cmd += ["--dataset-name", "random-mm", "--random-input-len", str(args.input_tokens),
                "--random-output-len", str(args.output_tokens), "--random-range-ratio", "0",
                "--random-mm-base-items-per-request", "1", "--random-mm-num-mm-items-range-ratio", "0",
                "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
                "--random-mm-bucket-config", f"{{({args.image_size}, {args.image_size}, 1): 1.0}}"]
    else:
        cmd += ["--dataset-name", "random", "--random-input-len", str(args.input_tokens),
                "--random-output-len", str(args.output_tokens), "--random-range-ratio", "0"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    with open(out / "stdout.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out,
                            timeout=args.duration * 4 + 300).returncode
    res: dict[str, Any] = {}
    f = out / "result.json"
    if f.exists():
        r = json.loads(f.read_text())
        ok, failed = r.get("completed") or 0, r.get("failed")
        failed = (num - ok) if failed is None else failed
        res.update({
            "requests": ok, "errors": failed, "error_rate": failed / num if num else None,
            "rps": r.get("request_throughput"), "output_tok_s": r.get("output_throughput"),
            "duration_s": r.get("duration"),
        })
        for name in ("ttft", "tpot", "itl", "e2el"):
            key = "e2e" if name == "e2el" else name
            res[f"{key}_p50_ms"] = r.get(f"p50_{name}_ms", r.get(f"median_{name}_ms"))
            res[f"{key}_p99_ms"] = r.get(f"p99_{name}_ms")
            res[f"{key}_mean_ms"] = r.get(f"mean_{name}_ms")
        errs = [e for e in (r.get("errors") or []) if e]
        if errs:
            res["first_error"] = errs[0][:300]
    else:
        res["error"] = "no result.json"
    if rc != 0 or not f.exists():
        res["rc"] = rc
        res["log_tail"] = (out / "stdout.log").read_text(errors="replace")[-1500:]
    return res


# ---- the rig -------------------------------------------------------------------------------------------------

def start_proxy(engine_url: str, work: Path, tag: str, access_log: bool, max_loras: int) -> tuple:
    port, admin = free_port(), free_port()
    env = dict(os.environ, VLMPOOL_ADMIN_TOKEN=TOKEN)
    log = open(work / f"{tag}.log", "w")
    cmd = [sys.executable, "-m", "vlmpool", "proxy", "--engine-url", engine_url, "--host", "127.0.0.1",
           "--port", str(port), "--admin-port", str(admin), "--base-model", BASE, "--max-loras", str(max_loras),
           "--concurrency", "256", "--queue-limit", "4096", "--adapter-root", str(work / "adapters"),
           "--log-level", "info" if access_log else "warning"]
    if not access_log:
        cmd.append("--no-access-log")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    wait_http(f"http://127.0.0.1:{port}/healthz")
    return proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"


def push(admin_url: str, adapters: list[dict]) -> dict:
    state = {"generation": 1, "concurrency": 256, "adapters": adapters}
    status, body = http("PUT", f"{admin_url}/admin/v1/state?wait=60", state, TOKEN)
    snap = json.loads(body)
    if status != 200 or (snap.get("counts") or {}).get("loaded") != len(adapters):
        raise RuntimeError(f"push to {admin_url}: {status} {body[:800]}")
    return snap


def fmt(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=["sim", "vllm"], default="sim")
    ap.add_argument("--tools", default="inference-perf,vllm-bench", help="comma-separated: inference-perf, vllm-bench")
    ap.add_argument("--paths", default="direct,proxy",
                    help="comma-separated: direct, proxy (access log on, its default), proxy-nolog (--no-access-log)")
    ap.add_argument("--rates", default="4,16", help="comma-separated request rates (req/s, Poisson arrivals)")
    ap.add_argument("--duration", type=float, default=20.0,
                    help="seconds per run (vllm bench: rate x duration prompts)")
    ap.add_argument("--non-streamed", action=argparse.BooleanOptionalAction, default=True,
                    help="also one non-streamed inference-perf run per path at the highest rate (the proxy's CPU "
                         "per plain request)")
    ap.add_argument("--idle-s", type=float, default=5.0, help="seconds of idle CPU measured before the runs")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--split", default="0.4,0.3,0.2,0.1", help="traffic share per adapter (sums to 1)")
    ap.add_argument("--input-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--images", action="store_true", help="one synthetic image per request")
    ap.add_argument("--image-size", type=int, default=64, help="image side in pixels (square)")
    ap.add_argument("--ttft-ms", type=float, default=20.0, help="sim: time to first token")
    ap.add_argument("--tpot-ms", type=float, default=2.0, help="sim: time per output token")
    ap.add_argument("--max-num-seqs", type=int, default=256, help="sim: batch size (vllm: 4, as bench/real_engine.py)")
    ap.add_argument("--max-loras", type=int, default=2, help="engine's and proxy's --max-loras")
    ap.add_argument("--ip-workers", type=int, default=1, help="inference-perf load.num_workers (processes)")
    ap.add_argument("--inference-perf", type=Path, default=INFERENCE_PERF)
    ap.add_argument("--vllm-python", help="the vLLM venv's python (default $VLMPOOL_VLLM_PYTHON, else "
                                          "`bash hack/vllm-env.sh`'s last line)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (model, adapters, reports, logs)")
    args = ap.parse_args()
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    args.rates = [float(x) for x in args.rates.split(",") if x.strip()]
    args.split = [float(x) for x in args.split.split(",")][: args.adapters]
    if len(args.split) != args.adapters or abs(sum(args.split) - 1) > 1e-6:
        ap.error("--split needs one share per adapter, summing to 1")
    if set(args.tools) - {"inference-perf", "vllm-bench"} or set(args.paths) - {"direct", "proxy", "proxy-nolog"}:
        ap.error("unknown tool or path")
    if "inference-perf" in args.tools and not args.inference_perf.exists():
        ap.error(f"{args.inference_perf} missing: see the setup in --help")
    if "vllm-bench" in args.tools or args.engine == "vllm":
        args.vllm_python = vllm_python(args.vllm_python)
    return args


def make_adapters(args, work: Path) -> tuple[Path, list[str], list[dict]]:
    """The tiny model and --adapters PEFT LoRAs for it, laid out as the operator publishes them."""
    from vlmpool.testing.adapters import make_adapter
    from vlmpool.testing.vlm_model import make_model

    model = make_model(work / "Qwen2.5-VL-tiny")
    names = [f"ad{i}" for i in range(args.adapters)]
    adapters = []
    for i, n in enumerate(names):
        src = make_adapter("qwen2_5_vl", work / f"src{i}", r=8, alpha=16, model_dir=model, base_name=str(model),
                           seed=i + 1)
        d = work / "adapters" / n / "versions" / VERSION
        shutil.copytree(src, d)
        adapters.append({"name": n, "version": VERSION, "path": str(d)})
    return model, names, adapters


def start_sim(args, model: Path, work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLMPOOL_LOG_LEVEL="warning")
    log = open(work / "sim.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmpool", "sim", "--model", str(model), "--served-model-name", BASE,
         "--family", "qwen2_5_vl", "--host", "127.0.0.1", "--port", str(port), "--enable-lora",
         "--max-loras", str(args.max_loras), "--max-cpu-loras", str(max(args.adapters, args.max_loras)),
         "--max-lora-rank", "8", "--max-num-seqs", str(args.max_num_seqs),
         "--ttft-ms", str(args.ttft_ms), "--tpot-ms", str(args.tpot_ms)],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    wait_http(f"http://127.0.0.1:{port}/health")
    return proc, f"http://127.0.0.1:{port}"


def vllm_engine(args, model: Path, work: Path):
    """bench/real_engine.py's engine: tests/vllm/real_engine.py's start_engine (a context manager)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vllm_test_engine", REPO / "tests" / "vllm" / "real_engine.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    engine_args = ["--served-model-name", BASE, "--enable-lora", "--max-loras", str(args.max_loras),
                   "--max-lora-rank", "8", "--max-cpu-loras", str(max(args.adapters, args.max_loras)),
                   "--max-model-len", "512", "--max-num-seqs", "4", "--dtype", "bfloat16",
                   "--limit-mm-per-prompt", '{"image":1,"video":0}']
    return mod.start_engine(args.vllm_python, model, engine_args, work / "vllm.log"), engine_args


def measure(args, tool: str, path: str, url: str, names: list[str], pid: int | None, engine_pid: int,
            rate: float, stream: bool, idle: dict[str, float], work: Path, tokenizer: Path) -> dict:
    """One tool run against one path, with the proxy's and the engine's CPU around it (less their idle rate)."""
    tag = f"{tool}-{path}-{rate:g}-{'s' if stream else 'n'}"
    p0 = cpu_seconds(pid) if pid else None
    e0, up, w0 = cpu_seconds(engine_pid), uptime(), time.monotonic()
    if tool == "inference-perf":
        r = run_inference_perf(args, url, names, rate, work, tag, tokenizer, stream)
    else:
        r = run_vllm_bench(args, url, names, rate, work, tag, tokenizer)
    e1, wall = cpu_seconds(engine_pid), time.monotonic() - w0
    r.update({"tool": tool, "path": path, "rate": rate, "stream": stream, "uptime": up, "wall_s": round(wall, 1)})
    n = (r.get("requests") or 0) + (r.get("errors") or 0)
    if n:
        r["engine_cpu_ms_per_req"] = round((e1 - e0 - idle["engine"] * wall) / n * 1000, 3)
    if pid and n:
        raw = cpu_seconds(pid) - p0
        cpu = raw - idle[path] * wall
        r["proxy_cpu_s_raw"] = round(raw, 3)
        r["proxy_cpu_ms_per_req_raw"] = round(raw / n * 1000, 3)
        r["proxy_cpu_ms_per_req"] = round(cpu / n * 1000, 3)
        if stream:  # the role chunk, one per output token, the usage chunk; [DONE] is not counted
            r["proxy_cpu_us_per_event"] = round(cpu / (n * (args.output_tokens + 2)) * 1e6, 2)
    return r


COLUMNS = (f"{'tool':>14} {'rate':>5} {'strm':>4} {'path':>11} {'rps':>6} {'ratio':>6} {'ttft p50':>8} "
           f"{'ttft p99':>8} {'tpot p50':>8} {'itl p50':>7} {'itl p99':>7} {'e2e p50':>8} {'err':>5} "
           f"{'proxy ms/req':>12} {'us/event':>8} {'eng ms/req':>10}  per-adapter")


def row(r: dict) -> str:
    per = ",".join(f"{k}:{v}" for k, v in sorted((r.get("per_adapter") or {}).items()))
    return (f"{r['tool']:>14} {r['rate']:>5g} {'y' if r['stream'] else 'n':>4} {r['path']:>11} "
            f"{fmt(r.get('rps'), '.2f'):>6} {fmt(r.get('rps_ratio'), '.3f'):>6} {fmt(r.get('ttft_p50_ms')):>8} "
            f"{fmt(r.get('ttft_p99_ms')):>8} {fmt(r.get('tpot_p50_ms'), '.2f'):>8} "
            f"{fmt(r.get('itl_p50_ms'), '.2f'):>7} {fmt(r.get('itl_p99_ms'), '.2f'):>7} "
            f"{fmt(r.get('e2e_p50_ms')):>8} {fmt(r.get('errors'), 'd'):>5} "
            f"{fmt(r.get('proxy_cpu_ms_per_req'), '.3f'):>12} {fmt(r.get('proxy_cpu_us_per_event'), '.1f'):>8} "
            f"{fmt(r.get('engine_cpu_ms_per_req'), '.3f'):>10}  {per}"
            + ("  (ran first)" if r.get("order") == 0 else ""))


def main() -> int:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-outside-"))
    summary: dict[str, Any] = {"bench": "outside_tools", "nproc": os.cpu_count(), "engine": args.engine,
                               "workload": {"input_tokens": args.input_tokens, "output_tokens": args.output_tokens,
                                            "split": args.split, "images": args.images, "duration_s": args.duration,
                                            "rates": args.rates},
                               "uptime": {"start": uptime()}, "runs": []}
    print(f"# outside tools: engine {args.engine}, nproc {os.cpu_count()}, {summary['uptime']['start']}", flush=True)
    procs: list[subprocess.Popen] = []
    engine_ctx = None
    try:
        t0 = time.monotonic()
        model, names, adapters = make_adapters(args, work)
        print(f"# model + {args.adapters} adapters made in {time.monotonic() - t0:.1f} s under {work}", flush=True)
        if args.engine == "sim":
            proc, engine_url = start_sim(args, model, work)
            procs.append(proc)
            engine_pid = proc.pid
        else:
            engine_ctx, engine_args = vllm_engine(args, model, work)
            engine = engine_ctx.__enter__()
            engine_url, engine_pid = engine.url, engine.pid
            summary["engine_args"] = engine_args
            print(f"# vLLM healthy in {engine.started_in_s:.1f} s: {' '.join(engine_args)}", flush=True)

        # path -> (base url, the adapter names requests carry, the proxy's pid)
        targets: dict[str, tuple[str, list[str], int | None]] = {}
        if "direct" in args.paths:
            targets["direct"] = (engine_url, [f"{n}@{VERSION}" for n in names], None)
        for path in args.paths:
            if path != "direct":
                proc, url, admin = start_proxy(engine_url, work, path, path == "proxy", args.max_loras)
                procs.append(proc)
                push(admin, adapters)
                targets[path] = (url, names, proc.pid)
        _, body = http("GET", engine_url + "/v1/models")
        summary["engine_models"] = sorted(m["id"] for m in json.loads(body)["data"])
        print(f"# engine models: {summary['engine_models']}", flush=True)

        # the processes' CPU when idle (the proxy's engine polls, the sim's loop), subtracted from each run's
        # CPU to give the work per request; the raw figures are in the JSON
        pids = {path: pid for path, (_, _, pid) in targets.items() if pid} | {"engine": engine_pid}
        c0, w0 = {k: cpu_seconds(v) for k, v in pids.items()}, time.monotonic()
        time.sleep(args.idle_s)
        idle = {k: (cpu_seconds(v) - c0[k]) / (time.monotonic() - w0) for k, v in pids.items()}
        summary["idle_cpu_ms_per_s"] = {k: round(v * 1000, 3) for k, v in idle.items()}
        print(f"# idle CPU (ms per s, over {args.idle_s:g} s): "
              + ", ".join(f"{k} {v * 1000:.2f}" for k, v in idle.items()), flush=True)

        plan = [(tool, rate, True) for tool in args.tools for rate in args.rates]
        if args.non_streamed and "inference-perf" in args.tools:
            plan.append(("inference-perf", max(args.rates), False))
        print(COLUMNS, flush=True)
        for i, (tool, rate, stream) in enumerate(plan):
            # the path order flips every step, so a warming engine or drifting load hits both alike
            order = list(targets.items())[:: -1 if i % 2 else 1]
            step = []
            for path, (url, model_names, pid) in order:
                r = measure(args, tool, path, url, model_names, pid, engine_pid, rate, stream, idle, work, model)
                r["order"] = len(step)
                step.append(r)
                summary["runs"].append(r)
                if r.get("log_tail") or r.get("error"):
                    print(f"#   {tool} {path}: rc={r.get('rc')} {r.get('error', '')}\n"
                          + "\n".join("#   " + x for x in (r.get("log_tail") or "").splitlines()[-15:]), flush=True)
            direct_rps = next((r.get("rps") for r in step if r["path"] == "direct"), None)
            for r in sorted(step, key=lambda r: list(targets).index(r["path"])):
                if r["path"] != "direct" and direct_rps and r.get("rps"):
                    r["rps_ratio"] = round(r["rps"] / direct_rps, 4)
                print(row(r), flush=True)
        summary["uptime"]["end"] = uptime()
        print(f"# {summary['uptime']['end']}")
    finally:
        stop_all(procs)
        if engine_ctx is not None:
            engine_ctx.__exit__(None, None, None)
        if args.keep:
            print(f"# kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    for r in summary["runs"]:
        r.pop("log_tail", None)
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
