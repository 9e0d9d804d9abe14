"""The one family table (vlmpool/families.py) is what every part reads, and a pool's image budget and
reasoning (spec.model.images / reasoning, defaults from the table) become the engine's arguments, which the
simulator parses as vLLM does (tests/vllm: vLLM's own parser takes them, transformers' processor honours them)."""

from __future__ import annotations

import json
import typing

import pytest
from pydantic import ValidationError

from vlmpool.api.pool import ModelFamily, VLMPoolSpec
from vlmpool.families import FAMILIES, VLM_FAMILIES
from vlmpool.manifests.pool import engine_args


def spec(family: str, **model) -> VLMPoolSpec:
    return VLMPoolSpec.model_validate({"model": {"name": FAMILIES[family].test_model, "family": family, **model}})


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_every_family_list_is_the_table():
    from vlmpool.api.crdgen import model_schema
    from vlmpool.api.pool import BaseModelSpec
    from vlmpool.patcher.cli import FAMILY_CHOICES
    from vlmpool.sim.adapters import FAMILIES as SIM_FAMILIES
    from vlmpool.testing.adapters import FAMILIES as TEST_FAMILIES

    assert typing.get_args(ModelFamily) == VLM_FAMILIES == FAMILY_CHOICES == TEST_FAMILIES
    assert set(SIM_FAMILIES) == set(FAMILIES)
    assert {"qwen3_5", "gemma3", "mistral3"} <= set(VLM_FAMILIES) and "llama" not in VLM_FAMILIES
    assert tuple(model_schema(BaseModelSpec)["properties"]["family"]["enum"]) == VLM_FAMILIES


@pytest.mark.parametrize(("family", "budget", "parser"), [
    ("qwen3_5", (16 * 32 * 32, 512 * 32 * 32), "qwen3"),
    ("qwen3_vl", (256 * 28 * 28, 1280 * 28 * 28), None),
    ("qwen2_5_vl", (4 * 28 * 28, 1280 * 28 * 28), None),
    ("gemma3", None, None),
    ("mistral3", None, None),
])
def test_family_defaults_become_engine_args(family, budget, parser):
    args = engine_args(spec(family))
    kwargs = flag(args, "--mm-processor-kwargs")
    if budget is None:
        assert kwargs is None
    else:  # the Qwen-VL processors' size keys (transformers 5)
        assert json.loads(kwargs) == {"size": {"shortest_edge": budget[0], "longest_edge": budget[1]}}
    assert flag(args, "--reasoning-parser") == parser
    assert "--limit-mm-per-prompt" not in args


def test_pool_settings_override_the_defaults():
    args = engine_args(spec("qwen3_5", images={"minPixels": 4096, "maxPixels": 65536, "maxImagesPerPrompt": 3},
                            reasoning="off"))
    assert json.loads(flag(args, "--mm-processor-kwargs")) == {"size": {"shortest_edge": 4096, "longest_edge": 65536}}
    assert json.loads(flag(args, "--limit-mm-per-prompt")) == {"image": 3}
    assert "--reasoning-parser" not in args
    # one bound set: the other is the family's default
    args = engine_args(spec("qwen3_vl", images={"maxPixels": 400_000}, reasoning="qwen3"))
    assert json.loads(flag(args, "--mm-processor-kwargs"))["size"] == {"shortest_edge": 256 * 28 * 28,
                                                                       "longest_edge": 400_000}
    assert flag(args, "--reasoning-parser") == "qwen3"
    # families without a pixel budget still take images per prompt and a parser
    args = engine_args(spec("mistral3", images={"maxImagesPerPrompt": 0}, reasoning="mistral"))
    assert flag(args, "--limit-mm-per-prompt") == '{"image":0}' and flag(args, "--reasoning-parser") == "mistral"
    # the pool's own extra args come last (vLLM: the last occurrence wins)
    args = engine_args(VLMPoolSpec.model_validate({"model": {"name": "m", "family": "qwen3_5"},
                                                   "engine": {"extraArgs": ["--reasoning-parser", "deepseek_r1"]}}))
    assert args[-2:] == ["--reasoning-parser", "deepseek_r1"]


@pytest.mark.parametrize(("model", "message"), [
    ({"family": "qwen3_5", "images": {"minPixels": 100_000, "maxPixels": 50_000}},
     "minPixels 100000 exceeds maxPixels"),
    ({"family": "qwen3_5", "images": {"maxPixels": 1000}}, "minPixels 16384 exceeds maxPixels 1000"),
    ({"family": "qwen3_vl", "images": {"minPixels": 2_000_000}}, "exceeds maxPixels 1003520"),
    ({"family": "gemma3", "images": {"maxPixels": 1_000_000}}, "do not apply to family gemma3"),
    ({"family": "qwen3_5", "images": {"minPixels": 0}}, "greater than or equal to 1"),
    ({"family": "qwen3_5", "images": {"maxPixels": 16384 * 16384 + 1}}, "less than or equal to 268435456"),
    ({"family": "qwen3_5", "images": {"maxImagesPerPrompt": -1}}, "greater than or equal to 0"),
    ({"family": "qwen3_5", "images": {"maxImagesPerPrompt": 257}}, "less than or equal to 256"),
    ({"family": "qwen3_5", "reasoning": "Qwen3; rm"}, "Input should be 'off'"),
    ({"family": "qwen3_5", "reasoning": "qwen4"}, "Input should be 'off'"),
    ({"family": "qwen3_5", "images": {"pixels": 3}}, "Extra inputs are not permitted"),
    ({"family": "llama"}, "Input should be"),
])
def test_bad_image_and_reasoning_settings_are_refused(model, message):
    with pytest.raises(ValidationError, match=message):
        VLMPoolSpec.model_validate({"model": {"name": "m", **model}})


def _sim_config(args: list[str]):
    import argparse

    from vlmpool.sim.cli import config_from_args, configure

    parser = argparse.ArgumentParser()
    configure(parser)
    return config_from_args(parser.parse_args(args))


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_the_simulator_takes_the_rendered_engine_args(family):
    s = spec(family, images={"maxImagesPerPrompt": 2})
    cfg = _sim_config(engine_args(s))
    budget = s.model.pixel_budget()
    assert cfg.mm_processor_kwargs == (None if budget is None else
                                       {"size": {"shortest_edge": budget[0], "longest_edge": budget[1]}})
    assert cfg.limit_mm_per_prompt == {"image": 2}
    assert cfg.reasoning_parser == FAMILIES[family].reasoning_parser
    assert cfg.resolved_family() == family  # detected from the test model's name


@pytest.mark.parametrize(("args", "message"), [
    (["--reasoning-parser", "qwen4"], "invalid reasoning parser: qwen4 (chose from {"),
    (["--limit-mm-per-prompt", '{"image": -1}'], "limit of 'image' must be a non-negative integer"),
])
def test_the_simulator_refuses_what_vllm_refuses(args, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace("{", r"\{")):
        _sim_config(["m", *args])


@pytest.mark.parametrize("value", ["{bad", "[1, 2]"])
def test_the_simulator_parses_json_flags_as_vllm_does(value, capsys):
    with pytest.raises(SystemExit):
        _sim_config(["m", "--mm-processor-kwargs", value])
    assert "--mm-processor-kwargs" in capsys.readouterr().err
