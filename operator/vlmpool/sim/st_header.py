"""A safetensors file's header, read and checked the way the safetensors crate does (vLLM loads adapters
through it), without torch or the safetensors package."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

_DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
_MAX_HEADER = 100_000_000  # the safetensors crate's own limit


class SafetensorsError(Exception):
    pass


def read_safetensors_header(path: str) -> dict[str, dict[str, Any]]:
    """Parse and check a safetensors file's header the way the safetensors crate does.

    Returns ``{tensor_name: {"dtype", "shape", "data_offsets"}}`` (``__metadata__`` dropped).
    Raises ``SafetensorsError`` with the crate's wording ("Error while deserializing header: ...").
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError("Error while deserializing header: HeaderTooSmall")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError("Error while deserializing header: HeaderTooLarge")
        raw = f.read(n)
    if not raw.startswith(b"{"):
        raise SafetensorsError("Error while deserializing header: InvalidHeaderStart")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SafetensorsError("Error while deserializing header: InvalidHeaderDeserialization") from None
    if not isinstance(header, dict):
        raise SafetensorsError("Error while deserializing header: InvalidHeaderDeserialization")
    header.pop("__metadata__", None)
    end = 0
    for name, info in sorted(header.items(), key=lambda kv: data_offsets(kv[1])[0]):
        start, stop = data_offsets(info)
        dtype, shape = info.get("dtype"), info.get("shape")
        if dtype not in _DTYPE_SIZES or not isinstance(shape, list) or not all(
                isinstance(d, int) and d >= 0 for d in shape):
            raise SafetensorsError("Error while deserializing header: InvalidHeaderDeserialization")
        if start != end or stop < start:
            raise SafetensorsError(f"Error while deserializing header: InvalidOffset({name!r})")
        count = 1
        for d in shape:
            count *= d
        if (stop - start) != count * _DTYPE_SIZES[dtype]:
            raise SafetensorsError("Error while deserializing header: TensorInvalidInfo")
        end = stop
    if 8 + n + end != size:
        raise SafetensorsError("Error while deserializing header: MetadataIncompleteBuffer")
    return header


def data_offsets(info: Any) -> tuple[int, int]:
    try:
        a, b = info["data_offsets"]
        return int(a), int(b)
    except (TypeError, KeyError, ValueError):
        raise SafetensorsError("Error while deserializing header: InvalidHeaderDeserialization") from None

