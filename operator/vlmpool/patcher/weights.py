"""The adapter's weights file, read and written without torch.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (``{name: {dtype,
shape, data_offsets}}`` plus an optional ``__metadata__`` of strings), then the tensors' bytes. A plain
LoRA needs no tensor maths: the patch keeps, renames or drops whole tensors, so ``read_weights`` parses
the header itself, treating it as hostile (bounded size, offsets inside the file, tensors covering the
data exactly once with no overlap or hole, byte length = elements x dtype size, no duplicate names),
and the kept tensors are written back from their byte ranges by the safetensors library's own
serialiser, the one ``safetensors.torch.save`` calls, so the output is byte-identical to the torch
path's (tests/patcher/test_bytepath.py compares them).

torch is imported only when a tensor is asked for as a torch tensor (the DoRA maths), and numpy only
to measure the norm of a vision-tower ``lora_B`` that is not all zeros.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmpool.patcher.errors import PatchError
from vlmpool.patcher.sources.fetchlib import WEIGHTS_NAME

# safetensors header dtype -> (bytes per element, the name safetensors' serialiser and torch use)
DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (1, "bool"), "U8": (1, "uint8"), "I8": (1, "int8"), "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"), "I16": (2, "int16"), "U16": (2, "uint16"), "F16": (2, "float16"),
    "BF16": (2, "bfloat16"), "I32": (4, "int32"), "U32": (4, "uint32"), "F32": (4, "float32"),
    "I64": (8, "int64"), "U64": (8, "uint64"), "F64": (8, "float64"),
}
_BY_NAME = {name: code for code, (_, name) in DTYPES.items()}
# An adapter's header is a few hundred bytes per tensor (tens of KiB for 28 layers x 7 modules);
# 16 MiB is room for ~100 000 tensors and bounds the JSON parser's memory.
HEADER_MAX_BYTES = 16 * 1024 * 1024
TENSOR_FIELDS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class RawTensor:
    """One tensor as bytes: header dtype code (``BF16``), shape, and its little-endian data."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview
    ptr: int | None = None  # address of data when it lies in an immutable buffer that outlives the write

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _bad(msg: str) -> PatchError:
    return PatchError("InvalidWeights", f"{WEIGHTS_NAME} is not a readable safetensors file: {msg}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _bad(f"the header names {k[:200]!r} twice")
        out[k] = v
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _header_object(raw: bytes) -> dict[str, Any]:
    """The header's JSON object (UTF-8, no duplicate keys), else PatchError(InvalidWeights)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(f"the header is not UTF-8 ({e})") from None
    if not text.startswith("{"):
        raise _bad("the header is not a JSON object")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:
        if isinstance(e, PatchError):
            raise
        raise _bad(f"the header is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(header, dict):  # pragma: no cover - startswith("{") and valid JSON imply a dict
        raise _bad("the header is not a JSON object")
    return header


def parse_header(buf: bytes | bytearray | memoryview, size: int | None = None, max_header: int = HEADER_MAX_BYTES
                 ) -> tuple[dict[str, str] | None, dict[str, tuple[str, tuple[int, ...], int, int]]]:
    """Validate the header of the safetensors bytes ``buf`` (the whole file, or its first 8 + N bytes
    with the file's ``size``). Returns (metadata, {name: (dtype, shape, begin, end)}) with begin/end
    absolute offsets into the file. Raises PatchError(InvalidWeights)."""
    size = len(buf) if size is None else size
    if size < 8:
        raise _bad(f"{size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(bytes(buf[:8]), "little")
    if n > max_header:
        raise _bad(f"the header claims {n} bytes, over the {max_header}-byte limit")
    if 8 + n > size:
        raise _bad(f"the header claims {n} bytes but the file has only {size - 8} after the length")
    header = _header_object(bytes(buf[8:8 + n]))
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise _bad("__metadata__ must map strings to strings")
    data_start, data_len = 8 + n, size - 8 - n
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        what = repr(name[:200])
        if not name:
            raise _bad("a tensor has an empty name")
        if not isinstance(info, dict) or set(info) != TENSOR_FIELDS:
            raise _bad(f"tensor {what} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise _bad(f"tensor {what} has unknown dtype {str(dtype)[:40]!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _bad(f"tensor {what} has an invalid shape (a list of non-negative integers is needed)")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise _bad(f"tensor {what} has invalid data_offsets (two integers 0 <= begin <= end are needed)")
        begin, end = offsets
        if end > data_len:
            raise _bad(f"tensor {what} ends at byte {end}, past the {data_len} bytes of data")
        nbytes = math.prod(shape) * DTYPES[dtype][0]
        if nbytes != end - begin:
            raise _bad(f"tensor {what} is {dtype} {shape}, {nbytes} bytes, but its data_offsets span {end - begin}")
        entries[name] = (dtype, tuple(shape), data_start + begin, data_start + end)
    pos = data_start
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < pos:
            raise _bad(f"tensor {name[:200]!r} overlaps the tensor before it")
        if begin > pos:
            raise _bad(f"there are {begin - pos} unused bytes before tensor {name[:200]!r}")
        pos = end
    if pos != size:
        raise _bad(f"{size - pos} bytes after the last tensor are not described by the header")
    return metadata, entries


def read_header(path: Path | str) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """The validated header of a safetensors file, reading only the header (base weights: shapes)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            if 8 + n <= size and n <= HEADER_MAX_BYTES:
                head += f.read(n)
    except OSError as e:
        raise _bad(str(e)) from None
    return parse_header(head, size)[1]


class Weights:
    """The adapter's tensors, read once into memory (the file is bounded by --max-file-bytes) and
    validated; tensors are served as byte views, or as torch tensors when DoRA maths needs them."""

    def __init__(self, data: bytes):
        self.data = bytes(data)  # immutable: the addresses handed to the serialiser stay valid
        self._addr = ctypes.cast(ctypes.c_char_p(self.data), ctypes.c_void_p).value or 0
        self.metadata, self.entries = parse_header(self.data)
        self.digest = hashlib.sha256(data).hexdigest()
        self._torch: dict[str, Any] = {}

    @classmethod
    def read(cls, path: Path | str) -> Weights:
        try:
            with open(path, "rb") as f:  # one read, no copy after it: tensors are served from this buffer
                size = os.fstat(f.fileno()).st_size
                data = f.read()
                if len(data) != size:
                    raise OSError("the file changed size while it was read")
        except OSError as e:
            raise _bad(str(e)) from None
        return cls(data)

    def keys(self) -> list[str]:
        return list(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def raw(self, key: str) -> RawTensor:
        dtype, shape, begin, end = self.entries[key]
        return RawTensor(dtype, shape, memoryview(self.data)[begin:end], self._addr + begin)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def norm(self, key: str) -> float:
        """Frobenius norm (what ``torch.linalg.vector_norm(t.float())`` gives, to float rounding);
        0.0 without any maths when every byte is zero (an untrained lora_B)."""
        raw = self.raw(key)
        if raw.data == bytes(len(raw.data)):
            return 0.0
        return raw_norm(raw)

    def serialize(self, out: dict[str, tuple[str | None, RawTensor | None]], metadata: dict[str, str] | None):
        """The output file from (source key, or a new RawTensor) per output key; returns (bytes, tensors)."""
        tensors = {k: (self.raw(src) if src is not None else _given(raw)) for k, (src, raw) in out.items()}
        return serialize(tensors, metadata), tensors

    def tensor(self, key: str):
        """The tensor as a torch tensor (imports torch: the DoRA maths only)."""
        t = self._torch.get(key)
        if t is None:
            torch = import_torch("DoRA maths")

            dtype, shape, begin, end = self.entries[key]
            dt = getattr(torch, DTYPES[dtype][1])  # a private copy: torch wants a writable buffer
            t = torch.frombuffer(bytearray(memoryview(self.data)[begin:end]), dtype=dt).reshape(shape) if end > begin \
                else torch.zeros(shape, dtype=dt)
            self._torch[key] = t
        return t


def import_torch(why: str):
    """torch, or the NeedsTorch refusal where the image was built without it (the default patcher image)."""
    try:
        import torch
    except ImportError:
        raise PatchError("NeedsTorch", f"{why} needs torch, which this patcher does not have: run the DoRA-capable "
                         "patcher image (images/Dockerfile target patcher-dora; pip extra vlmpool[dora])") from None
    return torch


def raw_norm(raw: RawTensor) -> float:
    import numpy as np

    if raw.dtype == "BF16":  # numpy has no bfloat16: its bits are the top half of a float32
        x = (np.frombuffer(raw.data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    elif raw.dtype.startswith("F8"):  # numpy has no float8 either; such a vision lora_B is rare enough for torch
        torch = import_torch("the norm of a float8 vision-tower lora_B")

        t = torch.frombuffer(bytearray(raw.data), dtype=getattr(torch, DTYPES[raw.dtype][1]))
        return float(torch.linalg.vector_norm(t.float()))
    else:
        x = np.frombuffer(raw.data, dtype=np.dtype(DTYPES[raw.dtype][1]).newbyteorder("<"))
    x = x.astype(np.float64)
    return float(math.sqrt(float(np.dot(x, x))))


def from_torch(t) -> RawTensor:
    """A torch tensor (the DoRA svd's new factors) as bytes."""
    t = t.detach().cpu().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    data = bytearray(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())) if t.numel() else bytearray()
    return RawTensor(_BY_NAME[name], tuple(t.shape), memoryview(data))


def _given(raw: RawTensor | None) -> RawTensor:
    """The new tensor of an output entry without a source key (serialize's contract: one of the two is set)."""
    if raw is None:
        raise ValueError("an output tensor needs a source key or a new RawTensor")
    return raw


def serialize(tensors: dict[str, RawTensor], metadata: dict[str, str] | None) -> bytes:
    """The safetensors bytes of ``tensors``, by the safetensors library's serialiser (the one
    safetensors.torch.save uses: same tensor order, header layout and padding)."""
    import safetensors

    spec = getattr(safetensors, "TensorSpec", None)
    if spec is None:  # pragma: no cover - safetensors < 0.7 takes the bytes themselves
        return bytes(safetensors.serialize({k: {"dtype": DTYPES[t.dtype][1], "shape": list(t.shape),
                                                "data": bytes(t.data)} for k, t in tensors.items()}, metadata))  # type: ignore[misc]  # the old signature
    keep: list[Any] = []
    flat = {}
    for k, t in tensors.items():
        n = len(t.data)
        if not n:
            ptr = 0
        elif t.ptr is not None:
            ptr = t.ptr
        else:
            buf = (ctypes.c_char * n).from_buffer(t.data)
            keep.append(buf)
            ptr = ctypes.addressof(buf)
        flat[k] = spec(dtype=DTYPES[t.dtype][1], shape=list(t.shape), data_ptr=ptr, data_len=n)
    try:
        return bytes(safetensors.serialize(flat, metadata=metadata))
    finally:
        del keep


class TorchWeights:
    """The same interface on torch tensors: ``safetensors.torch.load_file`` in, ``save`` out. The patch's
    path before the byte path (``--tensor-io torch``), kept to compare with (tests, bench/patch.py)."""

    def __init__(self, path: Path | str):
        import torch  # noqa: F401 - the point of this class
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            self.tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise PatchError("InvalidWeights", f"{WEIGHTS_NAME} is not a readable safetensors file: {e}") from None
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        self.digest = h.hexdigest()

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def norm(self, key: str) -> float:
        import torch

        return float(torch.linalg.vector_norm(self.tensors[key].float()))

    def tensor(self, key: str):
        return self.tensors[key]

    def serialize(self, out: dict[str, tuple[str | None, RawTensor | None]], metadata: dict[str, str] | None):
        import torch
        from safetensors.torch import save

        def as_torch(raw: RawTensor):
            dt = getattr(torch, DTYPES[raw.dtype][1])
            return torch.frombuffer(bytearray(raw.data), dtype=dt).reshape(raw.shape) if len(raw.data) else \
                torch.zeros(raw.shape, dtype=dt)
        tensors = {k: (self.tensors[src].contiguous() if src is not None else as_torch(_given(raw)))
                   for k, (src, raw) in out.items()}
        return save(tensors, metadata=metadata), tensors
