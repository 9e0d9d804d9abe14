"""The vLLM contract vlmpool builds on, in one place: which release, its image, the parsers and LoRA
ranks it accepts, and the engine's texts vlmpool matches (the proxy's idempotent load, its self-heal and
engine-death triggers) or reproduces (the simulator, sim/contract.py).

Neutral on purpose: it imports nothing of vlmpool but the pins (vlmpool/pins.py, itself plain stdlib), so
the API (defaults and choices), the manifests, the proxy and the simulator read vLLM's facts from here
without an import between those parts (the API does not import the simulator to know vLLM's release).

Each fact names the vLLM source it was read from (paths inside the vllm package of the pinned release);
``make test-vllm`` (tests/vllm) compares the reasoning parsers with vLLM's registry and the simulator's
answers, built from these texts, with the real engine's.
"""

from __future__ import annotations

from vlmpool.pins import VLLM_RELEASE

__all__ = [
    "ALREADY_LOADED", "ENGINE_DEAD_MESSAGE", "ENGINE_DEAD_TEXT", "ENGINE_IMAGE", "MAX_LORA_RANKS",
    "REASONING_PARSERS", "RUNTIME_LORA_ENV", "UNKNOWN_MODEL_MARKS", "VLLM_RELEASE",
    "env_flag", "invalid_reasoning_parser", "lora_already_loaded_message", "lora_conflicts_with_base_message",
    "model_not_found_message",
]

# The pool's default engine image: vLLM's OpenAI server of the pinned release.
ENGINE_IMAGE = f"vllm/vllm-openai:v{VLLM_RELEASE}"

# --max-lora-rank accepts only these values in vLLM (vllm/config/lora.py, MaxLoRARanks).
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# --reasoning-parser names vLLM registers (ReasoningParserManager.list_registered(); tests/vllm compares).
REASONING_PARSERS = (
    "cohere_command3", "cohere_command4", "deepseek_r1", "deepseek_v3", "deepseek_v4", "deepseek_v41", "ernie45",
    "gemma4", "glm45", "glm47", "granite", "granite_thinking_parser", "hf", "holo2", "hunyuan_a13b", "hy_v3",
    "hy_v4", "inkling", "k2_horizon", "kimi_k2", "kimi_k3", "ling3", "mimo", "minicpmv", "minimax_m2",
    "minimax_m2_append_think", "minimax_m3", "mistral", "muse_glimmer", "nemotron_v3", "olmo3", "openai_gptoss",
    "plamo3", "poolside_v1", "qwen3", "seed_oss", "step3", "step3p5")


def invalid_reasoning_parser(name: str) -> str:
    """vLLM's startup refusal (entrypoints/launchers/launcher.py validate_api_server_args)."""
    return f"invalid reasoning parser: {name} (chose from {{ {','.join(REASONING_PARSERS)} }})"


# Environment switch vLLM reads to mount the runtime LoRA routes (vllm/envs.py).
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def env_flag(value: str | None) -> bool:
    """vLLM parses this env as ``value.lower() in ("1", "true")``."""
    return (value or "").strip().lower() in ("1", "true")


# ---- engine texts vlmpool matches (the proxy) and reproduces (the simulator) -----------------------

# entrypoints/openai/models/serving.py _check_load_lora_adapter_request: a second load of a loaded name.
# The proxy counts a 400 with ALREADY_LOADED in it as a successful (idempotent) load.
ALREADY_LOADED = "already been loaded"


def lora_already_loaded_message(name: str) -> str:
    return (f"The lora adapter '{name}' has {ALREADY_LOADED}. If you want to load the adapter in "
            "place, set 'load_inplace' to True.")


def lora_conflicts_with_base_message(name: str) -> str:
    # the same check: a LoRA name that is a served base model
    return f"The lora adapter '{name}' conflicts with a served base model."


# entrypoints/serve/engine/serving.py _check_model: an unknown model is a 404 whose message says it
# "does not exist" (LoRA routes: "cannot be found", "not found"). The proxy's self-heal trigger is a 404
# naming the model with one of these marks (lowercased).
UNKNOWN_MODEL_MARKS = ("does not exist", "not found")


def model_not_found_message(model: str, served_names: list[str]) -> str:
    # the served names, comma-separated
    return f"The model `{model}` does not exist. Valid aliases: {', '.join(served_names)}."


# vllm.v1.engine.exceptions.EngineDeadError: every request after the engine core died answers 500 with this
# message. The proxy's engine-death trigger is a 500 with ENGINE_DEAD_TEXT in it.
ENGINE_DEAD_MESSAGE = ("EngineCore encountered an issue. See stack trace (above) for the root "
                       "cause.")
ENGINE_DEAD_TEXT = ENGINE_DEAD_MESSAGE.split(". ")[0]  # "EngineCore encountered an issue"
