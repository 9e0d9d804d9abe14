"""The DoRA step: the only tensor maths of the patch, and the only place that imports torch.

Runs when the adapter uses DoRA and the maths is wanted: ``svd`` (exact merge with the base weights,
re-factored by truncated SVD), ``strip`` with base weights (the error of dropping the magnitudes is
measured), and the vision-tower magnitude check (base weights at hand). ``strip`` without base
weights, and every plain LoRA, skip it: their tensors are kept byte for byte.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vlmpool.patcher.errors import PatchError

SVD_METHODS = ("auto", "exact", "randomized")
SVD_OVERSAMPLE = 16
SVD_POWER_ITERS = 4
SVD_SEED = 0x5EED
# A vision DoRA magnitude further than this (relative) from its initial row norm counts as trained;
# the slack covers magnitudes computed and stored in bf16 (relative rounding ~4e-3).
VISION_MAGNITUDE_TOLERANCE = 1e-2


@dataclass
class DoraResult:
    new_ab: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # module -> (A, B) RawTensors (svd)
    errors: dict[str, float] = field(default_factory=dict)
    error: float | None = None
    error_total: float | None = None
    methods: set[str] = field(default_factory=set)
    device: str | None = None
    vision_mag_change: dict[str, float] | None = None


def apply_dora(plan: Any, weights: Any, base: Any, *, applied: str, scale: float, svd_rank: int | None,
               svd_method: str, device_name: str | None,
               module_scale: Callable[[str], float] | None = None) -> DoraResult:
    """Measure (strip) or re-factor (svd) every kept module; check the vision magnitudes first.
    ``module_scale(module)`` is a module's own scale (``alpha_pattern``/``rank_pattern``), else ``scale``.
    Kept vision-tower modules (tower LoRA) have no base weights here: strip keeps them as they are,
    svd refuses them."""
    from vlmpool.patcher.weights import from_torch, import_torch

    torch = import_torch(f"the DoRA policy {applied} with base weights")

    res = DoraResult()
    if plan.vision_mags:
        res.vision_mag_change = vision_magnitude_change(plan, weights, plan.vision_mags, base, scale)
        worst = max(res.vision_mag_change.items(), key=lambda kv: kv[1])
        if worst[1] > VISION_MAGNITUDE_TOLERANCE:
            raise PatchError("TrainedVisionTower", f"the adapter trained the vision tower's DoRA magnitudes "
                             f"({worst[0]} moved by {worst[1]:.3g} relative to the weight's row norms, over "
                             f"{VISION_MAGNITUDE_TOLERANCE:g}); vLLM serves LoRA on the language model only. "
                             "Retrain with target_modules limited to the language model")
    device = torch.device(device_name) if device_name else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    err_num = err_den = 0.0
    for module in plan.kept:
        if plan.is_tower(module):
            if applied == "svd":
                raise PatchError("UnsupportedTargetModules", f"{module}: the svd DoRA policy cannot re-factor a "
                                 "vision-tower module (base weights are read for the language model only); use the "
                                 "strip policy")
            continue  # strip: A and B kept as they are, unmeasured
        slot = plan.modules[module]
        mag = slot.get("magnitude")
        a, b = weights.tensor(slot["lora_A"]), weights.tensor(slot["lora_B"])
        w0 = base.get(module).to(device=device, dtype=torch.float32)
        af, bf = a.to(device=device, dtype=torch.float32), b.to(device=device, dtype=torch.float32)
        lora = (module_scale(module) if module_scale else scale) * (bf @ af)
        w = w0 + lora
        if mag is not None:
            norm = torch.linalg.vector_norm(w, dim=1)
            merged = (weights.tensor(mag).to(device=device, dtype=torch.float32) / norm).unsqueeze(1) * w
        else:
            merged = w
        delta = merged - w0
        den = float(torch.linalg.vector_norm(delta))
        if applied == "strip":
            approx = lora
        else:
            if svd_rank is None:  # the pipeline always resolves a rank for the svd policy
                raise ValueError("apply_dora: the svd policy needs svd_rank")
            method = svd_method_for(svd_method, delta.shape, svd_rank, device)
            res.methods.add(method)
            u, s, vh = truncated_svd(delta, svd_rank, method)
            k = min(svd_rank, s.shape[0])
            sq = torch.sqrt(s[:k])
            nb = torch.zeros((delta.shape[0], svd_rank), device=device, dtype=torch.float32)
            na = torch.zeros((svd_rank, delta.shape[1]), device=device, dtype=torch.float32)
            nb[:, :k] = u[:, :k] * sq
            na[:k] = sq.unsqueeze(1) * vh[:k]
            approx = nb @ na
            res.new_ab[module] = (from_torch(na.to(dtype=a.dtype)), from_torch(nb.to(dtype=b.dtype)))
        num = float(torch.linalg.vector_norm(approx - delta))
        res.errors[module] = num / den if den > 0 else (0.0 if num == 0 else float("inf"))
        err_num += num * num
        err_den += den * den
    res.error = max(res.errors.values()) if res.errors else None
    res.error_total = math.sqrt(err_num / err_den) if err_den > 0 else (0.0 if res.errors else None)
    res.device = str(device) if res.errors else None
    return res


def check_max_error(res: DoraResult, applied: str, bound: float) -> None:
    """The admission bound of spec.dora.maxError: the worst module's measured relative error (the
    report's ``dora.error``) must be at most ``bound``. An error that was not measured cannot pass."""
    if res.error is None:
        raise PatchError("DoraErrorNotMeasured", f"spec.dora.maxError is {bound:g} but the {applied} DoRA policy's "
                         "error was not measured: it needs the base weights (the pool's spec.model.weights) and torch "
                         "(the patcher-dora image); give both, or remove maxError to serve the adapter unmeasured")
    if not res.error <= bound:  # NaN is refused too
        worst = max(res.errors.items(), key=lambda kv: kv[1])[0]
        raise PatchError("DoraErrorTooHigh", f"the {applied} DoRA policy's measured error {res.error:.6g} (relative "
                         f"Frobenius error of the weight delta, worst module {worst}; {res.error_total:.6g} over all "
                         f"modules) is above spec.dora.maxError {bound:g}: the served adapter would differ too much "
                         "from the trained one. Nothing was published. "
                         + ("Raise dora.rank, " if applied == "svd" else "Use the svd policy, ")
                         + "raise maxError, or retrain without DoRA")


