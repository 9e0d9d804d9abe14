"""The proxy's configuration: ``ProxyConfig``, whose settings are the rows of proxy/settings.py (the one
place each is declared), plus what no flag sets, and its validation."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from vlmpool.adminwire import MAX_LOAD_PARALLELISM

from .settings import THINKING_MODES, config_default


def _d(name: str):
    """ProxyConfig's default of a setting (proxy/settings.py, the one place each is declared)."""
    return field(default=config_default(name))


@dataclass
class ProxyConfig:
    """The proxy's settings (the rows of proxy/settings.py; their defaults are the table's, `in_process`
    where a proxy run inside another process starts otherwise), plus what no flag sets."""

    engine_url: str = _d("engine_url")
    host: str = _d("host")
    port: int = _d("port")
    admin_host: str | None = _d("admin_host")  # None: host
    admin_port: int = _d("admin_port")
    admin_token: str | None = None  # env VLMPOOL_ADMIN_TOKEN(_FILE) only: never on a command line
    base_model: str | None = _d("base_model")
    concurrency: int = _d("concurrency")
    queue_limit: int = _d("queue_limit")
    max_loras: int = _d("max_loras")  # exported for routers (vllm:lora_requests_info max_lora)
    queue_timeout: float = _d("queue_timeout")
    request_timeout: float = _d("request_timeout")
    max_body_bytes: int = _d("max_body_bytes")
    max_inflight_body_bytes: int | None = _d("max_inflight_body_bytes")  # None: 2 x max_body_bytes
    header_timeout: float = _d("header_timeout")
    body_timeout: float = _d("body_timeout")
    min_body_rate: int = _d("min_body_rate")
    body_rate_window: float = _d("body_rate_window")
    send_timeout: float = _d("send_timeout")
    max_answer_bytes: int = _d("max_answer_bytes")
    adapter_root: str | None = _d("adapter_root")  # None: any absolute path without '.'/'..' components
    api_key_dir: str | None = _d("api_key_dir")
    access_log: bool = True  # the CLI's --no-access-log
    shutdown_timeout: float = 30.0
    drain_seconds: float = _d("drain_seconds")
    load_parallelism: int = _d("load_parallelism")
    retry_interval: float = 5.0  # re-try loads that met an unreachable engine this often (0: never)
    crop_describe: bool = _d("crop_describe")
    thinking: str = _d("thinking")

    def validate(self) -> None:
        problems = []
        if not self.admin_token:
            problems.append(
                "an admin token is required: set VLMPOOL_ADMIN_TOKEN or VLMPOOL_ADMIN_TOKEN_FILE "
                "(the admin API is never served without one)"
            )
        if self.concurrency < 1:
            problems.append(f"concurrency must be >= 1 (got {self.concurrency})")
        if not 0 <= self.drain_seconds <= 600:
            problems.append(f"drain seconds must be 0..600 (got {self.drain_seconds:g})")
        if not 1 <= self.load_parallelism <= MAX_LOAD_PARALLELISM:
            problems.append(f"load parallelism must be 1..{MAX_LOAD_PARALLELISM} (got {self.load_parallelism})")
        if self.queue_limit < 0:
            problems.append(f"queue limit must be >= 0 (got {self.queue_limit})")
        if self.queue_timeout <= 0:
            problems.append(f"queue timeout must be > 0 seconds (got {self.queue_timeout})")
        if self.request_timeout <= 0:
            problems.append(f"request timeout must be > 0 seconds (got {self.request_timeout})")
        if self.max_inflight_body_bytes is not None and self.max_inflight_body_bytes < self.max_body_bytes:
            problems.append(f"max in-flight body bytes ({self.max_inflight_body_bytes}) must be >= max body bytes "
                            f"({self.max_body_bytes})")
        if self.header_timeout <= 0 or self.body_timeout <= 0 or self.send_timeout <= 0:
            problems.append("header, body and send timeouts must be > 0 seconds")
        if self.min_body_rate < 0 or self.body_rate_window <= 0:
            problems.append(f"min body rate must be >= 0 bytes/s (got {self.min_body_rate}) over a window > 0 s "
                            f"(got {self.body_rate_window:g})")
        if self.max_answer_bytes < 1024:
            problems.append(f"max answer bytes must be >= 1024 (got {self.max_answer_bytes})")
        if self.api_key_dir is not None and not os.path.isdir(self.api_key_dir):
            problems.append(f"API key directory {self.api_key_dir} does not exist")
        if self.adapter_root is not None and not self.adapter_root.startswith("/"):
            problems.append(f"adapter root must be an absolute path (got {self.adapter_root!r})")
        if self.thinking not in THINKING_MODES:
            problems.append(f"thinking must be one of {', '.join(THINKING_MODES)} (got {self.thinking!r})")
        if not self.engine_url.startswith(("http://", "https://")):
            problems.append(f"engine URL must be http(s)://host:port (got {self.engine_url!r})")
        if problems:
            raise ValueError("; ".join(problems))
