"""The calibrated init (`--init calibrated`): NF4 rounding and the adapter's init both fitted to what the layer's
inputs see, ||(W - Q - ΔW) Xᵀ||, instead of LoftQ's plain ||W - Q - ΔW||.

For each adapted linear, in GPTQ's sequential order (qmor.model.activations: its inputs come through the layers
below it as they are after their own init), with H = XᵀX of its calibration inputs and L the Cholesky factor of H
dampened:

    ΔW = 0
    repeat T times:  Q = gptq_nf4(W - ΔW; H);  adapter.fit_weighted(W - deq(Q); L)

gptq_nf4 (qmor.model.gptq) rounds on NF4's grid with bitsandbytes' own block scales, so Q is stored as ordinary
NF4; the weighted fit (qmor.adapters.weighted) is the closed-form optimum at rank r for the low-rank families
(CLoQ). T is `loftq_iters`. Q_T and the fitted tensors are cached with LoftQ's cache machinery, keyed also by a
digest of the calibration token ids, and a trained adapter's `base_weights` names that folder, as for LoftQ.
Unlike LoftQ's, this base cannot be recomputed from the checkpoint alone: it depends on the calibration data.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from qmor.adapters.attach import AdapterMeta, adapted_layers
from qmor.adapters.config import AdapterConfig
from qmor.adapters.weighted import fit_weighted
from qmor.config import QuantConfig
from qmor.errors import QmorError
from qmor.files import load_json
from qmor.model import activations, loftq
from qmor.model.files import cache_root
from qmor.model.gptq import DAMP, dampened, round_nf4
from qmor.model.moe import expert_weight
from qmor.model.quant import Packed, dequantize, quantize, set_packed

ALGORITHM = 1  # bump when the algorithm or what the cache holds changes


@dataclass(frozen=True)
class Recipe:
    """The init's two steps; the ablations in docs/experiments.md swap one (the cache key holds the recipe)."""

    rounding: str = "gptq"  # "gptq": error feedback through H; "nf4": bitsandbytes' nearest rounding
    fit: str = "weighted"  # "weighted": the activation-weighted fit; "plain": LoftQ's; "zero": the default init


RECIPE = Recipe()


def _relative(E: torch.Tensor, W: torch.Tensor, H: torch.Tensor | None = None) -> float:
    """||E|| / ||W||, or with H the activation-weighted ||E Xᵀ|| / ||W Xᵀ|| (tr(E H Eᵀ) = ||E Xᵀ||²)."""
    if H is None:
        return (E.norm() / W.norm().clamp(min=1e-12)).item()
    return math.sqrt(max(((E @ H) * E).sum().item(), 0.0) / max(((W @ H) * W).sum().item(), 1e-30))


@torch.no_grad()
def calibrated_layer(W: torch.Tensor, H: torch.Tensor, adapter: nn.Module, family: str, quant: QuantConfig,
                     iters: int, recipe: Recipe = RECIPE) -> tuple[Packed, dict]:
    """T alternations for one (d_out, d_in) weight and its inputs' Gram matrix H, fitting `adapter` in place.
    Returns Q_T and the relative errors of plain NF4 and of the init, in weights (nf4, loftq: LoftQ's report's
    names) and as the inputs see them (act_nf4, act)."""
    W, H = W.to(torch.float32), H.to(W.device, torch.float32)
    Hd = dampened(H, DAMP)
    root = torch.linalg.cholesky(Hd)
    plain = W - dequantize(quantize(W, quant))
    errors = {"nf4": _relative(plain, W), "act_nf4": _relative(plain, W, H)}
    delta = torch.zeros_like(W)
    for _ in range(1 if recipe.fit == "zero" else iters):
        target = W - delta
        packed = round_nf4(target, Hd, quant) if recipe.rounding == "gptq" else quantize(target, quant)
        if recipe.fit == "zero":
            break
        residual = W - dequantize(packed)
        if recipe.fit == "weighted":
            fit_weighted(adapter, family, residual, root)
        else:
            adapter.fit(residual)
        delta = loftq.effective_delta(adapter, W.shape[1])
    left = W - dequantize(packed) - delta
    errors.update(loftq=_relative(left, W), act=_relative(left, W, H))
    return packed, errors


