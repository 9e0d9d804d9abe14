"""adapter_config.json checks: hostile input (non-finite numbers, absurd values, deep nesting) and the
config fields the pinned vLLM refuses at load time (``PEFTHelper.__post_init__`` / ``validate_legal``),
so that the patch Job refuses them with a stable reason instead of the engine answering 500 later.

vLLM source (the release in hack/vllm-version; docs/sim.md lists the lines): vllm/lora/peft_helper.py,
``_validate_features`` and ``validate_legal``.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

from vlmpool.patcher.errors import PatchError

CONFIG_NAME = "adapter_config.json"
MAX_DEPTH = 32          # PEFT configs nest 3 levels at most; 32 leaves room and stops recursion bombs
MAX_ITEMS = 4096        # per list or object (target_modules of a large model is ~10 names)
ABSOLUTE_MAX_RANK = 1 << 16   # above any --max-lora-rank vLLM takes (512): a broken file, not a big adapter
MAX_ALPHA = 1e6


def parse_config(text: str) -> dict[str, Any]:
    """json.loads that refuses NaN/Infinity (and numbers that overflow to them), deep nesting and
    giant containers as ``InvalidConfig``; what it returns can always be written back as strict JSON."""

    def no_constant(name: str) -> Any:
        raise PatchError("InvalidConfig", f"{CONFIG_NAME} holds the non-finite number {name}; "
                         "JSON has no NaN or Infinity (and vLLM cannot use them): write a finite number")

    def finite_float(s: str) -> float:
        v = float(s)
        if not math.isfinite(v):
            raise PatchError("InvalidConfig", f"{CONFIG_NAME} holds the number {s[:40]}, which overflows "
                             "to infinity; write a finite number")
        return v

    try:
        cfg = json.loads(text, parse_constant=no_constant, parse_float=finite_float)
    except RecursionError:
        raise PatchError("InvalidConfig",
                         f"{CONFIG_NAME} is nested too deeply (more than {MAX_DEPTH} levels)") from None
    except ValueError as e:  # also ints over Python's 4300-digit limit
        raise PatchError("InvalidConfig", f"{CONFIG_NAME} is not valid JSON: {str(e)[:200]}") from None
    check_shape(cfg)
    if not isinstance(cfg, dict):
        raise PatchError("InvalidConfig", f"{CONFIG_NAME} must hold a JSON object")
    return cfg


def check_shape(value: Any) -> None:
    """Depth <= MAX_DEPTH and every list/object <= MAX_ITEMS entries (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > MAX_DEPTH:
                raise PatchError("InvalidConfig", f"{CONFIG_NAME} is nested too deeply (more than {MAX_DEPTH} levels)")
            if len(v) > MAX_ITEMS:
                raise PatchError("InvalidConfig", f"{CONFIG_NAME} has a list or object of {len(v)} entries "
                                 f"(at most {MAX_ITEMS})")
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))


def check_rank(r: Any, max_rank: int = 0, what: str = "rank 'r'") -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1 or r > ABSOLUTE_MAX_RANK:
        raise PatchError("InvalidConfig", f"{what} must be a positive integer of at most {ABSOLUTE_MAX_RANK}, "
                         f"not {repr(r)[:40]}")
    return r


def check_alpha(alpha: Any, what: str = "lora_alpha") -> float:
    if (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha)
            or alpha <= 0 or alpha > MAX_ALPHA):
        raise PatchError("InvalidConfig", f"{what} must be a positive number of at most {MAX_ALPHA:g}, "
                         f"not {repr(alpha)[:40]}")
    return alpha


def check_patterns(cfg: dict[str, Any], max_rank: int, svd_applies: bool) -> dict[str, int]:
    """rank_pattern / alpha_pattern, which vLLM applies per module (peft_helper.py): {name: int > 0}
    and {name: number > 0}. Returns rank_pattern. A rank over the pool's max is RankTooHigh, as r is."""
    out: dict[str, int] = {}
    for key, check in (("rank_pattern", check_rank), ("alpha_pattern", check_alpha)):
        pattern = cfg.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise PatchError("InvalidConfig", f"{key} must be an object mapping module names to values")
        for name, value in pattern.items():
            check(value, what=f"{key}[{name[:80]!r}]")
            if key == "rank_pattern":
                out[name] = value
    if out and max(out.values()) > max_rank and not svd_applies:
        name, rank = max(out.items(), key=lambda kv: kv[1])
        raise PatchError("RankTooHigh", f"rank_pattern gives {name!r} rank {rank}, over the pool's max LoRA rank "
                         f"{max_rank} (VLMPool spec.engine.maxLoraRank, vLLM --max-lora-rank)")
    return out


