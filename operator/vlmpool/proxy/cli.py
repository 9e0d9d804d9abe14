"""`vlmpool proxy`: run the OpenAI-compatible proxy in front of a pod's engine."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys

ENV_CONCURRENCY = "VLMPOOL_PROXY_CONCURRENCY"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"vlmpool proxy: {name}={raw!r} is not an integer") from None
    if value < 1:
        raise SystemExit(f"vlmpool proxy: {name} must be >= 1 (got {value})")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    from . import defaults as s  # no aiohttp import for --help

    parser.add_argument("--engine-url", default=None,
                        help="the engine's base URL (env VLMPOOL_ENGINE_URL; default http://127.0.0.1:8000)")
    parser.add_argument("--host", default=os.environ.get("VLMPOOL_BIND_HOST", "0.0.0.0"),
                        help="address of the public listener (default $VLMPOOL_BIND_HOST, else 0.0.0.0)")
    parser.add_argument("--admin-host", default=os.environ.get("VLMPOOL_ADMIN_BIND_HOST") or None,
                        help="address of the admin listener (default $VLMPOOL_ADMIN_BIND_HOST, else --host)")
    parser.add_argument("--port", type=int, default=8080, help="OpenAI-compatible API port (default 8080)")
    parser.add_argument("--admin-port", type=int, default=8081, help="admin API port, operator only (default 8081)")
    parser.add_argument("--base-model", default=None,
                        help="the engine's served base name (env VLMPOOL_BASE_MODEL; default: asked from the engine)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help=f"generations in flight at the engine before the first push (env {ENV_CONCURRENCY}; "
                             f"default {s.DEFAULT_CONCURRENCY}); each push then sets it")
    parser.add_argument("--max-loras", type=int, default=0,
                        help="the engine's --max-loras, exported as max_lora in vllm:lora_requests_info for "
                             "a router's LoRA-affinity scoring (default 0: unknown)")
    parser.add_argument("--queue-limit", type=int, default=s.DEFAULT_QUEUE_LIMIT,
                        help=f"requests allowed to wait for a slot; beyond -> 429 (default {s.DEFAULT_QUEUE_LIMIT})")
    parser.add_argument("--queue-timeout", type=float, default=s.DEFAULT_QUEUE_TIMEOUT_S,
                        help="seconds a request may wait for a slot before 429 "
                             f"(default {s.DEFAULT_QUEUE_TIMEOUT_S:g})")
    parser.add_argument("--request-timeout", type=float, default=s.DEFAULT_REQUEST_TIMEOUT_S,
                        help="seconds per engine call (streams: max silence between chunks) before 503 "
                             f"(default {s.DEFAULT_REQUEST_TIMEOUT_S:g})")
    parser.add_argument("--drain-seconds", type=float, default=s.DEFAULT_DRAIN_S,
                        help="after SIGTERM: unready but still serving this long (endpoints catch up), then "
                             "in-flight requests finish; GET /drainz (the engine's preStop hook) answers after "
                             f"(default {s.DEFAULT_DRAIN_S:g})")
    parser.add_argument("--max-body-bytes", type=int, default=s.DEFAULT_MAX_BODY_BYTES,
                        help=f"largest request body accepted (default {s.DEFAULT_MAX_BODY_BYTES})")
    parser.add_argument("--max-inflight-body-bytes", type=int, default=None,
                        help="request body bytes held in memory at once; more wait in the queue "
                             "(default 2 x --max-body-bytes)")
    parser.add_argument("--header-timeout", type=float, default=s.DEFAULT_HEADER_TIMEOUT_S,
                        help="seconds a connection may take to send a request's headers; also the keep-alive "
                             f"idle time (default {s.DEFAULT_HEADER_TIMEOUT_S:g})")
    parser.add_argument("--body-timeout", type=float, default=s.DEFAULT_BODY_TIMEOUT_S,
                        help="seconds a request's body may take to arrive, else 408 "
                             f"(default {s.DEFAULT_BODY_TIMEOUT_S:g})")
    parser.add_argument("--adapter-root", default=os.environ.get("VLMPOOL_ADAPTER_ROOT") or s.DEFAULT_ADAPTER_ROOT,
                        help="pushed adapter paths must resolve inside this directory, no symlinks (env "
                             f"VLMPOOL_ADAPTER_ROOT; default {s.DEFAULT_ADAPTER_ROOT}, the pods' mount path; '/' "
                             "allows any absolute path, never one with '.' or '..' components)")
    parser.add_argument("--send-timeout", type=float, default=s.DEFAULT_SEND_TIMEOUT_S,
                        help="seconds a write to a client may make no progress (it reads nothing) before the "
                             "request ends: connection closed, engine request cancelled, slot freed "
                             f"(default {s.DEFAULT_SEND_TIMEOUT_S:g})")
    parser.add_argument("--min-body-rate", type=int, default=s.DEFAULT_MIN_BODY_RATE,
                        help=f"bytes/s a request body must keep up over every {s.BODY_RATE_WINDOW_S:g} s, else 408 "
                             f"body_too_slow (default {s.DEFAULT_MIN_BODY_RATE}; 0: no minimum)")
    parser.add_argument("--body-rate-window", type=float, default=s.BODY_RATE_WINDOW_S,
                        help=f"the window of --min-body-rate in seconds (default {s.BODY_RATE_WINDOW_S:g})")
    parser.add_argument("--max-answer-bytes", type=int, default=s.DEFAULT_MAX_ANSWER_BYTES,
                        help="largest non-streaming engine answer relayed; larger -> 502 engine_answer_too_large "
                             f"(default {s.DEFAULT_MAX_ANSWER_BYTES}); streams are relayed piece by piece")
    parser.add_argument("--api-key-dir", default=os.environ.get("VLMPOOL_API_KEY_DIR") or None,
                        help="a directory (mounted Secret) whose files' values are the accepted bearer tokens "
                             "of the public API; /healthz, /readyz and /metrics stay open (default: no auth)")
    parser.add_argument("--crop-describe", action=argparse.BooleanOptionalAction, default=True,
                        help="serve POST /v1/vlmpool/crop-describe (default on)")
    parser.add_argument("--thinking", choices=("none", "switch"), default="none",
                        help="switch: the model's chat template takes chat_template_kwargs.enable_thinking (Qwen3.5), "
                             "so crop-describe forwards a request's enable_thinking; none (default): never forwarded")
    parser.add_argument("--load-parallelism", type=int, default=None,
                        help="adapter loads at once while converging, until a push sets it "
                             "(env VLMPOOL_LOAD_PARALLELISM; default 4, at most 64)")
    parser.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    parser.add_argument("--log-level", default=os.environ.get("VLMPOOL_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"], help="log level (JSON lines on stderr)")


def build_config(args: argparse.Namespace):
    from .defaults import DEFAULT_CONCURRENCY
    from .server import ProxyConfig

    concurrency = args.concurrency if args.concurrency is not None else _env_int(ENV_CONCURRENCY, DEFAULT_CONCURRENCY)
    config = ProxyConfig(
        engine_url=args.engine_url or os.environ.get("VLMPOOL_ENGINE_URL") or "http://127.0.0.1:8000",
        host=args.host,
        port=args.port,
        admin_host=args.admin_host,
        admin_port=args.admin_port,
        admin_token=read_admin_token(),
        base_model=args.base_model or os.environ.get("VLMPOOL_BASE_MODEL") or None,
        concurrency=concurrency,
        queue_limit=args.queue_limit,
        max_loras=args.max_loras,
        queue_timeout=args.queue_timeout,
        request_timeout=args.request_timeout,
        drain_seconds=args.drain_seconds,
        max_body_bytes=args.max_body_bytes,
        max_inflight_body_bytes=args.max_inflight_body_bytes,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        send_timeout=args.send_timeout,
        min_body_rate=args.min_body_rate,
        body_rate_window=args.body_rate_window,
        max_answer_bytes=args.max_answer_bytes,
        adapter_root=args.adapter_root,
        api_key_dir=args.api_key_dir,
        access_log=not args.no_access_log,
        crop_describe=args.crop_describe,
        thinking=args.thinking,
        load_parallelism=(args.load_parallelism if args.load_parallelism is not None
                          else _env_int("VLMPOOL_LOAD_PARALLELISM", 4)),
    )
    config.validate()
    return config


def read_admin_token(env: dict[str, str] | os._Environ = os.environ) -> str | None:
    token = env.get("VLMPOOL_ADMIN_TOKEN")
    if token:
        return token.strip()
    path = env.get("VLMPOOL_ADMIN_TOKEN_FILE")
    if path:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
        if not token:
            raise ValueError(f"VLMPOOL_ADMIN_TOKEN_FILE {path} is empty")
        return token
    return None


async def _serve(config) -> int:
    from .logs import get_logger
    from .server import start_proxy, stop_proxy

    log = get_logger()
    running, runners = await start_proxy(config)
    # everything allocated so far lives as long as the process: keep it out of the collector's scans
    # (shorter full collections on the request path)
    gc.collect()
    gc.freeze()
    log.info(
        "proxy listening",
        extra={"bind": running.bind, "admin_bind": running.admin_bind, "engine_url": config.engine_url,
               "api_keys": config.api_key_dir is not None, "adapter_root": config.adapter_root,
               "concurrency": config.concurrency, "queue_limit": config.queue_limit,
               "base_model": config.base_model},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:  # pragma: no cover
            pass
    await stop.wait()
    log.info("shutting down: finishing in-flight requests", extra={"timeout_s": config.shutdown_timeout})
    await stop_proxy(running, runners)
    return 0


def run(args: argparse.Namespace) -> int:
    from .logs import configure_logging

    configure_logging(args.log_level)
    try:
        config = build_config(args)
    except (ValueError, OSError) as e:
        print(f"vlmpool proxy: {e}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        uvloop = None  # type: ignore[assignment]  # the optional-import idiom mypy cannot type
    if uvloop is not None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_serve(config))
    return asyncio.run(_serve(config))
