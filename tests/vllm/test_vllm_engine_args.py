"""The pool's engine command line (manifests/pool.py engine_args: the family's image budget and reasoning
parser from spec.model, defaults from the family table) is taken by the pinned vLLM's own `vllm serve`
argument parser and engine-args validation (vllm_engine_args.py, in the pinned vLLM's venv); the budget,
given to transformers' Qwen2-VL image processor after vLLM's alias completion, bounds resized images; the
simulator's list of reasoning parsers is vLLM's registry."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from vlmpool.api.pool import VLMPoolSpec
from vlmpool.families import FAMILIES, VLM_FAMILIES
from vlmpool.manifests.pool import engine_args
from vlmpool.sim import contract

HERE = Path(__file__).parent


def _spec(family: str, **model) -> VLMPoolSpec:
    return VLMPoolSpec.model_validate({"model": {"name": FAMILIES[family].test_model, "family": family, **model}})


SPECS = {f"default/{f}": _spec(f) for f in VLM_FAMILIES} | {
    "set/qwen3_5": _spec("qwen3_5", images={"minPixels": 4096, "maxPixels": 65536, "maxImagesPerPrompt": 3},
                         reasoning="off"),
    "set/qwen3_vl": _spec("qwen3_vl", images={"maxPixels": 400_000, "maxImagesPerPrompt": 0}, reasoning="qwen3"),
    "set/mistral3": _spec("mistral3", images={"maxImagesPerPrompt": 8}, reasoning="mistral"),
}


@pytest.fixture(scope="module")
def parsed(vllm_python, tmp_path_factory):
    cases = []
    for cid, spec in SPECS.items():
        budget = FAMILIES[spec.model.family].pixel_budget
        cases.append({"id": cid, "args": engine_args(spec), "factor": budget.factor if budget else None})
    # the parser really judges: a parser name it does not know is refused
    cases.append({"id": "bad/parser", "args": ["--model", "m", "--reasoning-parser", "qwen4"]})
    path = tmp_path_factory.mktemp("engine-args") / "cases.json"
    path.write_text(json.dumps(cases))
    done = subprocess.run([vllm_python, str(HERE / "vllm_engine_args.py"), str(path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["by_id"] = {r["id"]: r for r in out["results"]}
    return out


@pytest.mark.parametrize("cid", list(SPECS))
def test_vllm_takes_the_rendered_engine_args(parsed, cid):
    spec, r = SPECS[cid], parsed["by_id"][cid]
    assert r["ok"], r["error"]
    assert r["enable_lora"] is True
    assert r["reasoning_parser"] == (spec.model.reasoning_parser() or "")
    images = spec.model.images
    assert r["limit_mm_per_prompt"] == ({"image": images.max_images_per_prompt}
                                        if images and images.max_images_per_prompt is not None else {})
    budget = spec.model.pixel_budget()
    if budget is None:
        assert r["mm_processor_kwargs"] is None
    else:
        lo, hi = budget
        assert r["mm_processor_kwargs"] == {"size": {"shortest_edge": lo, "longest_edge": hi}}
        huge, tiny = r["pixels"]  # a 4000x3000 and a 30x20 image after resizing
        assert lo <= tiny <= huge <= hi, (r["pixels"], budget)


def test_vllm_refuses_an_unknown_reasoning_parser(parsed):
    r = parsed["by_id"]["bad/parser"]
    assert not r["ok"] and "invalid reasoning parser: qwen4" in r["error"]


def test_the_simulator_knows_vllm_s_reasoning_parsers(parsed):
    assert list(contract.REASONING_PARSERS) == parsed["reasoning_parsers"]
    assert all(f.reasoning_parser in parsed["reasoning_parsers"] for f in FAMILIES.values() if f.reasoning_parser)