def digest(sequences: list[torch.Tensor]) -> str:
    """The calibration data's part of the cache key: its token ids, sequence by sequence."""
    h = hashlib.sha256()
    for ids in sequences:
        h.update(len(ids).to_bytes(8, "little"))
        h.update(ids.to(torch.int64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def initialise(model: nn.Module, names: dict[str, Path], quant: QuantConfig, cfg: AdapterConfig,
               sequences: list[torch.Tensor], recipe: Recipe = RECIPE) -> dict[str, dict]:
    """Calibrated init of every adapted linear of `model`, decoder layer by decoder layer; per-layer errors."""
    if not sequences:
        raise QmorError("--init calibrated needs calibration text and got none; pass --calibration FILE or more "
                        "training data")
    prefix = getattr(model, "base_model_prefix", "model")
    layers = adapted_layers(model)
    experts = [n for n in layers if expert_weight(n, names, prefix) is not None] if names else []
    if experts:
        raise QmorError(f"--init calibrated does not fit MoE expert maps ({experts[0]}): each expert sees only its "
                        "routed tokens; pass --init loftq")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    errors: dict[str, dict] = {}
    try:
        inputs = activations.first_inputs(model, sequences, device)
        blocks = activations.blocks_of(model, list(layers))
        last = max(i for i, (_, mine) in enumerate(blocks) if mine)
        for i, (block, mine) in enumerate(tqdm(blocks[: last + 1], desc="calibrated init", unit="layer",
                                               file=sys.stderr)):
            for group, H in activations.groups(block, inputs, {n: layers[n] for n in mine}):
                for name in group:
                    W = loftq.read_weight(name, names, prefix, device)
                    with loftq.seeded(name, device):
                        packed, err = calibrated_layer(W, H, layers[name].adapter, cfg.family, quant,
                                                       cfg.loftq_iters, recipe)
                    if not all(math.isfinite(v) for v in err.values()):
                        raise QmorError(f"the calibrated init of {name} gave a non-finite error ({err}); check the "
                                        "checkpoint's weights for nan or inf, or pass --init loftq")
                    set_packed(layers[name].base, packed)
                    errors[name] = err
                del H
            if i < last:
                inputs = activations.forward(block, inputs)
    finally:
        model.train(was_training)
    return errors


def make_report(errors: dict[str, dict], cfg: AdapterConfig, folder: Path, extra: dict) -> dict:
    report = loftq.make_report(errors, cfg, folder)
    act_nf4 = [e["act_nf4"] for e in errors.values()]
    act = [e["act"] for e in errors.values()]
    return {**report, "init": "calibrated", "mean_act_nf4": sum(act_nf4) / len(act_nf4),
            "mean_act": sum(act) / len(act), **extra}


def summary(report: dict) -> str:
    return (f"calibrated {report['family']} r={report['r']} T={report['iters']} over {len(report['layers'])} layers:"
            f" error as the inputs see it, mean {report['mean_act_nf4']:.4f} -> {report['mean_act']:.4f}; in "
            f"weights {report['mean_nf4']:.4f} -> {report['mean_loftq']:.4f}")


def cache_key(source: str, names: dict[str, Path], cfg: AdapterConfig, targets: list[str], quant: QuantConfig,
              sequences: list[torch.Tensor], recipe: Recipe) -> dict:
    return {**loftq.cache_key(source, list(names.values()), cfg, targets, quant), "init": "calibrated",
            "calibration": digest(sequences), "sequences": len(sequences), "recipe": asdict(recipe), "damp": DAMP,
            "calibrated_algorithm": ALGORITHM}


def initialise_cached(model: nn.Module, source: str, names: dict[str, Path], targets: list[str], cfg: AdapterConfig,
                      quant: QuantConfig, sequences: list[torch.Tensor], cache_dir: str | Path | None = None,
                      recipe: Recipe | None = None) -> tuple[Path, dict]:
    """The calibrated init of the adapters attached to a 4-bit model: from the cache when the same key (model,
    adapter, targets, quantisation, calibration tokens, recipe) was computed before, else computed and cached."""
    recipe = recipe or RECIPE
    key = cache_key(source, names, cfg, targets, quant, sequences, recipe)
    cache = loftq.cache_folder((Path(cache_dir) if cache_dir else cache_root()) / "calibrated", key, cfg)
    if loftq.intact(cache):
        loftq.apply_base_weights(model, cache)
        if recipe.fit != "zero":  # a zero fit set nothing: the adapters keep this run's own default init
            loftq.load_fitted(model, cache, cfg.family)
        report = load_json(cache / loftq.REPORT)
        print(f"calibrated init: loaded from {cache}", file=sys.stderr)
    else:
        device = next(model.parameters()).device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.time()
        errors = initialise(model, names, quant, cfg, sequences, recipe)
        extra = {"wall_s": time.time() - start, "calibration": key["calibration"], "sequences": len(sequences),
                 "tokens": sum(len(s) for s in sequences), "recipe": asdict(recipe)}
        if device.type == "cuda":
            extra["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
        report = make_report(errors, cfg, cache, extra)
        loftq.save_cache(model, cache, key, report, cfg.family)
    print(summary(report), file=sys.stderr)
    return cache, report


def restore_base(model: nn.Module, meta: AdapterMeta) -> None:
    """Put a calibrated adapter's Q_T into an attached 4-bit model from its cache folder. It cannot be recomputed
    without the calibration data, which an adapter does not hold, so a lost folder is refused in one line."""
    folder = Path(meta.base_weights) if meta.base_weights else None
    if folder is None or not loftq.intact(folder):
        raise QmorError(f"the calibrated base weights {folder} are missing or damaged, and they depend on the "
                        "calibration data, which the adapter does not hold; copy that folder back, or train again "
                        "with the same --init calibrated data")
    loftq.apply_base_weights(model, folder)
