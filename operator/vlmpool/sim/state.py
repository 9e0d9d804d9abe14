"""The state every route of the simulator shares: its config, fault switches and engine."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from typing import Any

from aiohttp import web

from vlmpool.sim import adapters as adapters_mod
from vlmpool.sim import contract
from vlmpool.sim.config import SimConfig
from vlmpool.sim.engine import Engine
from vlmpool.sim.parsing import RequestError
from vlmpool.sim.tokens import ModelTokenizer


class SimState:
    """What the route groups share: config, served names, fault switches, the engine."""

    def __init__(self, config: SimConfig) -> None:
        config.check()
        self.config = config
        self.names = config.served_names()
        self.base_name = self.names[0]
        self.faults = config.faults
        self.runtime_lora = (config.runtime_lora if config.runtime_lora is not None
                             else contract.env_flag(os.environ.get(contract.RUNTIME_LORA_ENV)))
        self.engine = Engine(
            model_name=self.base_name, max_num_seqs=config.max_num_seqs, max_loras=config.max_loras,
            max_cpu_loras=config.max_cpu_loras or config.max_loras, max_lora_rank=config.max_lora_rank,
            family=config.resolved_family(), strict_layout=config.strict_layout, enable_lora=config.enable_lora,
            lora_load_ms=config.lora_load_ms, shape_check=config.lora_shape_check,
            lora_load_workers=config.lora_load_workers,
            model_dims=adapters_mod.ModelDims.from_model_dir(config.model))
        # token counts from the model directory's tokenizer when it has one (else words, see parsing.py)
        self.tokens = ModelTokenizer.load(config.model) if config.model_tokenizer else None
        self.created = int(time.time())
        # vLLM: "vllm-<release>-<hash of the engine's config>"; here a hash of the model and its served names
        digest = hashlib.sha256(json.dumps([config.model, self.names]).encode()).hexdigest()[:8]
        self.system_fingerprint = f"vllm-{contract.VLLM_RELEASE}-{digest}"
        self._stall_release = asyncio.Event()

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        ctype = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise RequestError(contract.bad_request(
                "Unsupported Media Type: Only 'application/json' is allowed"))
        try:
            data = await request.json(loads=json.loads)
        except ValueError as e:
            raise RequestError(contract.bad_request(f"JSON decode error: {e}")) from None
        if not isinstance(data, dict):
            raise RequestError(contract.bad_request("Input should be a valid dictionary"))
        return data
