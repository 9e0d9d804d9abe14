"""``vlmpool sim``: run the vLLM simulator.

It takes ``vllm serve``'s arguments: the model may be given positionally (``vlmpool sim MODEL``) or
as ``--model``; the engine flags vLLM would use are honoured (``--served-model-name``,
``--enable-lora``, ``--max-loras``, ``--max-cpu-loras``, ``--max-lora-rank``, ``--max-num-seqs``,
``--max-model-len``, ``--lora-modules``, ``--api-key``, ``--enable-request-id-headers``), and the GPU
and tuning flags an operator passes are accepted and ignored, so the simulator can stand in for the
engine container with the same argument list.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

# vLLM flags accepted and ignored. Value flags take one argument; boolean flags also accept --no-X.
IGNORED_VALUE_FLAGS = (
    "--tensor-parallel-size", "-tp", "--pipeline-parallel-size", "-pp", "--data-parallel-size", "-dp",
    "--gpu-memory-utilization", "--dtype", "--download-dir", "--quantization", "-q",
    "--max-num-batched-tokens", "--kv-cache-dtype", "--seed", "--chat-template", "--uvicorn-log-level", "--lora-dtype",
    "--generation-config", "--override-generation-config", "--tokenizer", "--revision",
    "--tokenizer-revision", "--block-size", "--swap-space", "--cpu-offload-gb",
    "--distributed-executor-backend", "--max-seq-len-to-capture", "--allowed-local-media-path",
    "--tool-call-parser", "--guided-decoding-backend", "--structured-outputs-config",
    "--compilation-config", "-O", "--load-format", "--hf-overrides", "--mm-encoder-tp-mode",
    "--max-logprobs", "--tokenizer-mode", "--config-format", "--response-role", "--root-path",
    "--middleware", "--ssl-keyfile", "--ssl-certfile", "--allowed-origins", "--allowed-methods",
    "--allowed-headers", "--max-lora-extra-vocab-size", "--lora-extra-vocab-size", "--config",
    "--long-lora-scaling-factors", "--default-mm-loras", "--speculative-config", "--scheduling-policy",
    "--api-server-count", "--model-impl", "--mm-processor-cache-gb", "--max-parallel-loading-workers",
)
IGNORED_BOOL_FLAGS = (
    "--enforce-eager", "--trust-remote-code", "--disable-log-requests", "--enable-log-requests",
    "--disable-log-stats", "--enable-prefix-caching", "--enable-chunked-prefill",
    "--disable-frontend-multiprocessing", "--enable-auto-tool-choice", "--disable-uvicorn-access-log",
    "--fully-sharded-loras", "--async-scheduling", "--disable-custom-all-reduce", "--enable-sleep-mode",
    "--enable-server-load-tracking", "--enable-force-include-usage", "--enable-log-outputs",
    "--disable-fastapi-docs", "--enable-prompt-tokens-details", "--skip-tokenizer-init",
    "--enable-tower-connector-lora",
)


def _json_object(text: str) -> dict[str, Any]:
    """A JSON-object flag value, as vLLM's parser reads dict-typed flags (json.loads)."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"Value {text} cannot be converted to JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"Value {text} is not a JSON object")
    return value


def _lora_module(text: str) -> tuple[str, str]:
    if text.startswith("{"):
        try:
            data = json.loads(text)
            return str(data["name"]), str(data["path"])
        except (ValueError, KeyError) as e:
            raise argparse.ArgumentTypeError(f"bad --lora-modules JSON {text!r}: {e}") from None
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora-modules expects name=path, got {text!r}")
    return name, path


