"""The slice of vLLM's HTTP contract that the simulator reproduces, in one place.

Everything a client can observe (status codes, error bodies, success texts, metric names) is written
here once, with the vLLM source it was read from, so a reviewer can check it line by line.

Which vLLM: the PyPI release ``VLLM_RELEASE``, pinned in vlmpool/pins.py (the one place the project pins
it); the neutral facts of that vLLM (its image, parsers, ranks, the texts the proxy matches) are in
vlmpool/vllm_contract.py, re-exported here. ``make test-vllm`` installs exactly this release and runs its
own LoRA loader against the simulator's verdicts (tests/vllm); the pool's default engine image is
``vllm/vllm-openai:v<VLLM_RELEASE>`` (vllm_contract.ENGINE_IMAGE).
docs/sim.md has the table of behaviours with the vLLM file:line each follows, and how to move the pin.
Files (paths inside the vllm package of that release):

* ``entrypoints/openai/models/serving.py`` — ``OpenAIServingModels``: load/unload checks and texts
  (``_check_load_lora_adapter_request``: missing fields, a name that is a served base model, already
  loaded), ``check_model`` (unknown model → 404), model cards with root/parent. Unload only forgets the
  name (the weights stay in the worker's LRU until evicted).
* ``entrypoints/serve/lora/api_router.py`` — routes exist only when ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``
  is true; success answers are ``Response(200, content=text)``, errors ``JSONResponse(ErrorResponse)``.
* ``entrypoints/openai/engine/protocol.py`` — ``ErrorResponse{error: ErrorInfo{message, type, param,
  code}}``, ``ModelCard``, ``ModelPermission``, ``UsageInfo``.
* ``entrypoints/serve/utils/error_response.py`` — exception → status mapping (``VLLMNotFoundError`` →
  404 NotFoundError, other engine errors → 500 InternalServerError).
* ``v1/engine/core.py`` — a failing engine utility call (``add_lora``) reaches the API server as
  ``Exception("Call to add_lora method failed: <str(e)>")``, a worker's exception inside it wrapped first by
  ``v1/executor/multiproc_executor.py`` (``Worker failed with error '…', please check the stack trace
  above for the root cause``): every adapter check, and in 0.32 the copy of its tensors into the model's
  LoRA buffers (a tensor too large fails the load; the engine stays up). An exception in a model step
  kills the engine core.
* ``lora/peft_helper.py``, ``lora/lora_model.py``, ``lora/worker_manager.py``, ``lora/utils.py`` —
  adapter validation and its messages (DoRA, modules_to_save, bias, init_lora_weights, aLoRA, ...,
  rank and rank_pattern, unexpected modules, unsupported weight names).
* ``v1/metrics/loggers.py`` — ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
  ``vllm:lora_requests_info{max_lora, waiting_lora_adapters, running_lora_adapters}`` (value: the
  time of the last update), ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``,
  ``vllm:request_success_total{finished_reason}``, latency histograms; labels model_name, engine.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Any

# The vLLM facts themselves (release, image, parsers, ranks, the texts the proxy matches) are neutral:
# vlmpool/vllm_contract.py. They are re-exported here for the simulator's modules.
from vlmpool.vllm_contract import (  # noqa: F401
    ENGINE_DEAD_MESSAGE,
    MAX_LORA_RANKS,
    REASONING_PARSERS,
    RUNTIME_LORA_ENV,
    VLLM_RELEASE,
    env_flag,
    invalid_reasoning_parser,
    lora_already_loaded_message,
    lora_conflicts_with_base_message,
    model_not_found_message,
)

_PATH_UNDER_ROOT = re.compile(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+")
_PATH_OF_FILE = re.compile(r"(?:/[\w\-]+)+/[\w\-]+\.\w+")


def sanitize_message(message: str) -> str:
    """vLLM hides file paths (and addresses, tracebacks) in every error message it answers
    (entrypoints/serve/exception_handling/utils.py sanitize_message): paths become ``<path>``."""
    message = re.sub(r" at 0x[0-9a-fA-F]+>", ">", message)
    message = _PATH_UNDER_ROOT.sub("<path>", message)
    message = _PATH_OF_FILE.sub("<path>", message)
    return message.strip()


def error_body(message: str, err_type: str, code: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": sanitize_message(message), "type": err_type, "param": param, "code": int(code)}}


def error_json(message: str, err_type: str = "BadRequestError", status: int = 400,
               param: str | None = None) -> tuple[int, str]:
    return status, json.dumps(error_body(message, err_type, status, param))


# ---- texts (each one copied from the vLLM source named above) ---------------------------------

def model_not_found(model: str, served_names: list[str]) -> tuple[int, str]:
    # entrypoints/serve/engine/serving.py _check_model: the served names, comma-separated
    return error_json(model_not_found_message(model, served_names), "NotFoundError", HTTPStatus.NOT_FOUND,
                      param="model")


def lora_load_success(name: str) -> str:
    return f"Success: LoRA adapter '{name}' added successfully."


def lora_unload_success(name: str) -> str:
    return f"Success: LoRA adapter '{name}' removed successfully."


def lora_missing_fields() -> tuple[int, str]:
    return error_json("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400)


def request_field_missing(field: str, body_items: int) -> tuple[int, str]:
    # A field the request model requires is absent: FastAPI's RequestValidationError, which vLLM answers
    # 400 "Bad Request" with param body.<field> (entrypoints/serve/exception_handling/handlers/validation.py).
    return error_json(f"1 validation error:\n  {{'type': 'missing', 'loc': 'body.{field}', 'msg': 'Field required', "
                      f"'input': '<dict of {body_items} items>'}}", "Bad Request", 400, param=f"body.{field}")


def lora_already_loaded(name: str) -> tuple[int, str]:
    return error_json(lora_already_loaded_message(name), "InvalidUserInput", 400)


def lora_conflicts_with_base(name: str) -> tuple[int, str]:
    return error_json(lora_conflicts_with_base_message(name), "InvalidUserInput", 400)


def unsupported_lora_weight(name: str) -> str:
    # vllm/lora/utils.py parse_fine_tuned_lora_name: ``name`` is the key after the weights mapper,
    # with the base_model.model. prefix put back.
    return f"{name} is unsupported LoRA weight"


def lora_unload_missing_name() -> tuple[int, str]:
    return error_json("'lora_name' needs to be provided to unload a LoRA adapter.",
                      "InvalidUserInput", 400)


def lora_not_found_on_unload(name: str) -> tuple[int, str]:
    return error_json(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)


def lora_adapter_not_found(name: str, path: str) -> tuple[int, str]:
    # vllm.exceptions.LoRAAdapterNotFoundError, a VLLMNotFoundError → 404 NotFoundError.
    return error_json(f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError", 404)


def engine_utility_failure(method: str, message: str) -> tuple[int, str]:
    # EngineCoreProc._invoke_utility_method wraps the exception; the serving layer answers
    # 500 InternalServerError with that text.
    return error_json(f"Call to {method} method failed: {message}", "InternalServerError", 500)


def worker_failure(method: str, message: str) -> tuple[int, str]:
    # An exception in the worker process (every adapter check, and copying the adapter's tensors into the
    # model's LoRA buffers, which 0.32 does inside add_lora) reaches the engine core through
    # v1/executor/multiproc_executor.py (collective_rpc) and then engine_utility_failure.
    return engine_utility_failure(
        method, f"Worker failed with error '{message}', please check the stack trace above for the root cause")


def validation_error(message: str, param: str, value: Any) -> tuple[int, str]:
    # vllm.exceptions.VLLMValidationError: 400 BadRequestError, its str() ends with "(parameter=P, value=V)"
    return bad_request(f"{message} (parameter={param}, value={value})", param=param)


def max_model_len_exceeded(max_model_len: int, prompt_tokens: int) -> tuple[int, str]:
    # renderers/params.py _token_len_check: the prompt alone is over --max-model-len. A text prompt is
    # tokenized with truncation at max_model_len + 1 tokens, so vLLM says "at least" that many.
    count = min(prompt_tokens, max_model_len + 1)
    qualifier = "at least " if count == max_model_len + 1 else ""
    return validation_error(
        f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains "
        f"{qualifier}{count} input tokens, which exceeds this limit even without any output tokens. "
        "Please reduce the length of the input prompt.", "input_tokens", count)


def max_tokens_over_model_len(max_tokens: int, max_model_len: int) -> tuple[int, str]:
    # renderers/params.py TokenizeParams.__post_init__ (a request's max_tokens over --max-model-len; a
    # smaller max_tokens that does not fit after the prompt is clamped, not refused)
    return validation_error(
        f"max_tokens={max_tokens} cannot be greater than max_model_len={max_model_len}. "
        "Please request fewer output tokens.", "max_tokens", max_tokens)


def engine_dead() -> tuple[int, str]:
    return error_json(ENGINE_DEAD_MESSAGE, "InternalServerError", 500)


def bad_request(message: str, param: str | None = None) -> tuple[int, str]:
    return error_json(message, "BadRequestError", 400, param)


# Not vLLM: what a content-moderating upstream (DashScope-style) answers. The trigger is a sim fault.
MODERATION_MESSAGE = "Input data may contain inappropriate content."
MODERATION_TYPE = "data_inspection_failed"
