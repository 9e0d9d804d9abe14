"""The simulator's settings: :class:`SimConfig` (its flags) and :class:`Faults` (run-time switches)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from vlmpool.sim import adapters as adapters_mod
from vlmpool.sim import contract


@dataclass
class Faults:
    """Run-time fault switches (``POST /sim/faults``, or ``--fault-*`` flags)."""

    fail_next_loads: int = 0          # next N load_lora_adapter calls answer 500
    fail_next_requests: int = 0       # next N generation requests answer 500 (engine error)
    close_next: int = 0               # next N generation requests: connection closed, no answer
    stall_seconds: float = 0.0        # every generation stalls this long once admitted (ended early
                                      # by any POST /sim/faults)
    moderation_phrase: str | None = None  # prompt containing it (case-insensitive) → 400
    # the first generation through this adapter (by name) kills the engine, as an exception in a model step
    # does (vLLM's EngineDeadError for it and every later request, /health 503): for the proxy's handling
    kill_engine_on_adapter: str | None = None
    unhealthy: bool = False           # /health answers 503

    def update(self, data: dict[str, Any]) -> None:
        known = {f.name: f for f in fields(self)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown fault switch(es): {', '.join(unknown)}; known: {', '.join(known)}")
        for key, value in data.items():
            current = getattr(self, key)
            if key in ("moderation_phrase", "kill_engine_on_adapter"):
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"{key} must be a string or null")
                setattr(self, key, value or None)
            elif isinstance(current, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{key} must be a boolean")
                setattr(self, key, value)
            elif isinstance(current, int):
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"{key} must be a non-negative integer")
                setattr(self, key, value)
            else:
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"{key} must be a non-negative number")
                setattr(self, key, float(value))

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class SimConfig:
    model: str
    served_model_name: str | list[str] | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    enable_lora: bool = False
    # None: read VLLM_ALLOW_RUNTIME_LORA_UPDATING from the environment, as vLLM does.
    runtime_lora: bool | None = None
    max_loras: int = 4
    max_cpu_loras: int | None = None  # None: = max_loras (vLLM's default)
    max_lora_rank: int = 64
    max_num_seqs: int = 256
    max_model_len: int = 32768
    ttft_ms: float = 20.0
    tpot_ms: float = 2.0
    lora_load_ms: float = 0.0
    # disk reads at once; 0: no bound. vLLM's EngineCore runs add_lora utility calls one at a time: 1
    lora_load_workers: int = 0
    family: str = "auto"  # auto: from the model name (Qwen3-VL → qwen3_vl, ...), else qwen2_5_vl
    strict_layout: bool = True
    # "load": refuse A/B whose rank disagrees with adapter_config.json (a labelled sim extra); "off": as vLLM,
    # which copies what fits its buffers. Tensors larger than the buffers are refused at load either way.
    lora_shape_check: str = "load"
    # count tokens with the model directory's tokenizer when it has one (transformers' AutoTokenizer)
    model_tokenizer: bool = True
    image_tokens: int = 64
    thinking: bool = False  # a thinking model (Qwen3.5): answers open with a thought unless enable_thinking is false
    lora_modules: list[tuple[str, str]] = field(default_factory=list)  # static, loaded at start
    api_key: str | None = None
    enable_request_id_headers: bool = False
    faults: Faults = field(default_factory=Faults)
    # vLLM --mm-processor-kwargs / --limit-mm-per-prompt (JSON objects) and --reasoning-parser, as given
    mm_processor_kwargs: dict[str, Any] | None = None
    limit_mm_per_prompt: dict[str, Any] | None = None
    reasoning_parser: str | None = None  # the thought goes to message.reasoning (vLLM's qwen3 parser)

    def served_names(self) -> list[str]:
        if self.served_model_name is None:
            return [self.model]
        if isinstance(self.served_model_name, str):
            return [self.served_model_name]
        return list(self.served_model_name) or [self.model]

    def check(self) -> None:
        if self.max_lora_rank not in contract.MAX_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {contract.MAX_LORA_RANKS}, got {self.max_lora_rank}")
        if self.max_loras < 1:
            raise ValueError(f"max_loras ({self.max_loras}) must be >= 1")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.lora_shape_check not in adapters_mod.SHAPE_CHECKS:
            raise ValueError(f"lora_shape_check must be one of {adapters_mod.SHAPE_CHECKS}")
        if self.ttft_ms < 0 or self.tpot_ms < 0 or self.lora_load_ms < 0:
            raise ValueError("latencies must be >= 0")
        if self.lora_load_workers < 0:
            raise ValueError("lora_load_workers must be >= 0 (0: no bound)")
        adapters_mod.family(self.resolved_family())
        if self.reasoning_parser and self.reasoning_parser not in contract.REASONING_PARSERS:
            raise ValueError(contract.invalid_reasoning_parser(self.reasoning_parser))
        for modality, limit in (self.limit_mm_per_prompt or {}).items():
            count = limit.get("count") if isinstance(limit, dict) else limit
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ValueError(f"--limit-mm-per-prompt: the limit of {modality!r} must be a non-negative "
                                 f"integer, got {limit!r}")

    def resolved_family(self) -> str:
        return adapters_mod.detect_family(self.model) if self.family == "auto" else self.family
