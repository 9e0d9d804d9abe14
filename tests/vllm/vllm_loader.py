"""Run vLLM's own LoRA loader on adapter directories, as ``WorkerLoRAManager._load_adapter`` does.

Runs under the pinned vLLM's environment (``make test-vllm``: a venv cached under ~/.cache/vlmpool), never under
vlmpool's: it imports nothing from vlmpool. Usage: ``python vllm_loader.py CASES.json`` where CASES.json is a list of
``{"id", "family", "architecture", "text_architecture", "path", "max_lora_rank", "tower_connector_lora"}``
(the architectures come from vlmpool's family table; text_architecture names the language model a class
builds from the checkpoint's text_config, null where the class names it itself); prints one JSON object (the last
line of stdout): ``{"vllm": version, "families": {family: model facts}, "results": [{"id", "ok",
"error", "modules"}]}``.

What vLLM does at ``add_lora`` (vllm/lora/worker_manager.py ``_load_adapter``) and what runs here:
expected modules = ``get_supported_lora_modules(model)`` expanded through the model's packed modules
mapping; ``PEFTHelper.from_local_dir`` → ``validate_legal(LoRAConfig)`` →
``LoRAModel.from_local_checkpoint(..., weights_mapper=model.hf_to_vllm_mapper.get_rename_mapper(),
device="cpu")``. Those three are vLLM's code, unchanged. Two things are not as in the engine:

* ``PIN_MEMORY`` is switched off: ``pin_memory()`` is the only CUDA call on this path and there is no GPU
  (vLLM's CPU platform switches it off too).
* The model is not instantiated. vLLM builds it from a full ``VllmConfig`` inside a distributed group, and
  its attention layers ask the current platform for a backend (not set up here; the
  real engine, tests/vllm/test_sim_vs_vllm.py, does build it). So the facts
  ``get_supported_lora_modules`` and ``get_packed_modules_mapping`` read from the live module tree are read
  from the model classes instead, programmatically (``model_facts``): starting at the architecture's
  class, every nn.Module class its methods construct (or take as a default argument, such as
  ``decoder_layer_type``) is followed (the language model through the model registry, as
  ``init_vllm_registered_model`` resolves it, or the case's text_architecture), as are the classes that
  vLLM builder functions it calls return (``init_vision_tower_for_mistral3``); the attribute name of every
  ``LinearBase`` subclass it assigns, directly or through a factory method returning one
  (``self.create_qkvz_proj``), (an index inside ``nn.ModuleList``/``nn.Sequential``) is a supported module,
  as is
  every ``embedding_modules`` entry of a class met; the packed mapping is the class's own or, when empty,
  the union of its direct children's, as ``get_packed_modules_mapping`` does.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import sys
import textwrap
import traceback


def _registry_class(arch: str):
    from vllm.model_executor.models.registry import _VLLM_MODELS

    module, name = _VLLM_MODELS[arch]
    return getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), name)


def _resolve(node: ast.AST, namespace: dict):
    if isinstance(node, ast.Name):
        return namespace.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, namespace)
        return getattr(base, node.attr, None) if base is not None else None
    return None


def _architectures_named(node: ast.Call) -> list[str]:
    """The names in a call's architectures=[...]: init_vllm_registered_model(architectures=["Qwen2ForCausalLM"])."""
    return [elt.value for kw in node.keywords if kw.arg == "architectures" and isinstance(kw.value, ast.List)
            for elt in kw.value.elts if isinstance(elt, ast.Constant) and isinstance(elt.value, str)]


def _factory_return(value: ast.AST, klass: type):
    """`self.create_x(...)`: the class its return annotation names (vLLM builds some layers in factory methods)."""
    if not (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
            and isinstance(value.func.value, ast.Name) and value.func.value.id == "self"):
        return None
    method = getattr(klass, value.func.attr, None)
    return _returned_class(method) if callable(method) else None


def _scan_self_assign(node: ast.Assign, ns: dict, supported: set[str], klass: type):
    """`self.x = SomeLinear(...)` (or a ModuleList/Sequential of them): add the LoRA-able names to supported.

    Returns what the right-hand side calls, or None where the target is not an attribute of self."""
    import torch.nn as nn
    from vllm.model_executor.layers.linear import LinearBase

    tgt = node.targets[0]
    if not (isinstance(tgt, ast.Attribute) and isinstance(tgt.value, ast.Name) and tgt.value.id == "self"):
        return None
    value = node.value
    called = _resolve(value.func, ns) if isinstance(value, ast.Call) else None
    if called is None:
        called = _factory_return(value, klass)
    if isinstance(called, type) and issubclass(called, LinearBase):
        supported.add(tgt.attr)
    elif called in (nn.ModuleList, nn.Sequential):
        elts = value.args[0].elts if (value.args and isinstance(value.args[0], ast.List)) else value.args
        for i, elt in enumerate(elts):
            c = _resolve(elt.func, ns) if isinstance(elt, ast.Call) else None
            if isinstance(c, type) and issubclass(c, LinearBase):
                supported.add(str(i))
    return called


def _returned_class(fn):
    """The class a vLLM builder function's return annotation names (init_vision_tower_for_mistral3 ->
    PixtralHFVisionModel), or None."""
    try:
        return inspect.get_annotations(fn, eval_str=True).get("return")
    except Exception:
        return None