def configure(parser: argparse.ArgumentParser) -> None:
    from vlmpool.families import FAMILIES
    from vlmpool.sim.contract import MAX_LORA_RANKS

    parser.add_argument("model_tag", nargs="?", metavar="MODEL",
                        help="model name, as `vllm serve MODEL` takes it (same as --model)")
    parser.add_argument("--model", help="model name or path (what /v1/models reports as root)")
    parser.add_argument("--served-model-name", nargs="+", help="name(s) the model is served under")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    parser.add_argument("--enable-lora", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--max-loras", type=int, default=4, help="distinct adapters per batch")
    parser.add_argument("--max-cpu-loras", type=int, default=None,
                        help="adapters kept loaded (LRU); default = --max-loras")
    parser.add_argument("--max-lora-rank", type=int, default=64, choices=MAX_LORA_RANKS)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=32768)
    parser.add_argument("--lora-modules", nargs="+", type=_lora_module, default=[],
                        help="static adapters name=path (or JSON {name, path}) loaded at start")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    parser.add_argument("--enable-request-id-headers", action=argparse.BooleanOptionalAction, default=False)
    # parsed as vLLM parses them (a JSON object; vLLM's FlexibleArgumentParser uses json.loads) and kept in the
    # config: the pool renders them from spec.model.images / reasoning (manifests/pool.py model_args)
    parser.add_argument("--mm-processor-kwargs", type=_json_object, default=None,
                        help="JSON object passed to the HF processor, e.g. '{\"size\": {\"shortest_edge\": N, "
                             "\"longest_edge\": M}}'")
    parser.add_argument("--limit-mm-per-prompt", type=_json_object, default=None,
                        help="JSON object: items per modality and prompt, e.g. '{\"image\": 4}'")
    parser.add_argument("--reasoning-parser", default=None,
                        help="vLLM reasoning parser name (e.g. qwen3): <think>...</think> goes to message.reasoning")
    sim = parser.add_argument_group("simulator")
    sim.add_argument("--ttft-ms", type=float, default=20.0, help="time to first token")
    sim.add_argument("--tpot-ms", type=float, default=2.0, help="time per further output token")
    sim.add_argument("--lora-load-ms", type=float, default=0.0, help="time to read an adapter from disk")
    sim.add_argument("--lora-load-workers", type=int, default=0,
                     help="adapter loads read at once (0: no bound); vLLM's EngineCore runs add_lora one at a time: 1")
    sim.add_argument("--family", default="auto",
                     help=f"model family whose LoRA layout is checked: {', '.join(FAMILIES)}; "
                          "auto (default) picks it from the model name, else qwen2_5_vl")
    sim.add_argument("--strict-lora-layout", action=argparse.BooleanOptionalAction, default=True,
                     help="refuse adapters whose tensors vLLM would silently ignore (default on)")
    sim.add_argument("--lora-shape-check", choices=("load", "off"), default="load",
                     help="A/B whose rank disagrees with adapter_config.json: refused at load (default, a sim "
                          "extra), or loaded as vLLM does (off). Tensors larger than vLLM's LoRA buffers (rank "
                          "over the maximum; features over the model's, from MODEL/config.json) are refused at "
                          "load either way, as vLLM 0.32 does")
    sim.add_argument("--model-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                     help="count tokens with the model directory's tokenizer when it has one (default on)")
    sim.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=False,
                     help="a thinking model (Qwen3.5): answers open with a thought and </think> unless "
                          "chat_template_kwargs.enable_thinking is false")
    sim.add_argument("--image-tokens", type=int, default=64, help="prompt tokens counted per image")
    sim.add_argument("--allow-runtime-lora", action=argparse.BooleanOptionalAction, default=None,
                     help="mount /v1/load_lora_adapter; default: env VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    faults = parser.add_argument_group("faults (also settable at run time: POST /sim/faults)")
    faults.add_argument("--fault-fail-next-loads", type=int, default=0)
    faults.add_argument("--fault-fail-next-requests", type=int, default=0)
    faults.add_argument("--fault-close-next", type=int, default=0)
    faults.add_argument("--fault-stall-seconds", type=float, default=0.0)
    faults.add_argument("--fault-moderation-phrase", default=None)
    faults.add_argument("--fault-unhealthy", action="store_true")
    faults.add_argument("--fault-kill-engine-on-adapter", default=None, metavar="NAME",
                        help="the first generation through adapter NAME kills the engine")
    ignored = parser.add_argument_group("vLLM flags accepted and ignored")
    for flag in IGNORED_VALUE_FLAGS:
        ignored.add_argument(flag, dest=f"ignored_{flag.lstrip('-').replace('-', '_')}",
                             metavar="X", default=None, help=argparse.SUPPRESS)
    for flag in IGNORED_BOOL_FLAGS:
        ignored.add_argument(flag, dest=f"ignored_{flag.lstrip('-').replace('-', '_')}",
                             action=argparse.BooleanOptionalAction, default=None, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> Any:
    from vlmpool.sim.config import Faults, SimConfig

    model = args.model or args.model_tag
    if not model:
        raise SystemExit("vlmpool sim: a model is required (vlmpool sim MODEL or --model MODEL)")
    faults = Faults(fail_next_loads=args.fault_fail_next_loads,
                    fail_next_requests=args.fault_fail_next_requests,
                    close_next=args.fault_close_next, stall_seconds=args.fault_stall_seconds,
                    moderation_phrase=args.fault_moderation_phrase, unhealthy=args.fault_unhealthy,
                    kill_engine_on_adapter=args.fault_kill_engine_on_adapter)
    cfg = SimConfig(
        model=model, served_model_name=args.served_model_name, host=args.host, port=args.port,
        enable_lora=args.enable_lora, runtime_lora=args.allow_runtime_lora, max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras, max_lora_rank=args.max_lora_rank,
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, ttft_ms=args.ttft_ms,
        tpot_ms=args.tpot_ms, lora_load_ms=args.lora_load_ms, lora_load_workers=args.lora_load_workers,
        family=args.family,
        strict_layout=args.strict_lora_layout, lora_shape_check=args.lora_shape_check, image_tokens=args.image_tokens,
        model_tokenizer=args.model_tokenizer,
        lora_modules=list(args.lora_modules), api_key=args.api_key,
        enable_request_id_headers=args.enable_request_id_headers, faults=faults,
        mm_processor_kwargs=args.mm_processor_kwargs, limit_mm_per_prompt=args.limit_mm_per_prompt,
        thinking=args.thinking, reasoning_parser=args.reasoning_parser)
    try:
        cfg.check()
    except ValueError as e:
        raise SystemExit(f"vlmpool sim: {e}") from None
    return cfg


async def serve(cfg: Any, ready: Any = None) -> None:
    from aiohttp import web

    from vlmpool.sim.server import create_app

    app = create_app(cfg)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    addresses = runner.addresses  # the bound sockets (port 0 picks a free one)
    host, port = addresses[0][:2] if addresses else (cfg.host, cfg.port)
    print(f"vlmpool sim: serving {cfg.served_names()[0]} on http://{host}:{port} "
          f"(lora={'on' if cfg.enable_lora else 'off'}, family={cfg.resolved_family()})",
          file=sys.stderr, flush=True)
    if ready is not None:
        ready(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-main thread / Windows
            pass
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        asyncio.run(serve(cfg))
    except RuntimeError as e:  # static --lora-modules that fail to load, bind errors
        print(f"vlmpool sim: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"vlmpool sim: cannot listen on {cfg.host}:{cfg.port}: {e}", file=sys.stderr)
        return 1
    return 0
