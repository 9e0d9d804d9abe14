"""Defaults of the proxy, importable without aiohttp (the CLI's --help reads them)."""

DEFAULT_CONCURRENCY = 16  # trio-core #63's default; env VLMPOOL_PROXY_CONCURRENCY before the first push
DEFAULT_QUEUE_LIMIT = 1024  # a burst far larger than cortex's ~10 concurrent calls never sees 429
DEFAULT_QUEUE_TIMEOUT_S = 30.0
DEFAULT_REQUEST_TIMEOUT_S = 120.0  # roboflow's VLLM_REQUEST_TIMEOUT_S
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # images travel inline as data URIs
DEFAULT_DRAIN_S = 5.0  # after SIGTERM: unready but serving (proxy/drain.py)
DEFAULT_HEADER_TIMEOUT_S = 20.0  # a request's headers must arrive this soon (and keep-alive idle time)
DEFAULT_BODY_TIMEOUT_S = 60.0  # a request's body must arrive this soon after its headers
DEFAULT_SEND_TIMEOUT_S = 30.0  # a write to a client that makes no progress this long ends the request
DEFAULT_MIN_BODY_RATE = 16 * 1024  # bytes/s a request body must keep up over every BODY_RATE_WINDOW_S
BODY_RATE_WINDOW_S = 5.0
DEFAULT_MAX_ANSWER_BYTES = 32 * 1024 * 1024  # a non-streaming engine answer at most (else 502)
DEFAULT_ADAPTER_ROOT = "/var/lib/vlmpool/adapters"  # manifests/common.py ADAPTER_ROOT: the pods' mount path
