"""`vlmpool proxy`: run the OpenAI-compatible proxy in front of a pod's engine."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .settings import Setting


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
    """One flag per row of the settings table (proxy/settings.py), plus the log's own two."""
    from .settings import SETTINGS  # no aiohttp import for --help

    for s in SETTINGS:
        if s.type is bool:
            parser.add_argument(s.flag, action=argparse.BooleanOptionalAction, default=s.default, help=s.cli_help())
            continue
        # a flag with an environment fallback defaults to None: build_config reads the environment
        parser.add_argument(s.flag, type=s.type, default=None if s.env else s.default, choices=s.choices,
                            help=s.cli_help())
    parser.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    parser.add_argument("--log-level", default=os.environ.get("VLMPOOL_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"], help="log level (JSON lines on stderr)")


def _value(args: argparse.Namespace, s: Setting) -> Any:
    """A setting's value: its flag, else its environment variable (an empty one is unset), else its default."""
    given = getattr(args, s.name)
    if (given is not None and given != "") or s.env is None:
        return given
    if s.type is int:
        return _env_int(s.env, s.default)
    return os.environ.get(s.env) or s.default


def build_config(args: argparse.Namespace):
    from .server import ProxyConfig
    from .settings import SETTINGS

    config = ProxyConfig(
        **{s.name: _value(args, s) for s in SETTINGS},
        admin_token=read_admin_token(),
        access_log=not args.no_access_log,
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
