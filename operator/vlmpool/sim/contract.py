"""The slice of vLLM's HTTP contract that the simulator reproduces, in one place.

Everything a client can observe (status codes, error bodies, success texts, metric names) is written
here once, with the vLLM source it was read from, so a reviewer can check it line by line.

Which vLLM: upstream ``vllm-project/vllm`` main of the v0.23-v0.25 line (2026), V1 engine, the files
below as stored at these commits (the store does not label releases, so the commit is the pin):

* ``vllm/entrypoints/openai/models/serving.py`` @ 00153c8b7948 — ``OpenAIServingModels``:
  load/unload checks and texts, ``check_model`` (unknown model → 404), model cards with root/parent.
* ``vllm/entrypoints/serve/lora/api_router.py`` @ 27873cab97e4 — routes exist only when
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is true; success answers are ``Response(200, content=text)``,
  errors ``JSONResponse(ErrorResponse, status=error.code)``.
* ``vllm/entrypoints/openai/engine/protocol.py`` @ 040a2cc2a629 — ``ErrorResponse{error: ErrorInfo
  {message, type, param, code}}``, ``ModelCard``, ``ModelPermission``, ``UsageInfo``.
* ``vllm/entrypoints/serve/utils/error_response.py`` @ 1c6ebf2c6b4f — exception → status mapping
  (``VLLMNotFoundError`` → 404 NotFoundError, other engine errors → 500 InternalServerError).
* ``vllm/v1/engine/core.py`` — a failing engine utility call (``add_lora``) reaches the API server as
  ``Exception("Call to add_lora method failed: <str(e)>")``.
* ``vllm/lora/peft_helper.py`` (the rank_pattern/alpha_pattern revision), ``vllm/lora/lora_model.py``
  @ 0306474e9d1f, ``vllm/lora/worker_manager.py``, ``vllm/lora/utils.py`` — adapter validation and
  its messages (DoRA, modules_to_save, bias, rank, unexpected modules, unsupported weight names).
* ``vllm/v1/metrics/loggers.py`` — ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
  ``vllm:lora_requests_info{max_lora, waiting_lora_adapters, running_lora_adapters}`` (value: the
  time of the last update), ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``,
  ``vllm:request_success_total{finished_reason}``, latency histograms; labels model_name, engine.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

VLLM_CONTRACT = "vllm main, v0.23-v0.25 line (models/serving.py @00153c8b, lora api_router @27873cab)"

# --max-lora-rank accepts only these values in vLLM (vllm/config/lora.py, MaxLoRARanks).
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Environment switch vLLM reads to mount the runtime LoRA routes (vllm/envs.py).
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def env_flag(value: str | None) -> bool:
    """vLLM parses this env as ``value.lower() in ("1", "true")``."""
    return (value or "").strip().lower() in ("1", "true")


def error_body(message: str, err_type: str, code: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": int(code)}}


def error_json(message: str, err_type: str = "BadRequestError", status: int = 400,
               param: str | None = None) -> tuple[int, str]:
    return status, json.dumps(error_body(message, err_type, status, param))


# ---- texts (each one copied from the vLLM source named above) ---------------------------------

def model_not_found(model: str) -> tuple[int, str]:
    return error_json(f"The model `{model}` does not exist.", "NotFoundError",
                      HTTPStatus.NOT_FOUND, param="model")


def lora_load_success(name: str) -> str:
    return f"Success: LoRA adapter '{name}' added successfully."


def lora_unload_success(name: str) -> str:
    return f"Success: LoRA adapter '{name}' removed successfully."


def lora_missing_fields() -> tuple[int, str]:
    return error_json("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400)


def lora_already_loaded(name: str) -> tuple[int, str]:
    return error_json(
        f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in "
        "place, set 'load_inplace' to True.",
        "InvalidUserInput", 400)


def lora_unload_missing_name() -> tuple[int, str]:
    return error_json("'lora_name' needs to be provided to unload a LoRA adapter.",
                      "InvalidUserInput", 400)


def lora_not_found_on_unload(name: str) -> tuple[int, str]:
    return error_json(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)


def lora_adapter_not_found(name: str, path: str) -> tuple[int, str]:
    # vllm.exceptions.LoRAAdapterNotFoundError, a VLLMNotFoundError → 404 NotFoundError.
    return error_json(f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError", 404)


def engine_utility_failure(method: str, message: str) -> tuple[int, str]:
    # EngineCoreProc._invoke_utility_method wraps the worker's exception; the serving layer answers
    # 500 InternalServerError with that text.
    return error_json(f"Call to {method} method failed: {message}", "InternalServerError", 500)


ENGINE_DEAD_MESSAGE = ("EngineCore encountered an issue. See stack trace (above) for the root "
                       "cause.")


def engine_dead() -> tuple[int, str]:
    return error_json(ENGINE_DEAD_MESSAGE, "InternalServerError", 500)


def bad_request(message: str, param: str | None = None) -> tuple[int, str]:
    return error_json(message, "BadRequestError", 400, param)


# Not vLLM: what a content-moderating upstream (DashScope-style) answers. The trigger is a sim fault.
MODERATION_MESSAGE = "Input data may contain inappropriate content."
MODERATION_TYPE = "data_inspection_failed"
