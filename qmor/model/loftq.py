"""LoftQ-style initialisation for every adapter family, streamed from safetensors checkpoints.

For each target weight W (read from the checkpoint one tensor at a time, never the whole model):

    adapter starts at ΔW = 0
    repeat T times:  Q = nf4(W - ΔW);  adapter.fit(W - deq(Q))

nf4 is `qmor.model.quant.quantize`, the quantiser the 4-bit layers train with, so the Q_T written into the layer is the
Q that LoftQ optimised. Q_T is not nf4(W), so it is cached on disk (keyed by model, family, rank, targets, T and
quantisation) and every later load of a LoftQ adapter puts it back with `apply_base_weights`.

Shared MoE expert adapters (`expert_adapters="shared"`) are left at their zero init on plain NF4 experts. The one
ΔW that best fits every expert's residual is the low-rank fit of their mean, but NF4's rounding errors of different
experts are independent, so that mean shrinks like 1/sqrt(E) and the fit removes about 1/E of what per-expert
LoftQ removes (measured on 256x512 experts at r=16: 8.3% lower error per expert, shared 2.0% at E=4, 0.15% at
E=64), while it would cost a pass over every expert and a cached Q_T of the whole expert set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from qmor.adapters import check_family
from qmor.adapters.attach import WEIGHTS, AdapterMeta, adapted_layers
from qmor.adapters.config import AdapterConfig
from qmor.adapters.experts import SharedAdapter
from qmor.adapters.layer import AdaptedLinear
from qmor.config import QuantConfig
from qmor.errors import NotMergeable, QmorError
from qmor.files import atomic_dir, load_json, save_json
from qmor.model.base import Base
from qmor.model.files import cache_root, read_tensor, tensor_key
from qmor.model.moe import expert_weight
from qmor.model.quant import Packed, dequantize, is_4bit, packed_from_state, packed_state, quantize
from qmor.model.quant import set_packed as put_packed

BASE = "base.safetensors"  # Q_T of every target, keys "<module name>|<packed_state key>"
REPORT = "loftq_report.json"
KEY = "key.json"
ALGORITHM = 2  # bump when the loop or what the cache holds changes, so old caches are not mistaken for new results
# (2: the cache holds only the tensors `fit` sets; 1 also held the seeded router of the run that computed it)


# ---------------------------------------------------------------------------------------------------- one layer


def effective_delta(adapter: nn.Module, d_in: int) -> torch.Tensor:
    """The adapter's dense ΔW (d_out, d_in). Routed families have no delta_weight, but right after `fit` their
    output does not depend on routing, so feeding the basis vectors reads ΔW off column by column."""
    try:
        return adapter.delta_weight().to(torch.float32)
    except NotMergeable:
        pass
    was_training = adapter.training
    adapter.eval()
    device = next(adapter.parameters()).device
    cols = []
    for start in range(0, d_in, 2048):
        eye = torch.eye(d_in, device=device)[start : start + 2048]  # (c, d_in): rows are basis vectors
        cols.append(adapter(eye).T.to(torch.float32))  # (d_out, c)
    adapter.train(was_training)
    return torch.cat(cols, dim=1)


@torch.no_grad()
def loftq_layer(
    weight: torch.Tensor, adapter: nn.Module, quant: QuantConfig, iters: int
) -> tuple[Packed, float, float]:
    """Run T LoftQ alternations for one (d_out, d_in) weight on its own device, fitting `adapter` in place.

    Returns (Q_T, relative error of plain NF4, relative error after LoftQ), errors as ||W - deq(Q) - ΔW|| / ||W||.
    """
    if iters < 1:
        raise QmorError(f"loftq_iters must be at least 1, got {iters}; pass e.g. --loftq-iters 1")
    W = weight.to(torch.float32)
    norm = W.norm().clamp(min=1e-12)
    packed = quantize(W, quant)
    plain = ((W - dequantize(packed)).norm() / norm).item()
    delta = None
    for step in range(iters):
        if step > 0:
            packed = quantize(W - delta, quant)
        adapter.fit(W - dequantize(packed))
        delta = effective_delta(adapter, W.shape[1])
    err = ((W - dequantize(packed) - delta).norm() / norm).item()
    return packed, plain, err


# ---------------------------------------------------------------------------------------------------- checkpoints


def weights_digest(files: list[Path]) -> str:
    """Cheap content hash of the weight files: size, the safetensors header and 16 sampled 64 KiB chunks each,
    so a re-saved checkpoint at the same path gets a new key without reading gigabytes."""
    h = hashlib.sha256()
    for path in sorted(set(files)):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header, 1 << 24)))
            for i in range(16):
                f.seek(size * i // 16)
                h.update(f.read(1 << 16))
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- cache


def cache_key(model_path: str, files: list[Path], cfg: AdapterConfig, targets: list[str], quant: QuantConfig) -> dict:
    return {"model": model_path, "weights": weights_digest(files), "adapter": cfg.fit_settings(),
            "targets": hashlib.sha256("\n".join(targets).encode()).hexdigest()[:16],
            "quant": {"blocksize": quant.blocksize, "double_quant": quant.double_quant}, "algorithm": ALGORITHM}


def cache_folder(root: Path, key: dict, cfg: AdapterConfig) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = Path(key["model"]).name.replace(".", "-") or "model"
    return root / f"{name}-{cfg.family}-r{cfg.r}-T{cfg.loftq_iters}-{digest}"


def _target_linear(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise QmorError(f"cached LoftQ base has weights for {name}, which this model lacks; load it onto the base "
                        "model it was computed for") from None
    linear = module.base if isinstance(module, AdaptedLinear) else module
    if not is_4bit(linear):
        raise QmorError(f"{name} is not a 4-bit layer; LoftQ base weights go into a model loaded in 4-bit")
    return linear


def intact(folder: Path) -> bool:
    """Whether a LoftQ cache folder holds every file whole. Writes are atomic, so a damaged one comes from outside (a
    failing disk, a copy cut short); being derived data, it is said in one line and computed again."""
    if not all((folder / name).is_file() for name in (BASE, WEIGHTS, REPORT)):
        return False
    try:
        for name in (BASE, WEIGHTS):
            with safe_open(str(folder / name), framework="pt"):  # checks the header and that the data covers it
                pass
        load_json(folder / REPORT)
    except (SafetensorError, OSError, ValueError) as e:
        print(f"warning: the LoftQ cache {folder} is damaged ({str(e).strip()}); computing the init again",
              file=sys.stderr)
        return False
    return True


def apply_base_weights(model: nn.Module, folder: str | Path) -> None:
    """Put the cached Q_T from `folder` into a loaded 4-bit model (adapters attached or not)."""
    path = Path(folder) / BASE
    if not path.is_file():
        raise QmorError(f"{path} does not exist; the LoftQ base weights are gone, so recompute them with the same "
                        "--init loftq settings")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        name, _, part = key.partition("|")
        grouped.setdefault(name, {})[part] = value
    for name, state in grouped.items():
        linear = _target_linear(model, name)
        packed = packed_from_state(state, linear.weight.device)
        if packed.quant_state.shape != linear.weight.quant_state.shape:
            raise QmorError(f"cached LoftQ base for {name} has shape {tuple(packed.quant_state.shape)}, the model "
                            f"{tuple(linear.weight.quant_state.shape)}; load it onto the base it was computed for")
        put_packed(linear, packed)


def fitted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    """The adapted layers LoftQ fits: all but those holding a shared expert adapter (see the module's docstring)."""
    return {n: layer for n, layer in adapted_layers(model).items() if not isinstance(layer.adapter, SharedAdapter)}


def fitted_tensors(model: nn.Module, family: str) -> dict[str, nn.Parameter]:
    """`<layer>.<parameter>` -> each parameter LoftQ sets (its family's `fitted`), over the layers it fits."""
    fitted = check_family(family).fitted
    out = {}
    for name, layer in fitted_layers(model).items():
        params = dict(layer.adapter.named_parameters())
        for k in fitted:
            if k not in params:
                raise TypeError(f"family {family} declares fitted parameter {k!r}, which its module lacks")
            out[f"{name}.{k}"] = params[k]
    return out


def save_cache(model: nn.Module, folder: Path, key: dict, report: dict, family: str) -> None:
    """Q_T and the adapter tensors LoftQ set. Nothing else: a router stays the loading run's own seeded init, so a
    run gives the same result whether its LoftQ init is computed or comes from a run with another seed."""
    state = {f"{name}|{k}": v.detach().contiguous().cpu()
             for name, layer in fitted_layers(model).items() for k, v in packed_state(layer.base.weight).items()}
    fitted = {k: v.detach().contiguous().cpu() for k, v in fitted_tensors(model, family).items()}
    with atomic_dir(folder) as tmp:
        save_file(state, str(tmp / BASE), metadata={"format": "qmor-loftq"})
        save_file(fitted, str(tmp / WEIGHTS), metadata={"format": "qmor-loftq-fit"})
        save_json(key, tmp / KEY)
        save_json(report, tmp / REPORT)


@torch.no_grad()
def load_fitted(model: nn.Module, folder: Path, family: str) -> None:
    """Copy the cached LoftQ adapter tensors into an attached model, every name and shape checked first."""
    state = load_file(str(folder / WEIGHTS))
    params = fitted_tensors(model, family)
    wrong = sorted(set(state) ^ set(params)) or [k for k, p in params.items() if state[k].shape != p.shape]
    if wrong:
        raise QmorError(f"the LoftQ cache {folder} does not fit these adapters (e.g. {wrong[0]}); delete that folder "
                        "and the next run recomputes it")
    for k, p in params.items():
        p.copy_(state[k])


# ---------------------------------------------------------------------------------------------------- whole model


def initialise(model: nn.Module, names: dict[str, Path], quant: QuantConfig, iters: int) -> dict[str, dict]:
    """LoftQ every attached layer in place, one checkpoint tensor at a time; per-layer errors."""
    prefix = getattr(model, "base_model_prefix", "model")
    layers = fitted_layers(model)
    skipped = len(adapted_layers(model)) - len(layers)
    if not layers:
        raise QmorError("LoftQ has nothing to fit: shared expert adapters start at zero on plain NF4 experts; pass "
                        "--init default, add dense targets (e.g. experts,q_proj,v_proj), or --expert-adapters "
                        "per-expert")
    if skipped:
        print(f"LoftQ: the shared adapters of {skipped} expert maps start at zero on plain NF4 (one shared fit "
              "would remove about 1/E of the error per-expert LoftQ removes)", file=sys.stderr)
    errors = {}
    for name, layer in tqdm(layers.items(), desc="LoftQ init", unit="layer", file=sys.stderr):
        device = layer.base.weight.device
        W = read_weight(name, names, prefix, device)
        with seeded(name, device):
            packed, plain, err = loftq_layer(W, layer.adapter, quant, iters)
        if not (math.isfinite(plain) and math.isfinite(err)):  # never train, or cache, from a base that is not numbers
            raise QmorError(f"LoftQ init of {name} gave a non-finite error (NF4 {plain}, LoftQ {err}); check the "
                            "checkpoint's weights for nan or inf, or pass --init default")
        put_packed(layer.base, packed)
        errors[name] = {"nf4": plain, "loftq": err}
        del W
    return errors


def read_weight(name: str, names: dict[str, Path], prefix: str, device: torch.device) -> torch.Tensor:
    """Module `name`'s full-precision weight (d_out, d_in), fp32 on `device`, read from the checkpoint alone."""
    W = expert_weight(name, names, prefix)  # an MoE expert's map, or None
    key = name if W is not None else tensor_key(name, names, prefix)
    if key is None:
        raise QmorError(f"the checkpoint has no tensor for {name}.weight; LoftQ streaming needs checkpoint tensor "
                        "names that match the model's modules (re-save the model with save_pretrained)")
    W = (read_tensor(names, key) if W is None else W).to(device, torch.float32)
    if not bool(torch.isfinite(W).all()):
        raise QmorError(f"the checkpoint's {key} holds nan or inf values, so no quantisation of it can be right; "
                        "use an intact copy of the model")
    return W


@contextlib.contextmanager
def seeded(name: str, device: torch.device):
    """A per-layer seed around a layer's init: svd_lowrank draws random vectors, and the seed makes the result
    reproducible when the cache is gone."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(zlib.crc32(name.encode()))
        yield


def make_report(errors: dict[str, dict], cfg: AdapterConfig, folder: Path) -> dict:
    plain = [e["nf4"] for e in errors.values()]
    after = [e["loftq"] for e in errors.values()]
    mean_plain, mean_after = sum(plain) / len(plain), sum(after) / len(after)
    return {"family": cfg.family, "r": cfg.r, "alpha": cfg.alpha, "iters": cfg.loftq_iters,
            "base_weights": str(folder), "layers": errors,
            "mean_nf4": mean_plain, "mean_loftq": mean_after, "worst_nf4": max(plain), "worst_loftq": max(after),
            "gain": mean_plain / max(mean_after, 1e-12)}


def summary(report: dict) -> str:
    return (f"LoftQ {report['family']} r={report['r']} T={report['iters']} over {len(report['layers'])} layers: "
            f"relative error mean {report['mean_nf4']:.4f} -> {report['mean_loftq']:.4f} "
            f"({report['gain']:.2f}x lower), worst {report['worst_nf4']:.4f} -> {report['worst_loftq']:.4f}")


def initialise_cached(model: nn.Module, source: str, names: dict[str, Path], targets: list[str],
                      cfg: AdapterConfig, quant: QuantConfig, cache_dir: str | Path | None = None) -> tuple[Path, dict]:
    """LoftQ-initialise the adapters attached to a 4-bit model (on the `targets` of the model recorded as `source`,
    whose checkpoint tensors are `names`): loaded from the cache when the same key was computed before, else
    computed layer by layer and cached. Returns (cache folder, report)."""
    key = cache_key(source, list(names.values()), cfg, targets, quant)
    cache = cache_folder(Path(cache_dir) if cache_dir else cache_root(), key, cfg)
    if intact(cache):
        apply_base_weights(model, cache)
        load_fitted(model, cache, cfg.family)
        report = load_json(cache / REPORT)
        print(f"LoftQ: loaded cached init from {cache}", file=sys.stderr)
    else:
        report = make_report(initialise(model, names, quant, cfg.loftq_iters), cfg, cache)
        save_cache(model, cache, key, report, cfg.family)
    print(summary(report), file=sys.stderr)
    return cache, report


def restore_base(model: nn.Module, meta: AdapterMeta, base: Base) -> None:
    """Put a LoftQ adapter's Q_T into an attached 4-bit model: from its cache folder, or recomputed (and cached
    again) with the same seeds when the folder is gone. Leaves the adapters at their LoftQ init."""
    folder = Path(meta.base_weights) if meta.base_weights else None
    if folder is not None and intact(folder):
        apply_base_weights(model, folder)
        return
    print(f"LoftQ base weights {folder} are missing or damaged; recomputing them from {base} (deterministic, same "
          "settings)", file=sys.stderr)
    names = base.weight_files
    errors = initialise(model, names, meta.quant, meta.adapter.loftq_iters)
    if folder is not None:
        try:
            save_cache(model, folder, {"model": base.path, "recomputed": True},
                       make_report(errors, meta.adapter, folder), meta.adapter.family)
        except OSError as e:
            print(f"could not write the LoftQ cache {folder} ({e}); it will be recomputed next time", file=sys.stderr)