def _built_by(node: ast.Call, ns: dict, case: dict) -> list[type]:
    """The module classes a call builds: a module class itself, the class a vLLM builder function returns,
    and the language model ``init_vllm_registered_model`` resolves (its architectures=[...], else the case's
    text_architecture)."""
    import torch.nn as nn
    from vllm.model_executor.layers.linear import LinearBase

    target = _resolve(node.func, ns)
    if inspect.isfunction(target) and target.__module__.startswith("vllm.model_executor.models"):
        built = _returned_class(target)
    else:
        built = target
    out = [built] if isinstance(built, type) and issubclass(built, nn.Module) and not issubclass(
        built, LinearBase) else []
    named = _architectures_named(node)
    if not named and case.get("text_architecture") and getattr(target, "__name__", "") == "init_vllm_registered_model":
        named = [case["text_architecture"]]
    return out + [_registry_class(arch) for arch in named]


def model_facts(case: dict) -> dict:
    """(supported_lora_modules, packed_modules_mapping, embedding_modules, classes) of the family's model."""
    import torch.nn as nn

    top = _registry_class(case["architecture"])
    supported: set[str] = set()
    embedding: set[str] = set()
    seen: set[type] = set()
    children: dict[type, list[type]] = {}
    queue = [top]
    while queue:
        cls = queue.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for emb in getattr(cls, "embedding_modules", None) or {}:
            embedding.add(emb)
        for klass in cls.__mro__:
            if klass in (nn.Module, object) or not issubclass(klass, nn.Module) or klass.__module__.startswith("torch"):
                continue
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
            except (OSError, TypeError):
                continue
            ns = vars(sys.modules[klass.__module__])
            for node in ast.walk(tree):
                if isinstance(node, ast.arguments):  # Qwen2Model(..., decoder_layer_type=Qwen2DecoderLayer)
                    for default in node.defaults + [d for d in node.kw_defaults if d is not None]:
                        target = _resolve(default, ns)
                        if isinstance(target, type) and issubclass(target, nn.Module):
                            queue.append(target)
                if isinstance(node, ast.Call):
                    for built in _built_by(node, ns, case):
                        queue.append(built)
                        if built.__name__ in _architectures_named(node) or built.__name__ == case.get(
                                "text_architecture"):
                            children.setdefault(cls, []).append(built)
                if isinstance(node, ast.Assign) and len(node.targets) == 1:
                    called = _scan_self_assign(node, ns, supported, klass)
                    if isinstance(called, type) and issubclass(called, nn.Module) and klass is top:
                        children.setdefault(top, []).append(called)
    packed = dict(getattr(top, "packed_modules_mapping", None) or {})
    if not packed:
        for child in children.get(top, []):
            packed.update(getattr(child, "packed_modules_mapping", None) or {})
    supported |= embedding
    return {"architecture": top.__name__, "supported": sorted(supported), "packed": packed,
            "embedding": sorted(embedding), "mapper": dict(top.hf_to_vllm_mapper.orig_to_new_prefix),
            "tower_connector": bool(getattr(top, "supports_tower_connector_lora", False)),
            "classes": len(seen)}


def expected_modules(facts: dict) -> set[str]:
    """WorkerLoRAManager._load_adapter's expansion, verbatim in effect."""
    out: list[str] = []
    for module in facts["supported"]:
        if module in facts["packed"]:
            out.extend(facts["packed"][module])
        else:
            out.append(module)
        if module == "experts":
            out.append(module)
    return set(out)


def load(case: dict, facts: dict) -> dict:
    import vllm.lora.lora_model as lora_model
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    lora_model.PIN_MEMORY = False  # the only CUDA call on this path
    top = _registry_class(case["architecture"])
    try:
        helper = PEFTHelper.from_local_dir(case["path"], 4096)
        helper.validate_legal(LoRAConfig(max_lora_rank=case.get("max_lora_rank", 64), max_loras=1,
                                         enable_tower_connector_lora=bool(case.get("tower_connector_lora"))))
        model = lora_model.LoRAModel.from_local_checkpoint(
            case["path"], expected_modules(facts), helper, lora_model_id=1, device="cpu",
            weights_mapper=top.hf_to_vllm_mapper.get_rename_mapper(),
            skip_prefixes=getattr(top, "lora_skip_prefixes", None))
    except FileNotFoundError as e:
        return {"id": case["id"], "ok": False, "error": f"FileNotFoundError: {e}"}
    except Exception as e:
        return {"id": case["id"], "ok": False, "error": str(e), "type": type(e).__name__}
    modules = {name: [list(w.lora_a.shape) if w.lora_a is not None else None,
                      list(w.lora_b.shape) if w.lora_b is not None else None, w.rank, w.scaling]
               for name, w in model.loras.items()}
    return {"id": case["id"], "ok": True, "modules": modules}


def main() -> None:
    import vllm

    with open(sys.argv[1]) as f:
        cases = json.load(f)
    first = {c["family"]: c for c in cases}
    families = {fam: model_facts(first[fam]) for fam in sorted(first)}
    for facts in families.values():
        facts["expected"] = sorted(expected_modules(facts))
    results = []
    for case in cases:
        try:
            results.append(load(case, families[case["family"]]))
        except Exception:
            results.append({"id": case["id"], "ok": None, "error": traceback.format_exc()})
    print(json.dumps({"vllm": vllm.__version__, "families": families, "results": results}))


if __name__ == "__main__":
    main()
