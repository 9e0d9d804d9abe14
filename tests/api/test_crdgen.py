"""The checked-in CRD YAML is exactly what the models generate, and the generated schemas are
structural (the apiserver tests prove they are accepted)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from vlmpool.api.adapter import VLMAdapterSpec
from vlmpool.api.crdgen import render
from vlmpool.api.pool import VLMPoolSpec

CRD_DIR = Path(__file__).resolve().parents[2] / "crds"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_checked_in_crds_match_the_models():
    rendered = render()
    on_disk = {p.name: p.read_text() for p in CRD_DIR.glob("*.yaml")}
    assert set(on_disk) == set(rendered), "crds/ holds other files than the generator writes"
    for name, text in rendered.items():
        assert on_disk[name] == text, f"crds/{name} is stale: run `make crds`"


def _walk(schema, path="$"):
    yield path, schema
    for key, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("name", sorted(render()))
def test_schemas_are_structural_and_documented(name):
    crd = yaml.safe_load(render()[name])
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(root):
        assert "$ref" not in node and "anyOf" not in node and "allOf" not in node, path
        # IntOrString (a rollout's 1 or "25%") is the one typeless node a structural schema allows
        assert "type" in node or node.get("x-kubernetes-int-or-string") is True, f"{path} has no type"
        assert node.get("default", 0) is not None, f"{path} defaults to null"
        if node.get("type") == "object" and "properties" in node:
            assert "additionalProperties" not in node, path
        if path.startswith(("$.spec.", "$.status.")) and not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{path} has no description"


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_parse_with_the_models(example):
    for doc in yaml.safe_load_all(example.read_text()):
        model = VLMPoolSpec if doc["kind"] == "VLMPool" else VLMAdapterSpec
        model.model_validate(doc["spec"])


def test_models_refuse_what_the_crd_refuses():
    with pytest.raises(ValidationError):
        VLMAdapterSpec.model_validate({"poolRef": {"name": "p"}, "source": {"uri": "ftp://x/y"}})
    with pytest.raises(ValidationError):
        VLMPoolSpec.model_validate({"model": {"name": "m", "family": "qwen2_vl"}, "replicas": -1})
    with pytest.raises(ValidationError):
        VLMPoolSpec.model_validate({"model": {"name": "m", "family": "qwen2_vl"}, "unknown": 1})
