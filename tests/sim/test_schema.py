"""The structured-output stand-in: every instance it builds validates against its schema
(checked with the jsonschema library), and unsatisfiable schemas are refused with a 400."""

from __future__ import annotations

import aiohttp
import jsonschema
import pytest

from vlmpool.sim.schema import SchemaError, instance
from vlmpool.sim.server import running_sim

SCHEMAS = [
    {"type": "string"},
    {"type": "string", "minLength": 40},
    {"type": "string", "maxLength": 3},
    {"type": "string", "format": "date-time"},
    {"type": "string", "pattern": "^sim:"},
    {"type": "integer", "minimum": 5, "maximum": 7},
    {"type": "integer", "exclusiveMinimum": 5, "multipleOf": 4},
    {"type": "number", "minimum": -2.5, "maximum": -1},
    {"type": "boolean"},
    {"type": "null"},
    {"type": ["null", "integer"]},
    {"enum": ["x", 1, None]},
    {"const": {"k": [1, 2]}},
    {"type": "array", "items": {"type": "integer"}, "minItems": 3},
    {"type": "array", "maxItems": 0},
    {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
    {"anyOf": [{"type": "string", "pattern": "^\\d{4}$"}, {"type": "integer"}]},
    {"oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}]},
    {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
               {"properties": {"b": {"type": "integer", "minimum": 1}}, "required": ["b"]}]},
    {"type": "object", "minProperties": 2, "additionalProperties": {"type": "integer"}},
    {"type": "object", "properties": {"tree": {"$ref": "#/$defs/node"}}, "required": ["tree"],
     "$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"},
                                                          "kids": {"type": "array", "items": {"$ref": "#/$defs/node"},
                                                                   "maxItems": 0}},
                        "required": ["v"]}}},
    {"type": "object", "properties": {"people_count": {"type": "integer", "minimum": 0},
                                      "persons": {"type": "array", "items": {"type": "object", "properties": {
                                          "appearance": {"type": "string"}, "action": {"type": "string"}},
                                          "required": ["appearance", "action"]}},
                                      "activity_level": {"enum": ["quiet", "moderate", "busy"]}},
     "required": ["people_count", "persons", "activity_level"], "additionalProperties": False},
    {"definitions": {"c": {"type": "string", "enum": ["red"]}}, "type": "object",
     "properties": {"color": {"$ref": "#/definitions/c"}}, "required": ["color"]},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
def test_instances_validate(schema):
    value = instance(schema, "sim:adapter-x path=/v/1")
    jsonschema.validate(value, schema)


def test_free_strings_carry_the_tag():
    value = instance({"type": "object", "properties": {"s": {"type": "string"}}}, "sim:a1 path=/p")
    assert value == {"s": "sim:a1 path=/p"}


@pytest.mark.parametrize("schema", [False, {"enum": []}, {"type": "string", "pattern": "^[0-9]{3}$"},
                                    {"$ref": "https://example.com/s.json"},
                                    {"type": "integer", "minimum": 3, "maximum": 2}])
def test_unsatisfiable_schemas_raise(schema):
    with pytest.raises(SchemaError):
        instance(schema, "sim")


async def test_unsupported_schema_is_a_400(fast_config):
    async with running_sim(fast_config()) as url, aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/chat/completions", json={
                "model": "qwen-base", "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
                    "type": "string", "pattern": "^[0-9]{3}$"}}}}) as r:
            assert r.status == 400
            body = await r.json()
            assert body["error"]["type"] == "BadRequestError" and body["error"]["param"] == "response_format"
        # vLLM's own structured-output field works too
        async with s.post(url + "/v1/chat/completions", json={
                "model": "qwen-base", "messages": [{"role": "user", "content": "x"}],
                "structured_outputs": {"json": {"type": "object", "properties": {"n": {"type": "integer"}},
                                                "required": ["n"]}}}) as r:
            assert r.status == 200
            assert (await r.json())["choices"][0]["message"]["content"] == '{"n": 0}'
