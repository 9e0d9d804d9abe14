"""A minimal instance of a JSON Schema, standing in for vLLM's guided decoding.

vLLM constrains generation to the schema (xgrammar / guidance backends); the simulator instead
builds the smallest instance that satisfies it: every required property, ``enum``/``const`` values,
nested objects and arrays (``minItems``), string/number bounds, ``anyOf``/``oneOf`` (first branch
that works), ``allOf`` (merged), local ``$ref`` (``#/$defs/...``, ``#/definitions/...``), type lists.
Free-form strings carry the served model's tag (``tag``) so a structured answer still names the
adapter that produced it, cut to ``maxLength`` where the schema bounds it.

``pattern`` is honoured only when the tag or the empty string already matches it; otherwise the
generator gives up on that string with ``SchemaError`` (vLLM itself refuses some patterns too).
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any


class SchemaError(ValueError):
    pass


_FORMATS = {
    "date-time": "2026-01-01T00:00:00Z",
    "date": "2026-01-01",
    "time": "00:00:00Z",
    "email": "sim@example.com",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "uri": "https://example.com/sim",
    "hostname": "sim.example.com",
    "ipv4": "127.0.0.1",
    "ipv6": "::1",
}


def instance(schema: Any, tag: str = "sim", *, root: Any = None, depth: int = 0) -> Any:
    """Return a JSON value that validates against ``schema``."""
    if root is None:
        root = schema
    if depth > 64:
        raise SchemaError("schema nesting too deep (recursive $ref without a base case?)")
    if schema is True or schema is None or schema == {}:
        return tag
    if schema is False:
        raise SchemaError("schema `false` admits no value")
    if not isinstance(schema, dict):
        raise SchemaError(f"not a JSON schema: {schema!r}")

    if "$ref" in schema:
        target = _resolve(schema["$ref"], root)
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return instance(merged, tag, root=root, depth=depth + 1)
    if "allOf" in schema:
        merged = _merge_all([{k: v for k, v in schema.items() if k != "allOf"}, *schema["allOf"]], root)
        return instance(merged, tag, root=root, depth=depth + 1)
    if "const" in schema:
        return copy.deepcopy(schema["const"])
    if "enum" in schema:
        if not schema["enum"]:
            raise SchemaError("empty enum")
        return copy.deepcopy(schema["enum"][0])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return _first_branch(schema, key, tag, root, depth)

    typ = _type_of(schema)
    if typ == "object":
        return _object(schema, tag, root, depth)
    if typ == "array":
        return _array(schema, tag, root, depth)
    if typ == "string":
        return _string(schema, tag)
    if typ in ("integer", "number"):
        return _number(schema, typ == "integer")
    if typ == "boolean":
        return True
    if typ == "null":
        return None
    raise SchemaError(f"unsupported type {typ!r}")


def _first_branch(schema: dict[str, Any], key: str, tag: str, root: Any, depth: int) -> Any:
    """An instance of the first satisfiable anyOf/oneOf branch (merged with the schema's other keys)."""
    base = {k: v for k, v in schema.items() if k != key}
    last: Exception | None = None
    for branch in schema[key]:
        try:
            return instance(_merge_all([base, branch], root), tag, root=root, depth=depth + 1)
        except SchemaError as e:
            last = e
    raise SchemaError(f"no {key} branch can be satisfied: {last}")


def _type_of(schema: dict[str, Any]) -> Any:
    """The schema's type: the first non-null one of a list, else guessed from the keywords present."""
    typ = schema.get("type")
    if isinstance(typ, list):
        types = [t for t in typ if t != "null"] or ["null"]
        typ = types[0]
    if typ is None:
        if "properties" in schema or "required" in schema:
            typ = "object"
        elif "items" in schema or "prefixItems" in schema:
            typ = "array"
        else:
            typ = "string"
    return typ


def _object(schema: dict[str, Any], tag: str, root: Any, depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    props = schema.get("properties") or {}
    required = list(schema.get("required") or [])
    # Fill every declared property (keeps the answer informative), required ones first.
    names = required + [p for p in props if p not in required]
    for name in names:
        sub = props.get(name)
        if sub is None:
            extra = schema.get("additionalProperties", True)
            sub = extra if isinstance(extra, dict) else {}
        out[name] = instance(sub, tag, root=root, depth=depth + 1)
    min_props = int(schema.get("minProperties", 0))
    i = 0
    while len(out) < min_props:
        extra = schema.get("additionalProperties", True)
        if extra is False:
            raise SchemaError("minProperties cannot be met without additionalProperties")
        out[f"sim_{i}"] = instance(extra if isinstance(extra, dict) else {}, tag, root=root,
                                   depth=depth + 1)
        i += 1
    return out


def _array(schema: dict[str, Any], tag: str, root: Any, depth: int) -> list[Any]:
    prefix = schema.get("prefixItems") or []
    items = schema.get("items", {})
    out_list = [instance(s, tag, root=root, depth=depth + 1) for s in prefix]
    n = max(int(schema.get("minItems", 0)), 1 if "maxItems" not in schema or schema["maxItems"] > 0 else 0)
    if items is False:
        n = len(out_list)
    while len(out_list) < n:
        out_list.append(instance(items if isinstance(items, dict) else {}, tag, root=root,
                                 depth=depth + 1))
    if schema.get("uniqueItems") and len(out_list) > 1:
        raise SchemaError("uniqueItems with minItems > 1 is not supported by the simulator")
    return out_list


def _string(schema: dict[str, Any], tag: str) -> str:
    fmt = schema.get("format")
    value = _FORMATS.get(fmt, tag) if fmt else tag
    lo = int(schema.get("minLength", 0))
    hi = schema.get("maxLength")
    if hi is not None:
        value = value[: int(hi)]
    if len(value) < lo:
        value = value + "x" * (lo - len(value))
    pattern = schema.get("pattern")
    if pattern is not None:
        for candidate in (value, "", tag):
            if re.search(pattern, candidate) and lo <= len(candidate) and (hi is None or len(candidate) <= hi):
                return candidate
        raise SchemaError(f"cannot build a string matching pattern {pattern!r}")
    return value


def _number(schema: dict[str, Any], integer: bool) -> int | float:
    lo = schema.get("minimum")
    hi = schema.get("maximum")
    xlo = schema.get("exclusiveMinimum")
    xhi = schema.get("exclusiveMaximum")
    step = 1 if integer else 0.5
    candidates: list[float] = [0]
    if lo is not None:
        candidates.insert(0, lo)
    if xlo is not None and not isinstance(xlo, bool):
        candidates.insert(0, xlo + step)
    for v in candidates:
        if integer:
            v = math.ceil(v)
        ok = ((lo is None or v >= lo) and (hi is None or v <= hi)
              and (xlo is None or isinstance(xlo, bool) or v > xlo)
              and (xhi is None or isinstance(xhi, bool) or v < xhi))
        mult = schema.get("multipleOf")
        if ok and mult:
            v = math.ceil(v / mult) * mult
            ok = (hi is None or v <= hi) and (xhi is None or isinstance(xhi, bool) or v < xhi)
        if ok:
            return int(v) if integer else v
    raise SchemaError("no number satisfies the bounds")


def _resolve(ref: str, root: Any) -> dict[str, Any]:
    if not ref.startswith("#"):
        raise SchemaError(f"only local $ref is supported, got {ref!r}")
    node: Any = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise SchemaError(f"unresolvable $ref {ref!r}")
        node = node[part]
    if not isinstance(node, dict):
        raise SchemaError(f"$ref {ref!r} is not a schema")
    return node


def _merge_all(schemas: list[Any], root: Any) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for s in schemas:
        if not isinstance(s, dict):
            continue
        if "$ref" in s:
            s = {**_resolve(s["$ref"], root), **{k: v for k, v in s.items() if k != "$ref"}}
        for k, v in s.items():
            if k == "properties" and isinstance(merged.get(k), dict):
                merged[k] = {**merged[k], **v}
            elif k == "required" and isinstance(merged.get(k), list):
                merged[k] = merged[k] + [x for x in v if x not in merged[k]]
            else:
                merged[k] = v
    return merged
