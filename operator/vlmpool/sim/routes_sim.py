"""The simulator's own control routes (not vLLM): ``GET|POST /sim/faults``, ``POST /sim/forget``,
``GET /sim/stats``, ``POST /sim/stats/reset``."""

from __future__ import annotations

import asyncio

from aiohttp import web

from vlmpool.sim.state import SimState


class SimControlRoutes(SimState):
    """Fault switches, forgetting adapters, and the statistics the tests read."""

    async def get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.faults.as_dict())

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
        except ValueError:
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        if not isinstance(data, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        try:
            self.faults.update(data)
        except ValueError as e:
            return web.json_response({"error": str(e)}, status=400)
        # requests stalled under the previous settings go on now
        self._stall_release.set()
        self._stall_release = asyncio.Event()
        return web.json_response(self.faults.as_dict())

    async def forget(self, request: web.Request) -> web.Response:
        forgotten = list(self.engine.registered)
        self.engine.forget()
        return web.json_response({"forgotten": forgotten})

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.engine.stats())

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.engine.reset_counters()
        return web.json_response(self.engine.stats())
