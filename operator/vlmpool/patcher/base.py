"""Read-only access to a base model's weights (safetensors only), one tensor at a time; names and
shapes come from the files' headers (no torch), tensors from safetensors (torch: DoRA maths only).

Used by the DoRA ``svd`` policy (the exact merge needs W0), by ``strip`` to measure its error, and to
check the adapter's shapes against the base when the weights are at hand. Base weights are a local
directory (the pool's weights volume, mounted read-only into the patch Job): never downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlmpool.patcher.errors import PatchError
from vlmpool.patcher.families import Family, is_vision, layer_suffix
from vlmpool.patcher.weights import read_header


class BaseWeights:
    def __init__(self, path: Path | str, family: Family):
        self.path = Path(path)
        self.family = family
        if not self.path.is_dir():
            raise PatchError("BaseWeightsNotFound", f"base weights directory {self.path} does not exist")
        self._where: dict[str, Path] = {}
        self._headers: dict[Path, dict[str, tuple]] = {}
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise PatchError("BaseWeightsNotFound", f"{index} is not a safetensors index: {e}") from e
            self._where = {k: self.path / f for k, f in weight_map.items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
                hint = f" (found pickle files {', '.join(pickles[:3])}: only safetensors are read)" if pickles else ""
                raise PatchError("BaseWeightsNotFound", f"no *.safetensors in base weights directory {self.path}{hint}")
            for f in files:
                for k in self._header(f):
                    self._where[k] = f
        self._handles: dict[Path, object] = {}

    def candidates(self, module: str) -> list[str]:
        keys = [module + ".weight"]
        if module.startswith("model.") and is_vision(module, self.family):
            # the vision tower/connector without "model." (checkpoints saved before transformers 4.52, and
            # transformers 5's save_pretrained: visual., vision_tower., multi_modal_projector.)
            keys.append(module.removeprefix("model.") + ".weight")
        found = layer_suffix(module, self.family)
        if found:
            _, suffix = found
            keys += [p + suffix + ".weight" for p in self.family.base_layer_prefixes]
        return list(dict.fromkeys(keys))

    def key_for(self, module: str) -> str:
        for k in self.candidates(module):
            if k in self._where:
                return k
        raise PatchError("BaseWeightsNotFound", f"the base weights in {self.path} have no weight for module {module} "
                         f"(tried {', '.join(self.candidates(module))}): wrong base model or family?")

    def _handle(self, f: Path):
        h = self._handles.get(f)
        if h is None:
            from safetensors import safe_open

            h = safe_open(str(f), framework="pt")
            self._handles[f] = h
        return h

    def _header(self, f: Path) -> dict[str, tuple]:
        """The file's validated safetensors header (read without torch; cached)."""
        h = self._headers.get(f)
        if h is None:
            try:
                h = self._headers[f] = read_header(f)
            except PatchError as e:
                raise PatchError("BaseWeightsNotFound", f"cannot read base weights file {f}: {e.message}") from None
        return h

    def shape(self, module: str) -> tuple[int, ...]:
        k = self.key_for(module)
        entry = self._header(self._where[k]).get(k)
        if entry is None:
            raise PatchError("BaseWeightsNotFound", f"{self._where[k]} has no tensor {k} (its index says it has)")
        return entry[1]

    def get(self, module: str):
        k = self.key_for(module)
        return self._handle(self._where[k]).get_tensor(k)
