"""vLLM's runtime LoRA routes on the simulator: ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter`` (vLLM: ``entrypoints/serve/lora/api_router.py``,
``entrypoints/openai/models/serving.py``). Mounted only when runtime LoRA updating is allowed."""

from __future__ import annotations

from aiohttp import web

from vlmpool.sim import adapters as adapters_mod
from vlmpool.sim import contract
from vlmpool.sim.parsing import error_response, json_response
from vlmpool.sim.state import SimState


class LoraRoutes(SimState):
    """Load and unload adapters at run time, with vLLM's checks, order and texts."""

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        for key in ("lora_name", "lora_path"):
            if key not in body:
                return error_response(contract.request_field_missing(key, len(body)))
            if not isinstance(body[key], str):
                return error_response(contract.bad_request(
                    f"1 validation error for LoadLoRAAdapterRequest\n{key}\n  Input should be a valid string"))
        name, path = body["lora_name"], body["lora_path"]
        load_inplace = bool(body.get("load_inplace", False))
        engine = self.engine
        async with engine.lock_for(name):
            if not name or not path:
                return error_response(contract.lora_missing_fields())
            if name in self.names:
                return error_response(contract.lora_conflicts_with_base(name))
            if not load_inplace and name in engine.registered:
                return error_response(contract.lora_already_loaded(name))
            if self.faults.fail_next_loads > 0:
                self.faults.fail_next_loads -= 1
                return error_response(contract.engine_utility_failure(
                    "add_lora", "simulated load failure (vlmpool sim fault: fail_next_loads)"))
            if not self.config.enable_lora:
                return error_response(contract.engine_utility_failure(
                    "add_lora", "LoRA is not enabled. Use --enable-lora to enable LoRA."))
            if engine.dead:
                return error_response(contract.engine_dead())
            try:
                info = await engine.read_adapter(name, path)
            except adapters_mod.AdapterError as e:
                return json_response(e.status, e.body)
            engine.register(name, path, info)
        return web.Response(status=200, text=contract.lora_load_success(name))

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        if "lora_name" not in body:
            return error_response(contract.request_field_missing("lora_name", len(body)))
        name = body.get("lora_name")
        if name is not None and not isinstance(name, str):
            return error_response(contract.bad_request(
                "1 validation error for UnloadLoRAAdapterRequest\nlora_name\n  Input should be a valid string"))
        engine = self.engine
        async with engine.lock_for(name or ""):
            if not name:
                return error_response(contract.lora_unload_missing_name())
            if name not in engine.registered:
                return error_response(contract.lora_not_found_on_unload(name))
            engine.unregister(name)
        return web.Response(status=200, text=contract.lora_unload_success(name))
