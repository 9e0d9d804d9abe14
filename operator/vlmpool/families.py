"""The model families vlmpool serves: ONE table, the only place family knowledge lives.

Everything that differs between families is a field of ``Family`` below, and every part of vlmpool reads
it from here: the patcher (which adapter keys are language layers, which are the vision tower, what it may
keep), the simulator (vLLM's weight mapper, expected modules and module layout for its strict check, the
family guessed from a model id), the API (``ModelFamily``, pixel budgets and reasoning defaults), the
manifests (engine arguments), the CLIs' choices and the test helpers (tiny models and their targets).

The module is neutral on purpose: it imports nothing from vlmpool, so api, manifests, patcher, sim and
testing all import it without an import cycle or a dependency between those parts (the patcher does not
import the simulator to know vision modules, the API does not import the patcher).

The facts are read from the sources of the pinned vLLM (model_executor/models/<family>.py:
``hf_to_vllm_mapper``, ``packed_modules_mapping``, the LinearBase modules the model builds, its
``supports_tower_connector_lora``) and of transformers 5 (the module tree of the real classes);
``make test-vllm`` compares the mapper, expected modules and architecture with vLLM's classes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# The decoder-layer modules every family's language model serves LoRA on (Llama/Qwen/Gemma/Mistral blocks).
ATTN_MLP = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Qwen3.5's Gated DeltaNet (linear attention) layers: vLLM packs in_proj_qkv+in_proj_z and
# in_proj_b+in_proj_a (qwen3_5.py packed_modules_mapping) and serves LoRA on them and on out_proj.
GDN = ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_b", "linear_attn.in_proj_a",
       "linear_attn.out_proj")

# Where the language model's decoder layers may sit in an adapter's keys (PEFT prefix removed), in this
# order: the transformers >= 4.52 layout, the older one, and vLLM's own (which its mappers leave alone).
LAYER_PREFIXES = ("model.language_model.layers.", "model.layers.", "language_model.model.layers.")


@dataclass(frozen=True)
class PixelBudget:
    """Image resizing bounds of a family's processor (pixels of the resized image), and its factor: the
    resized sides are multiples of it (patch size x spatial merge)."""

    min_pixels: int
    max_pixels: int
    factor: int


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    # transformers class (config.json "architectures") and vLLM's registry name for it
    hf_architecture: str
    vllm_architecture: str
    # substrings of a model id (lower-cased, only [a-z0-9] kept) that name the family: the simulator's
    # --family auto
    name_markers: tuple[str, ...]
    # a public checkpoint of the family: the base tests and examples name
    test_model: str
    # decoder-layer modules LoRA is served on (path under layers.N.), in the order the patched config lists them
    language_modules: tuple[str, ...] = ATTN_MLP
    layer_prefixes: tuple[str, ...] = LAYER_PREFIXES
    # base-weight key prefixes tried for a language layer (checkpoint layouts differ by transformers version)
    base_layer_prefixes: tuple[str, ...] = LAYER_PREFIXES
    # substrings of an adapter module path (HF names) that put it in the vision tower or the connector
    vision_markers: tuple[str, ...] = ("visual.", "vision_tower", "merger", "multi_modal_projector")
    # vLLM module names (after the mapper) of the vision tower and connector that exist in vLLM's model
    vision_modules: str | None = None
    # the part of them vlmpool serves LoRA on with --enable-tower-connector-lora (None: the patcher keeps
    # no vision tensor even with the flag: vLLM's class does not support it or vlmpool does not yet)
    tower_lora_modules: str | None = None
    # PEFT target names that reach the vision tower of the transformers class (tests train them)
    vision_targets: tuple[str, ...] = ()
    # vLLM's expected LoRA modules: supported modules after packed_modules_mapping expansion
    expected_modules: frozenset[str] = frozenset()
    # hf_to_vllm_mapper.orig_to_new_prefix of vLLM's class, in order (None: the weight is not loaded)
    weights_mapper: tuple[tuple[str, str | None], ...] = ()
    pixel_budget: PixelBudget | None = None
    # vLLM --reasoning-parser by default (None: the model's text is returned as it is)
    reasoning_parser: str | None = None
    # the chat template takes chat_template_kwargs.enable_thinking (Qwen3 / Qwen3.5 templates; the roboflow
    # seed forwards it for qwen3_5 only, never for qwen3vl): the pool renders the proxy's `--thinking switch`
    thinking_switch: bool = False
    # engine flags the family always needs
    vllm_flags: tuple[str, ...] = ()
    # the language model vLLM's class builds from the checkpoint's text_config when the class does not name
    # it (init_vllm_registered_model without architectures): the text model of the family's checkpoints
    vllm_text_architecture: str | None = None
    # a vision-language family a VLMPool may name (False: a text model only the simulator knows)
    vlm: bool = True
    why: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def module_names(self) -> tuple[str, ...]:
        """The served language module names (q_proj, ...), in order, without duplicates."""
        return tuple(dict.fromkeys(m.rsplit(".", 1)[-1] for m in self.language_modules))

    def layer_module(self, suffix: str) -> str | None:
        """'q_proj' etc. when ``suffix`` (after the layer prefix: ``N.self_attn.q_proj``) is a served module."""
        layer, _, path = suffix.partition(".")
        if layer.isdigit() and path in self.language_modules:
            return path.rsplit(".", 1)[-1]
        return None

    def vllm_layer_pattern(self) -> re.Pattern[str]:
        """vLLM's names of the served language modules (the mapper's output)."""
        alts = "|".join(re.escape(m) for m in self.language_modules)
        return re.compile(rf"^language_model\.model\.layers\.\d+\.({alts})$")


_QWEN2_MAPPER: tuple[tuple[str, str | None], ...] = (
    ("model.language_model.", "language_model.model."), ("model.visual.", "visual."),
    ("lm_head.", "language_model.lm_head."), ("model.", "language_model.model."))
_QWEN3_MAPPER: tuple[tuple[str, str | None], ...] = (
    ("model.visual.", "visual."), ("lm_head.", "language_model.lm_head."),
    ("model.language_model.", "language_model.model."))
_LLAVA_STYLE_MAPPER: tuple[tuple[str, str | None], ...] = (
    ("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head."))

_LANG = frozenset(m.rsplit(".", 1)[-1] for m in ATTN_MLP)
_QWEN3_VISION = (r"^visual\.(blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(linear_fc1|linear_fc2))"
                 r"|(merger|deepstack_merger_list\.\d+)\.(linear_fc1|linear_fc2))$")
# Qwen2-VL-style processors (transformers 5 Qwen2VLImageProcessor, also used by Qwen3-VL and Qwen3.5):
# the budget is size={"shortest_edge": min_pixels, "longest_edge": max_pixels}
_QWEN2_BUDGET = PixelBudget(min_pixels=4 * 28 * 28, max_pixels=1280 * 28 * 28, factor=28)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(
        "qwen2_vl", "Qwen2-VL", "Qwen2VLForConditionalGeneration", "Qwen2VLForConditionalGeneration",
        ("qwen2vl",), "Qwen/Qwen2-VL-2B-Instruct",
        vision_modules=r"^visual\.(blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))|merger\.mlp\.(0|2))$",
        tower_lora_modules=r"^visual\.(blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))|merger\.mlp\.(0|2))$",
        vision_targets=("qkv", "fc1"),
        expected_modules=_LANG | {"qkv", "proj", "fc1", "fc2", "0", "2"},
        weights_mapper=_QWEN2_MAPPER, pixel_budget=_QWEN2_BUDGET,
        why="seed family"),
    Family(
        "qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
        ("qwen25vl",), "Qwen/Qwen2.5-VL-3B-Instruct",
        vision_modules=(r"^visual\.(blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate_proj|up_proj|down_proj))"
                        r"|merger\.mlp\.(0|2))$"),
        tower_lora_modules=(r"^visual\.(blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate_proj|up_proj|down_proj))"
                            r"|merger\.mlp\.(0|2))$"),
        vision_targets=("qkv",),
        expected_modules=_LANG | {"qkv", "proj", "0", "2"},
        weights_mapper=_QWEN2_MAPPER, pixel_budget=_QWEN2_BUDGET,
        why="seed family"),
    Family(
        "qwen3_vl", "Qwen3-VL", "Qwen3VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
        ("qwen3vl",), "Qwen/Qwen3-VL-2B-Instruct",
        vision_modules=_QWEN3_VISION, tower_lora_modules=_QWEN3_VISION,
        vision_targets=("qkv", "linear_fc1"),
        # embed_tokens and lm_head: Qwen3LLMForCausalLM's embedding_modules (vllm qwen3.py)
        expected_modules=_LANG | {"qkv", "proj", "linear_fc1", "linear_fc2", "embed_tokens", "lm_head"},
        weights_mapper=_QWEN3_MAPPER,
        pixel_budget=PixelBudget(min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28, factor=28),
        why="seed family; the Instruct checkpoints answer without thinking, so no reasoning parser by default",
        notes=("vLLM's Qwen3-VL weight mapper only accepts model.language_model.layers.N keys",)),
    Family(
        "qwen3_5", "Qwen3.5", "Qwen3_5ForConditionalGeneration", "Qwen3_5ForConditionalGeneration",
        ("qwen35",), "Qwen/Qwen3.5-2B",
        language_modules=ATTN_MLP + GDN,
        vision_modules=_QWEN3_VISION, tower_lora_modules=_QWEN3_VISION,
        vision_targets=("qkv", "linear_fc1"),
        expected_modules=(_LANG | {"qkv", "proj", "linear_fc1", "linear_fc2", "embed_tokens", "lm_head"}
                          | {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj", "conv1d",
                             "gate", "shared_expert_gate"}),
        weights_mapper=_QWEN3_MAPPER + (("mtp.", None),),
        pixel_budget=PixelBudget(min_pixels=16 * 32 * 32, max_pixels=512 * 32 * 32, factor=32),
        reasoning_parser="qwen3",
        thinking_switch=True,
        why="the roboflow production adapters are Qwen3.5 fine-tunes (qwen3_5-0.8b/-2b/-4b); the model thinks "
            "in <think>...</think> by default, which vLLM's qwen3 reasoning parser splits off",
        notes=("hybrid decoder: Gated DeltaNet (linear_attn) layers between full-attention layers; vLLM serves "
               "LoRA on both",)),
    Family(
        "gemma3", "Gemma 3", "Gemma3ForConditionalGeneration", "Gemma3ForConditionalGeneration",
        ("gemma3",), "google/gemma-3-4b-it",
        vision_markers=("vision_tower", "multi_modal_projector"),
        vision_modules=r"^(vision_tower|multi_modal_projector)\.",
        vision_targets=("out_proj", "fc1"),
        # vllm gemma3_mm.py: Gemma3ForCausalLM's qkv/o/gate_up/down and SigLIP's qkv_proj/out_proj/fc1/fc2
        expected_modules=_LANG | {"out_proj", "fc1", "fc2"},
        weights_mapper=_LLAVA_STYLE_MAPPER,
        why="Google's open VLM (4B-27B), widely fine-tuned; vLLM's Gemma3ForConditionalGeneration is SupportsLoRA",
        notes=("the processor resizes every image to the SigLIP input (896x896, with optional pan-and-scan "
               "crops): no pixel budget to set",
               "the vision tower (SigLIP) and projector are not kept by the patcher: vLLM's SigLIP names differ "
               "from transformers' and vlmpool does not map them yet")),
    Family(
        "mistral3", "Mistral 3 (Mistral-Small-3.1/3.2)", "Mistral3ForConditionalGeneration",
        "Mistral3ForConditionalGeneration",
        ("mistral3", "mistralsmall31", "mistralsmall32", "mistralsmall3"),
        "mistralai/Mistral-Small-3.1-24B-Instruct-2503",
        vision_markers=("vision_tower", "multi_modal_projector"),
        vision_modules=r"^(vision_tower|multi_modal_projector)\.",
        vision_targets=("gate_proj", "linear_1"),
        # vllm mistral3.py: the Mistral (Llama) language model's modules and the projector's linear_1/_2
        expected_modules=_LANG | {"linear_1", "linear_2"},
        weights_mapper=_LLAVA_STYLE_MAPPER + (("model.", "language_model.model."),),
        vllm_text_architecture="MistralForCausalLM",
        why="Mistral's open VLM (Pixtral encoder + Mistral Small 24B), Apache-2.0 and widely fine-tuned; "
            "vLLM's Mistral3ForConditionalGeneration is SupportsLoRA (the HF-format checkpoint)",
        notes=("vLLM's class does not support tower/connector LoRA: vision tensors are dropped (refused when "
               "trained)",
               "the Pixtral processor bounds images by their longest edge, not by pixels: no pixel budget")),
    # A plain decoder-only model (Llama, Qwen2, Qwen3 text): the simulator's text pools; no mapper.
    Family(
        "llama", "Llama (text)", "LlamaForCausalLM", "LlamaForCausalLM", ("llama",), "meta-llama/Llama-3.1-8B",
        vision_markers=(), expected_modules=_LANG | {"embed_tokens", "lm_head"}, vlm=False),
)}

VLM_FAMILIES: tuple[str, ...] = tuple(n for n, f in FAMILIES.items() if f.vlm)
PIXEL_BUDGET_FAMILIES: tuple[str, ...] = tuple(n for n in VLM_FAMILIES if FAMILIES[n].pixel_budget is not None)
DEFAULT_FAMILY = "qwen2_5_vl"


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def detect_family(model: str, default: str = DEFAULT_FAMILY) -> str:
    """The family vLLM would pick from the model's architecture, guessed from its name or path (the longest
    marker that occurs wins: 'qwen35' over nothing, 'qwen25vl' rather than 'qwen2vl')."""
    key = re.sub(r"[^a-z0-9]", "", model.lower())
    found = [(len(m), name) for name, f in FAMILIES.items() for m in f.name_markers if m in key]
    return max(found)[1] if found else default
