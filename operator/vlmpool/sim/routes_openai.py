"""vLLM's OpenAI routes on the simulator: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models`` (vLLM: ``entrypoints/openai/chat_completion``, ``completion``, ``models``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

from aiohttp import web

from vlmpool.sim import adapters as adapters_mod
from vlmpool.sim import answers, contract
from vlmpool.sim import schema as schema_mod
from vlmpool.sim.engine import Seq
from vlmpool.sim.parsing import PIECE, RequestError, chat_prompt, completion_prompts
from vlmpool.sim.state import SimState


class OpenAIRoutes(SimState):
    """``/v1/models`` and generation (chat and completions, whole or streamed)."""

    def _permission(self) -> dict[str, Any]:
        return {"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission",
                "created": self.created, "allow_create_engine": False, "allow_sampling": True,
                "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False}

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "vllm",
                 "root": self.config.model, "parent": None,
                 "max_model_len": self.config.max_model_len, "permission": [self._permission()]}
                for name in self.names]
        for reg in self.engine.registered.values():
            data.append({"id": reg.name, "object": "model", "created": int(reg.loaded_at),
                         "owned_by": "vllm", "root": reg.path, "parent": self.base_name,
                         "max_model_len": None, "permission": [self._permission()]})
        return web.json_response({"object": "list", "data": data})

    # -- generation

    def _resolve_model(self, model: Any) -> tuple[str, str | None, str | None]:
        """(response model name, lora name or None, lora path or None) — or 404 as vLLM.

        vLLM answers with ``models.model_name(lora_request)``: the adapter's name, or the *first*
        served name for the base model (also when the request used another alias or no model)."""
        if model is None or model == "" or model in self.names:
            return self.base_name, None, None
        if not isinstance(model, str):
            raise RequestError(contract.bad_request("model must be a string", param="model"))
        reg = self.engine.registered.get(model)
        if reg is None:
            raise RequestError(contract.model_not_found(model, self.names))
        return model, reg.name, reg.path

    def _request_id(self, request: web.Request, prefix: str) -> str:
        rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        return f"{prefix}-{rid}"

    def _max_tokens(self, body: dict[str, Any], prompt_tokens: int, chat: bool) -> int:
        value = body.get("max_completion_tokens") if chat else None
        if value is None:
            value = body.get("max_tokens")
        max_len = self.config.max_model_len
        if isinstance(value, int) and not isinstance(value, bool) and value > max_len:
            raise RequestError(contract.max_tokens_over_model_len(value, max_len))
        if prompt_tokens > max_len:  # vLLM: the prompt alone over the limit is refused (400)
            raise RequestError(contract.max_model_len_exceeded(max_len, prompt_tokens))
        limit = max_len - prompt_tokens
        if value is None:
            return max(limit, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RequestError(contract.validation_error(f"max_tokens must be at least 1, got {value}.",
                                                         "max_tokens", value))
        return max(min(value, limit), 1)  # vLLM clamps max_tokens to what the context leaves

    def _answer_text(self, body: dict[str, Any], served: str, lora_path: str | None, images: int,
                     echo: str, chat: bool) -> str:
        text, want_json = self._answer(body, served, lora_path, images, echo)
        if chat and self.config.thinking and (not want_json or self.config.reasoning_parser) \
                and answers.thinking_enabled(body):
            text = answers.with_thought(text, images)
        return text

    def _answer(self, body: dict[str, Any], served: str, lora_path: str | None, images: int,
                echo: str) -> tuple[str, bool]:
        tag = f"sim:{served}" + (f" path={lora_path}" if lora_path else "")
        header = f"{tag} images={images}"
        fmt = body.get("response_format")
        json_schema = None
        want_json = False
        if isinstance(fmt, dict):
            kind = fmt.get("type")
            if kind == "json_schema":
                js = fmt.get("json_schema")
                if not isinstance(js, dict):
                    raise RequestError(contract.bad_request(
                        "response_format.json_schema is required for type json_schema", param="response_format"))
                json_schema = js.get("schema", js.get("json_schema", {}))
                want_json = True
            elif kind == "json_object":
                want_json = True
            elif kind not in (None, "text"):
                raise RequestError(contract.bad_request(
                    f"response_format type {kind!r} is not supported", param="response_format"))
        elif fmt is not None:
            raise RequestError(contract.bad_request("response_format must be an object", param="response_format"))
        # vLLM's own structured-output knobs (older guided_json, newer structured_outputs.json)
        if not want_json:
            so = body.get("structured_outputs")
            if isinstance(so, dict) and so.get("json") is not None:
                json_schema, want_json = so["json"], True
            elif body.get("guided_json") is not None:
                json_schema, want_json = body["guided_json"], True
            if isinstance(json_schema, str):
                try:
                    json_schema = json.loads(json_schema)
                except ValueError:
                    raise RequestError(contract.bad_request("guided_json is not valid JSON")) from None
        if want_json:
            if json_schema is None:
                value: Any = {"model": tag, "images": images, "echo": " ".join(echo.split()[:12])}
            else:
                try:
                    value = schema_mod.instance(json_schema, tag)
                except schema_mod.SchemaError as e:
                    raise RequestError(contract.bad_request(
                        f"The provided JSON schema contains features not supported by the simulator: {e}",
                        param="response_format")) from None
            return json.dumps(value, separators=(", ", ": "), ensure_ascii=False), True
        panels = answers.panels_in(echo)
        if panels:  # the proxy's crop-describe prompt: one CROPS line per panel it lists
            return answers.crop_answer(panels, header), False
        words = echo.split()[:12]
        return header + (" echo: " + " ".join(words) if words else ""), False

    def _plan(self, body: dict[str, Any], text: str, max_tokens: int) -> tuple[list[str], str]:
        pieces = PIECE.findall(text) or [text]
        min_tokens = body.get("min_tokens") or 0
        if body.get("ignore_eos"):
            min_tokens = max_tokens
        if not isinstance(min_tokens, int) or min_tokens < 0:
            raise RequestError(contract.bad_request("min_tokens must be a non-negative integer", param="min_tokens"))
        if min_tokens > max_tokens:
            raise RequestError(contract.bad_request(
                f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.",
                param="min_tokens"))
        i = 0
        while len(pieces) < min_tokens:
            pieces.append(f" tok{i}")
            i += 1
        if len(pieces) > max_tokens or body.get("ignore_eos"):
            return pieces[:max_tokens], "length"  # with ignore_eos only max_tokens ends a sequence
        return pieces, "stop"

    async def _pre_generation(self, request: web.Request) -> None:
        if self.faults.close_next > 0:
            self.faults.close_next -= 1
            _drop_connection(request)
            raise _Dropped()
        if self.faults.fail_next_requests > 0:
            self.faults.fail_next_requests -= 1
            raise RequestError(contract.error_json(
                "simulated engine failure (vlmpool sim fault: fail_next_requests)", "InternalServerError", 500))

    def _moderation(self, prompt_text: str) -> None:
        phrase = self.faults.moderation_phrase
        if phrase and phrase.lower() in prompt_text.lower():
            raise RequestError(contract.error_json(contract.MODERATION_MESSAGE, contract.MODERATION_TYPE, 400))

    async def _admit(self, seq: Seq) -> None:
        engine = self.engine
        if engine.dead:
            raise RequestError(contract.engine_dead())
        await engine.acquire(seq)
        try:
            if seq.lora is not None and seq.lora_path is not None and not engine.cache_touch(seq.lora):
                # Not in the CPU cache (evicted, or unloaded while this request waited): the worker
                # reads it again from the path the request carries. Failing here kills the engine.
                try:
                    fresh = await engine.read_adapter(seq.lora, seq.lora_path)
                except adapters_mod.AdapterError as e:
                    engine.die(f"re-reading adapter {seq.lora} from {seq.lora_path} failed: {e.reason}")
                    raise RequestError(contract.engine_dead()) from None
                engine.cache_put(seq.lora, fresh)
            if seq.lora is not None and seq.lora == self.faults.kill_engine_on_adapter:
                # fault: an exception inside the model step while this adapter runs kills the engine core
                engine.die(f"adapter {seq.lora} killed the engine at its first use "
                           "(vlmpool sim fault: kill_engine_on_adapter)")
                raise RequestError(contract.engine_dead())
            if self.faults.stall_seconds > 0:
                # A stall ends after stall_seconds, or at once when the faults are changed.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stall_release.wait(), self.faults.stall_seconds)
        except BaseException:
            engine.release(seq)
            raise

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            await self._pre_generation(request)
        except _Dropped:
            return web.Response(status=500)  # never reaches the client: the transport is gone
        body = await self._json_body(request)
        if chat and "messages" not in body:  # request-model validation comes before the model check
            raise RequestError(contract.request_field_missing("messages", len(body)))
        if not chat and "prompt" not in body:
            raise RequestError(contract.request_field_missing("prompt", len(body)))
        served, lora, lora_path = self._resolve_model(body.get("model"))
        cfg = self.config
        if chat:
            prompts = [chat_prompt(body["messages"], cfg.image_tokens, self.tokens)]
        else:
            prompts = completion_prompts(body.get("prompt"), self.tokens)
        for p in prompts:
            self._moderation(p.text)
        stream = bool(body.get("stream", False))
        if body.get("stream_options") is not None and not stream:
            raise RequestError(contract.bad_request("Stream options can only be defined when `stream=True`.",
                                                    param="stream_options"))
        n = body.get("n", 1) or 1
        if not isinstance(n, int) or n < 1:
            raise RequestError(contract.bad_request("n must be at least 1.", param="n"))
        prompt_tokens = sum(p.tokens for p in prompts)
        max_tokens = self._max_tokens(body, max(p.tokens for p in prompts), chat)
        plans = []
        for p in prompts:
            text = self._answer_text(body, lora if lora else self.base_name, lora_path,
                                     p.images, p.echo, chat)
            plans.extend([self._plan(body, text, max_tokens)] * n)

        request_id = self._request_id(request, "chatcmpl" if chat else "cmpl")
        headers = {"X-Request-Id": request.headers["X-Request-Id"]} if (
            cfg.enable_request_id_headers and "X-Request-Id" in request.headers) else None
        seq = Seq(request_id=request_id, lora=lora, lora_path=lora_path)
        await self._admit(seq)
        try:
            if stream:
                return await self._stream(request, seq, chat, served, plans, prompt_tokens, body, headers)
            return await self._whole(seq, chat, served, plans, prompt_tokens, body, headers)
        finally:
            self.engine.release(seq)

    def _split(self, body: dict[str, Any], text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a chat answer: split only with a reasoning parser, as vLLM."""
        if not self.config.reasoning_parser:
            return None, text
        reasoning, content = answers.split_reasoning(text, answers.thinking_enabled(body))
        return (reasoning if body.get("include_reasoning", True) is not False else None), content

    async def _whole(self, seq: Seq, chat: bool, served: str, plans: list[tuple[list[str], str]],
                     prompt_tokens: int, body: dict[str, Any], headers: dict[str, str] | None) -> web.Response:
        cfg = self.config
        longest = max(len(p[0]) for p in plans)
        first_at = None
        reason = "abort"
        generated = sum(len(p[0]) for p in plans)
        try:
            await asyncio.sleep(cfg.ttft_ms / 1000.0)
            first_at = time.monotonic()
            await asyncio.sleep(max(longest - 1, 0) * cfg.tpot_ms / 1000.0)
            reason = plans[0][1]
        finally:
            self.engine.finished(seq, reason=reason, prompt_tokens=prompt_tokens,
                                 generated=generated if reason != "abort" else 0,
                                 first_token_at=first_at, model=served)
        choices = []
        for i, (pieces, finish) in enumerate(plans):
            text = "".join(pieces)
            if chat:
                reasoning, content = self._split(body, text)
                # vLLM 0.32's ChatMessage: `reasoning` (not reasoning_content); empty tool_calls left out
                choices.append({"index": i, "message": {
                    "role": "assistant", "content": content, "refusal": None, "annotations": None,
                    "audio": None, "function_call": None, "reasoning": reasoning},
                    "logprobs": None, "finish_reason": finish, "stop_reason": None, "token_ids": None,
                    "routed_experts": None})
            else:
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": finish,
                                "stop_reason": None, "token_ids": None, "prompt_logprobs": None,
                                "prompt_token_ids": None, "routed_experts": None})
        payload: dict[str, Any] = {
            "id": seq.request_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": served, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + generated,
                      "completion_tokens": generated, "prompt_tokens_details": None,
                      "completion_tokens_details": None},
            # vLLM 0.32's answers carry these (null unless asked for) and a system fingerprint
            "service_tier": None, "system_fingerprint": self.system_fingerprint, "kv_transfer_params": None,
            "ec_transfer_params": None, "metrics": None,
        }
        if chat:
            payload.update({"prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None})
        return web.json_response(payload, headers=headers)

    async def _stream(self, request: web.Request, seq: Seq, chat: bool, served: str,
                      plans: list[tuple[list[str], str]], prompt_tokens: int, body: dict[str, Any],
                      headers: dict[str, str] | None) -> web.StreamResponse:
        cfg = self.config
        opts = body.get("stream_options") or {}
        include_usage = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
        continuous = include_usage and bool(opts.get("continuous_usage_stats")) if isinstance(opts, dict) else False
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream; charset=utf-8",
                                                       **(headers or {})})
        await resp.prepare(request)
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        generated = 0
        first_at = None
        reason = "abort"
        start = time.monotonic()

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None,
                  **extra: Any) -> bytes:
            data: dict[str, Any] = {"id": seq.request_id, "object": obj, "created": created,
                                    "model": served, "choices": choices, **extra}
            if any(c.get("finish_reason") for c in choices):  # vLLM: on the chunk that finishes
                data["system_fingerprint"] = self.system_fingerprint
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

        def usage(done: int) -> dict[str, Any]:
            return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + done,
                    "completion_tokens": done}

        def role_chunk() -> bytes:
            return chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None} for i in range(len(plans))],
                         usage(0) if continuous else None, prompt_token_ids=None, prompt_text=None)

        try:
            longest = max(1, *(len(p[0]) for p in plans))  # one step at least: the role chunk opens every chat stream
            splitters = ([answers.StreamSplitter(answers.thinking_enabled(body)) for _ in plans]
                         if chat and cfg.reasoning_parser else None)
            hide = body.get("include_reasoning", True) is False
            for step in range(longest):
                due = start + (cfg.ttft_ms + step * cfg.tpot_ms) / 1000.0
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if step == 0:
                    first_at = time.monotonic()
                    if chat:  # vLLM sends the role chunk with the first output, not before it
                        await resp.write(role_chunk())
                choices = []
                for i, (pieces, finish) in enumerate(plans):
                    if step >= len(pieces):
                        continue
                    generated += 1
                    last = step == len(pieces) - 1
                    if chat:
                        delta: dict[str, str] | None = {"content": pieces[step]}
                        if splitters is not None:
                            delta = splitters[i].delta(pieces[step])
                            if delta is not None and hide and "reasoning" in delta:
                                delta = None
                            if delta is None and not last:
                                continue  # a tag, or hidden reasoning: no chunk (vLLM skips an empty delta)
                        choices.append({"index": i, "delta": delta or {}, "logprobs": None,
                                        "finish_reason": finish if last else None,
                                        **({"stop_reason": None} if last else {}), "token_ids": None})
                    else:
                        choices.append({"index": i, "text": pieces[step], "logprobs": None,
                                        "finish_reason": finish if last else None,
                                        **({"stop_reason": None} if last else {}), "token_ids": None,
                                        **({"prompt_token_ids": None} if step == 0 else {})})
                if choices:
                    await resp.write(chunk(choices, usage(generated) if continuous else None))
            reason = plans[0][1]
            if include_usage:
                await resp.write(chunk([], usage(generated)))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:  # the client went away mid-stream: vLLM aborts the request
            reason = "abort"
        except asyncio.CancelledError:
            reason = "abort"
            raise
        finally:
            self.engine.finished(seq, reason=reason, prompt_tokens=prompt_tokens, generated=generated,
                                 first_token_at=first_at, model=served)
        return resp


class _Dropped(Exception):
    pass


def _drop_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()