def svd_method_for(requested: str, shape, rank: int, device) -> str:
    """auto: the exact SVD on a GPU, or when the matrix is small or the rank (nearly) full; otherwise the
    randomized one (seeded, so the result is reproducible), whose error is measured all the same."""
    if requested != "auto":
        return requested
    if getattr(device, "type", str(device)) == "cuda":
        return "exact"
    return "exact" if min(shape) <= 4 * (rank + SVD_OVERSAMPLE) else "randomized"


def truncated_svd(a, rank: int, method: str):
    """(U, S, Vh) of the leading ``rank`` singular triplets of ``a`` (float32 2-D)."""
    import torch

    m, n = a.shape
    if method == "exact" or rank + SVD_OVERSAMPLE >= min(m, n):
        if m < n:  # LAPACK is much faster on tall matrices
            u, s, vh = torch.linalg.svd(a.T, full_matrices=False)
            return vh.T[:, :rank], s[:rank], u.T[:rank]
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    # Halko, Martinsson & Tropp (2011), algorithm 4.4: randomized range finder with power iterations.
    g = torch.Generator(device=a.device).manual_seed(SVD_SEED)
    omega = torch.randn(n, rank + SVD_OVERSAMPLE, generator=g, device=a.device, dtype=a.dtype)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(SVD_POWER_ITERS):
        q = torch.linalg.qr(a.T @ q).Q
        q = torch.linalg.qr(a @ q).Q
    ub, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vh[:rank]


def vision_magnitude_change(plan: Any, weights: Any, names: list[str], base: Any, scale: float) -> dict[str, float]:
    """Per vision module: max |m - ||W0 + s·B·A||_row| / ||W0 + s·B·A||_row, i.e. how far training moved
    the DoRA magnitude from where PEFT initialised it (0 up to the storage dtype's rounding)."""
    import torch

    out = {}
    for module in names:
        slot = plan.modules[module]
        try:
            w = base.get(module).float()
        except PatchError:
            continue  # a vision weight the base lacks: nothing to compare with (the language check is strict)
        if "lora_A" in slot and "lora_B" in slot:
            w = w + scale * (weights.tensor(slot["lora_B"]).float() @ weights.tensor(slot["lora_A"]).float())
        norm = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1)
        m = weights.tensor(slot["magnitude"]).float().reshape(-1)
        if m.shape != norm.shape:
            raise PatchError("ShapeMismatch", f"{module}: magnitude vector {tuple(m.shape)} does not match the base "
                             f"weight's {norm.shape[0]} rows")
        out[module] = float(((m - norm).abs() / norm.clamp_min(1e-12)).max())
    return out