# init_lora_weights values vLLM loads as a plain LoRA (they only choose how A/B start; the saved A/B
# are the whole adapter). Anything else as a string (pissa*, olora, loftq, corda, ...) changes the base
# weights when PEFT loads the adapter, and vLLM refuses it.
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")  # PEFTHelper._init_is_supported


def unsupported_features(cfg: dict[str, Any]) -> list[str]:
    """The config features the pinned vLLM refuses at load (besides DoRA and modules_to_save, which have
    their own reasons): one line per feature, in vLLM's order."""
    out: list[str] = []
    if cfg.get("lora_bias"):
        out.append("lora_bias is set (trained biases on the LoRA B matrices): vLLM does not support LoRA bias")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in PLAIN_INITS:
        out.append(f"init_lora_weights={init[:40]!r}: inits such as PiSSA, OLoRA, CorDA and LoftQ change the base "
                   "model's weights, which vLLM does not do; convert the adapter to a plain LoRA with PEFT's "
                   "path_initial_model_for_weight_conversion")
    if cfg.get("alora_invocation_tokens"):
        out.append("alora_invocation_tokens is set: vLLM does not serve Activated LoRA (aLoRA)")
    if cfg.get("layer_replication"):
        out.append("layer_replication is set: vLLM does not support it")
    if cfg.get("use_bdlora"):
        out.append("use_bdlora is set: vLLM does not support block-diagonal LoRA (BD-LoRA)")
    if cfg.get("use_qalora"):
        out.append("use_qalora is set: vLLM does not support QALoRA")
    bias = cfg.get("bias", "none")
    if bias != "none":  # vLLM: also null (validate_legal compares with "none")
        out.append(f"bias={repr(bias)[:40]}: vLLM does not support adapter biases (bias must be 'none')")
    return out


def refuse_unsupported(cfg: dict[str, Any]) -> None:
    problems = unsupported_features(cfg)
    if problems:
        raise PatchError("UnsupportedLoraFeature", "vLLM refuses this adapter at load time: " + "; ".join(problems))


# ---- rank_pattern / alpha_pattern (vLLM: PEFTHelper._match_pattern and get_rank_and_scaling)

PATTERN_TIMEOUT = 0.05  # seconds per match: the keys are the adapter author's regular expressions


@functools.lru_cache(maxsize=2 * MAX_ITEMS)  # every key of a rank_pattern and an alpha_pattern
def _compiled(key: str) -> Any:
    """A key's expression, compiled once per process: matching module after module with regex.match(str)
    recompiled each key whenever the keys outnumbered the module's cache (500), e.g. a rank_pattern
    with 1,600 keys."""
    import regex

    return regex.compile(rf"(.*\.)?({key})$")


def _match(pattern: dict[str, Any], name: str) -> Any:
    """PEFT's and vLLM's rule: a key matches when it matches a suffix of the module name that starts at a
    "." boundary; the first match (in the file's order) wins. Keys are regular expressions written by the
    adapter's author, so they run under the ``regex`` module's timeout (vLLM uses the same module)."""
    import regex

    for key, value in pattern.items():
        try:
            if _compiled(key).match(name, timeout=PATTERN_TIMEOUT):
                return value
        except regex.error as e:
            raise PatchError("InvalidConfig",
                             f"pattern key {key[:80]!r} is not a valid regular expression: {e}") from None
        except TimeoutError:
            raise PatchError("InvalidConfig",
                             f"pattern key {key[:80]!r} takes too long to match module names") from None
    return None


def module_rank_scale(cfg: dict[str, Any], module: str, r: int, alpha: float) -> tuple[int, float]:
    """(rank, scale) of ``module`` (the checkpoint's module name without ``base_model.model.``, which is
    what vLLM matches the patterns against)."""
    rank = _match(cfg.get("rank_pattern") or {}, module) or r
    a = _match(cfg.get("alpha_pattern") or {}, module) or alpha
    return rank, (a / math.sqrt(rank) if cfg.get("use_rslora") else a / rank)


def output_patterns(cfg: dict[str, Any], renamed: dict[str, str], r: int, alpha: float) -> tuple[dict, dict]:
    """rank_pattern / alpha_pattern for the patched adapter. The keys are rewritten (``renamed``: source
    module -> output module, both without ``base_model.model.``) so that they still select the same
    modules after the key rewrite: one exact, escaped key per module whose rank or alpha is not the
    default. An adapter without patterns gets ``{}`` for both, as before."""
    import regex

    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for src, out in sorted(renamed.items(), key=lambda kv: kv[1]):
        rank = _match(cfg.get("rank_pattern") or {}, src)
        a = _match(cfg.get("alpha_pattern") or {}, src)
        if rank is not None and rank != r:
            ranks[regex.escape(out)] = rank
        if a is not None and a != alpha:
            alphas[regex.escape(out)] = a
    return ranks, alphas
