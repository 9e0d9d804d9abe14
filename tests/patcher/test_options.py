"""Each option of `vlmpool patch` is declared once (vlmpool.patcher.options): the CLI's flags and
defaults, PatchOptions' and patch_and_publish's defaults and the patch Job's arguments derive from it."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from typing import get_args

import pytest

from vlmpool.api.adapter import DoraSpec, VLMAdapterSpec
from vlmpool.api.objects import Adapter, Pool
from vlmpool.manifests import adapter as MA
from vlmpool.names import API_VERSION
from vlmpool.patcher import PatchOptions, patch_and_publish
from vlmpool.patcher import cli as patcher_cli
from vlmpool.patcher.options import BASE_CHECKS, BY_DEST, DORA_POLICIES, OPTIONS, argv
from vlmpool.patcher.summary import PatchSummary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    patcher_cli.configure(p)
    return p


def test_each_cli_default_is_the_declared_default():
    defaults = vars(parser().parse_args([]))
    for option in OPTIONS:
        assert defaults[option.dest] == option.default, option.flag


def test_patch_options_and_patch_and_publish_take_the_declared_defaults():
    for f in dataclasses.fields(PatchOptions):
        assert f.name in BY_DEST, f"PatchOptions.{f.name} is no declared option"
        if f.default is not dataclasses.MISSING:
            assert f.default == BY_DEST[f.name].default, f.name
    for name, param in inspect.signature(patch_and_publish).parameters.items():
        if name in BY_DEST and param.default is not inspect.Parameter.empty:
            assert param.default == BY_DEST[name].default, name


def test_cli_dests_are_the_option_names():
    """cli.run builds PatchOptions by field name: every field must come out of the parser so."""
    args = parser().parse_args(["--source", "s", "--adapter", "a", "--root", "/r", "--pool-base", "b",
                                "--family", "qwen2_vl"])
    opts = PatchOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PatchOptions)})
    assert opts.family == "qwen2_vl" and opts.pool_base == "b" and opts.max_rank == BY_DEST["max_rank"].default


def _adapters_and_pools():
    base = {"model": {"name": "Qwen/Qwen2.5-VL-3B-Instruct", "family": "qwen2_5_vl"}}
    weighted = {"model": {**base["model"], "weights": {"claimName": "weights", "path": "/model"}},
                "engine": {"towerConnectorLora": True}}
    specs = [
        {"source": {"uri": "hf://acme/ft@v1"}},
        {"source": {"uri": "pvc://uploads/team/v1", "sha256": "a" * 64}, "declaredBase": "qwen2.5-vl-3b-peft"},
        {"source": {"uri": "https://example.com/a.tgz"}, "dora": {"policy": "svd", "rank": 8, "maxError": 0.1}},
        {"source": {"uri": "file:///srv/adapters/ft"}, "dora": {"policy": "strip", "maxError": 0.2},
         "baseModelCheck": "warn"},
    ]
    for pspec in (base, weighted):
        pool = Pool.parse({"apiVersion": API_VERSION, "kind": "VLMPool",
                           "metadata": {"name": "vision", "namespace": "ml", "uid": "u"}, "spec": pspec})
        for spec in specs:
            yield Adapter.parse({"apiVersion": API_VERSION, "kind": "VLMAdapter",
                                 "metadata": {"name": "invoices", "namespace": "ml", "uid": "a"},
                                 "spec": {"poolRef": {"name": "vision"}, **spec}}), pool


def test_patch_args_only_emit_declared_flags_and_the_patcher_parses_them():
    declared = {o.flag for o in OPTIONS}
    emitted = set()
    for adapter, pool in _adapters_and_pools():
        args = MA.patch_args(adapter, pool)
        assert args[0] == "patch"
        flags = {a for a in args[1:] if a.startswith("--")}
        assert flags <= declared, flags - declared
        emitted |= flags
        parsed = parser().parse_args(args[1:])
        assert parsed.source == adapter.spec.source.uri and parsed.dora_policy == adapter.spec.dora.policy
        assert parsed.base_check == adapter.spec.base_model_check
    # every branch of patch_args ran
    assert {"--svd-rank", "--dora-max-error", "--declared-variant", "--base-weights", "--sha256",
            "--tower-connector-lora", "--pvc-root"} <= emitted


def test_argv_knows_only_declared_options():
    assert argv([("max_rank", "8"), ("tower_connector_lora", True)]) == ["--max-rank", "8", "--tower-connector-lora"]
    assert argv([("tower_connector_lora", False)]) == []
    with pytest.raises(KeyError):
        argv([("max_ranks", "8")])


def test_one_dora_policy_list_and_one_base_check_list():
    spec = VLMAdapterSpec.model_fields
    assert get_args(DoraSpec.model_fields["policy"].annotation) == DORA_POLICIES == BY_DEST["dora_policy"].choices
    assert get_args(spec["base_model_check"].annotation) == BASE_CHECKS == BY_DEST["base_check"].choices
    assert DoraSpec().policy == BY_DEST["dora_policy"].default


def test_one_patch_summary_layout_both_sides():
    """What the patcher writes (to_message) is what the operator reads back (from_message)."""
    s = PatchSummary(tensors_kept=8, tensors_remapped=0, tensors_dropped=2, rank=8, dora_policy="strip",
                     dora_error=0.01, declared_base="Qwen/Qwen2.5-VL-3B", pool_base="Qwen/Qwen2.5-VL-3B",
                     base_check="match", declared_variant_check="match", warnings=["w"])
    message = {"ok": True, "version": "v", **s.to_message()}
    assert PatchSummary.from_message(message) == {k: v for k, v in s.to_message().items() if v is not None}
    assert PatchSummary.model_validate(PatchSummary.from_message(message)) == s
