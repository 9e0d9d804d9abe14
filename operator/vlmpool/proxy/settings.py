"""The proxy's settings: ONE table, the only place a setting is declared (importable without aiohttp:
the CLI's --help, the API and the manifests read it).

Every proxy setting is a row: its name (``ProxyConfig``'s field, the CLI's dest), type, default, help,
environment fallback, and, where a pool exposes it, its ``spec.proxy`` field. From the table come:

- the CLI's flags (proxy/cli.py ``configure``): ``--<name with dashes>``, the row's type and default;
- ``ProxyConfig``'s defaults (proxy/server.py): the row's default, or ``in_process`` where a proxy run
  inside another process (tests, bench, ``vlmpool dev``) starts otherwise;
- the ``ProxySpec`` fields of the VLMPool CRD (api/pool.py ``crd_field``): the row's ``crd`` name, bounds
  and description, and its default: the row's, or ``crd_default`` where a pool's default differs;
- the proxy's command line in a pool's pods (manifests/pool.py ``proxy_args``: ``flag_args``).

Two defaults can differ and each says why: the CLI's (what a bare ``vlmpool proxy`` gets) and the CRD's
(what every pod the operator renders gets, since the pod's command line always carries the pool's value).
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import Any

from vlmpool.adminwire import ADAPTER_ROOT

_SAME: Any = object()  # marker: no other default than the row's

THINKING_MODES = ("none", "switch")  # switch: the family's chat template takes enable_thinking (Qwen3.5)



@dataclass(frozen=True)
class Setting:
    name: str  # ProxyConfig's field; the CLI's dest and flag (--name-with-dashes)
    type: type  # int, float, str or bool
    default: Any  # what a bare `vlmpool proxy` gets; ProxyConfig's too unless in_process says otherwise
    help: str  # the CLI's help; "{default}" is the row's default
    env: str | None = None  # read when the flag is not given
    crd: str | None = None  # the ProxySpec field (python name) that sets it in the pods of a pool
    crd_type: builtins.type | None = None  # the CRD field's type where it differs from `type`
    crd_default: Any = _SAME  # a pool's default where it differs from `default` (why: a comment at the row)
    crd_bounds: dict[str, Any] = field(default_factory=dict)  # ge/gt/le of the CRD field
    crd_help: str = ""  # the CRD field's description
    in_process: Any = _SAME  # ProxyConfig's default where it differs from `default`
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def config_default(self) -> Any:
        return self.default if self.in_process is _SAME else self.in_process

    @property
    def pool_default(self) -> Any:
        return self.default if self.crd_default is _SAME else self.crd_default

    def cli_help(self) -> str:
        d = self.default
        return self.help.replace("{default}", f"{d:g}" if isinstance(d, float) else str(d))

    def arg(self, value: Any) -> list[str]:
        """The flag and `value` on a command line (floats as %g: 30.0 -> 30; booleans as --x/--no-x)."""
        if isinstance(value, bool):
            return [self.flag if value else "--no-" + self.flag[2:]]
        return [self.flag, f"{value:g}" if isinstance(value, float) else str(value)]


DEFAULT_ADAPTER_ROOT = ADAPTER_ROOT  # the pods' mount path (adminwire)
DEFAULT_CONCURRENCY = 16  # trio-core #63's default; a pool's too, pushed at run time

SETTINGS: tuple[Setting, ...] = (
    Setting("engine_url", str, "http://127.0.0.1:8000", "the engine's base URL (env VLMPOOL_ENGINE_URL; default "
            "{default})", env="VLMPOOL_ENGINE_URL"),
    Setting("host", str, "0.0.0.0", "address of the public listener (default $VLMPOOL_BIND_HOST, else {default})",
            env="VLMPOOL_BIND_HOST"),
    Setting("admin_host", str, None, "address of the admin listener (default $VLMPOOL_ADMIN_BIND_HOST, else --host)",
            env="VLMPOOL_ADMIN_BIND_HOST"),
    Setting("port", int, 8080, "OpenAI-compatible API port (default {default})", crd="port",
            crd_bounds={"ge": 1024, "le": 65535}, crd_help="OpenAI-compatible port (the Service's target)."),
    Setting("admin_port", int, 8081, "admin API port, operator only (default {default})", crd="admin_port",
            crd_bounds={"ge": 1024, "le": 65535}, crd_help="Admin API port, reached only by the operator."),
    Setting("base_model", str, None, "the engine's served base name (env VLMPOOL_BASE_MODEL; default: asked from "
            "the engine)", env="VLMPOOL_BASE_MODEL"),
    # a pool's concurrency is pushed at run time (never on the command line: changing it rolls no pod)
    Setting("concurrency", int, DEFAULT_CONCURRENCY, "generations in flight at the engine before the first push "
            "(env VLMPOOL_PROXY_CONCURRENCY; default {default}); each push then sets it",
            env="VLMPOOL_PROXY_CONCURRENCY", crd="concurrency", crd_bounds={"ge": 1, "le": 4096},
            crd_help="Requests each pod's proxy lets reach vLLM at once; the operator pushes it to every pod."),
    Setting("max_loras", int, 0, "the engine's --max-loras, exported as max_lora in vllm:lora_requests_info for "
            "a router's LoRA-affinity scoring (default 0: unknown)"),
    # a bare proxy: a burst far larger than cortex's ~10 concurrent calls never sees 429; a pool: 128
    # waiting per pod, the CRD's default since the first release (pools scale out instead)
    Setting("queue_limit", int, 1024, "requests allowed to wait for a slot; beyond -> 429 (default {default})",
            crd="queue_limit", crd_default=128, crd_bounds={"ge": 0, "le": 100_000},
            crd_help="Requests that may wait for a concurrency slot; beyond it the proxy answers 429."),
    Setting("queue_timeout", float, 30.0, "seconds a request may wait for a slot before 429 (default {default})",
            crd="queue_timeout_seconds", crd_default=30, crd_bounds={"gt": 0, "le": 3600},
            crd_help="Longest wait for a slot before a 429 with Retry-After."),
    Setting("request_timeout", float, 120.0, "seconds per engine call (streams: max silence between chunks) "
            "before 503 (default {default})",  # roboflow's VLLM_REQUEST_TIMEOUT_S
            crd="request_timeout_seconds", crd_default=120, crd_bounds={"gt": 0, "le": 86400},
            crd_help="Timeout of one request to vLLM; past it the proxy answers 503."),
    # in process (tests, `vlmpool dev`) a stop is immediate; a pod's proxy stays serving while endpoints catch up
    Setting("drain_seconds", float, 5.0, "after SIGTERM: unready but still serving this long (endpoints catch "
            "up), then in-flight requests finish; GET /drainz (the engine's preStop hook) answers after (default "
            "{default})", in_process=0.0, crd="drain_seconds", crd_type=int, crd_default=5,
            crd_bounds={"ge": 0, "le": 120},
            crd_help="After its pod is told to stop, how long the proxy stays unready but keeps serving new requests "
            "(until Services and gateways stop sending them), before it finishes the ones in flight; the engine's "
            "preStop hook waits for that, so a roll fails no request. 0: stop listening at once."),
    Setting("max_body_bytes", int, 64 * 1024 * 1024,  # images travel inline as data URIs
            "largest request body accepted (default {default})"),
    Setting("max_inflight_body_bytes", int, None, "request body bytes held in memory at once; more wait in the "
            "queue (default 2 x --max-body-bytes)"),
    Setting("header_timeout", float, 20.0, "seconds a connection may take to send a request's headers; also the "
            "keep-alive idle time (default {default})"),
    Setting("body_timeout", float, 60.0, "seconds a request's body may take to arrive, else 408 (default "
            "{default})"),
    Setting("adapter_root", str, DEFAULT_ADAPTER_ROOT, "pushed adapter paths must resolve inside this directory, "
            "no symlinks (env VLMPOOL_ADAPTER_ROOT; default {default}, the pods' mount path; '/' allows any "
            "absolute path, never one with '.' or '..' components)", env="VLMPOOL_ADAPTER_ROOT",
            in_process=None),  # in process: any absolute path without '.'/'..' components
    Setting("send_timeout", float, 30.0, "seconds a write to a client may make no progress (it reads nothing) "
            "before the request ends: connection closed, engine request cancelled, slot freed (default {default})"),
    Setting("min_body_rate", int, 16 * 1024, "bytes/s a request body must keep up over every --body-rate-window, "
            "else 408 body_too_slow (default {default}; 0: no minimum)"),
    Setting("body_rate_window", float, 5.0, "the window of --min-body-rate in seconds (default {default})"),
    Setting("max_answer_bytes", int, 32 * 1024 * 1024, "largest non-streaming engine answer relayed; larger -> "
            "502 engine_answer_too_large (default {default}); streams are relayed piece by piece"),
    Setting("api_key_dir", str, None, "a directory (mounted Secret) whose files' values are the accepted bearer "
            "tokens of the public API; /healthz, /readyz and /metrics stay open (default: no auth)",
            env="VLMPOOL_API_KEY_DIR"),
    Setting("crop_describe", bool, True, "serve POST /v1/vlmpool/crop-describe (default on)", crd="crop_describe",
            crd_help="Serve POST /v1/vlmpool/crop-describe (trio-core's zoom-panel endpoint: detections composed "
            "beside the frame into one image, one generation, per-panel descriptions). false: the route answers 404."),
    Setting("thinking", str, "none", "switch: the model's chat template takes chat_template_kwargs.enable_thinking "
            "(Qwen3.5), so crop-describe forwards a request's enable_thinking; none (default): never forwarded",
            choices=THINKING_MODES),
    Setting("load_parallelism", int, 4, "adapter loads at once while converging, until a push sets it (env "
            "VLMPOOL_LOAD_PARALLELISM; default {default}, at most 64)", env="VLMPOOL_LOAD_PARALLELISM"),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
BY_CRD: dict[str, Setting] = {s.crd: s for s in SETTINGS if s.crd}


def default(name: str) -> Any:
    """A setting's default, as a bare `vlmpool proxy` gets it."""
    return BY_NAME[name].default


def config_default(name: str) -> Any:
    """A setting's default in ProxyConfig (an in-process proxy)."""
    return BY_NAME[name].config_default


def crd_field(crd: str, **extra: Any) -> Any:
    """The pydantic Field of a ProxySpec field declared by a setting: its pool default, bounds, description."""
    from pydantic import Field

    s = BY_CRD[crd]
    return Field(default=s.pool_default, **s.crd_bounds, description=s.crd_help, **extra)


def flag_args(key: str, value: Any) -> list[str]:
    """The command-line arguments carrying a setting's value, the setting named by its ProxySpec field or
    its own name (manifests/pool.py proxy_args)."""
    return (BY_CRD.get(key) or BY_NAME[key]).arg(value)
