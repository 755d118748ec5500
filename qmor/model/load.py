"""Every way qmor loads a model: the 4-bit base, the model to train (base + fresh or LoftQ adapter), a trained one
(base + saved adapter), and a saved adapter onto a base already in memory (chat's switch).

All of them go through here so training, resume, chat and export all see the same base: for a LoftQ adapter that
is the LoftQ-initialised Q_T, not plain nf4(W).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from qmor.adapters import attach as plain
from qmor.adapters.attach import OWN_BASE, AdapterMeta, load_adapter_weights
from qmor.adapters.config import AdapterConfig
from qmor.adapters.weighted import check_weighted
from qmor.config import QuantConfig
from qmor.errors import QmorError
from qmor.model import calibrated, loftq, moe, support
from qmor.model.base import Base, TrainedAdapter
from qmor.model.files import LOAD_ERRORS, load_failed, load_path, weight_files
from qmor.model.quant import compute_dtype, keep_plain_layout, storage_dtype

# Each function takes a `Base` or a `TrainedAdapter` resolved by its caller; a name or a path (what a user of the
# Python API passes) is resolved at the top, once.


def load_tokenizer(base: str | Base, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (the end-of-sequence one when it has none)."""
    return Base.resolve(base, trust_remote_code=trust_remote_code).tokenizer()


def resolved(base: str | Base, device: str | None, trust_remote_code: bool) -> tuple[Base, str]:
    """The base to load, resolved and checked, and the device to load it on (cuda when there is one)."""
    base = Base.resolve(base, trust_remote_code=trust_remote_code)
    base.check()
    return base, device or ("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def reading(base: Base) -> Iterator[None]:
    """transformers' errors while it reads the base, as one line that names it."""
    try:
        yield
    except LOAD_ERRORS as e:
        raise load_failed(base.path, e) from None
    except SafetensorError:  # transformers' own read of a damaged file, which its error does not name
        weight_files(base.folder)  # names it in one line
        raise


def load_4bit(
    base: str | Base,
    cfg: QuantConfig = QuantConfig(),
    device: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a causal LM with every linear layer but the output head in NF4 (double quantisation by default)."""
    base, device = resolved(base, device, trust_remote_code)
    dtype = compute_dtype(cfg, device)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=storage_dtype(cfg),
    )
    if cfg.blocksize != 64:
        raise QmorError("transformers loads NF4 with block size 64 only; set QuantConfig.blocksize = 64")
    config = base.config()
    with reading(base), moe.experts_left_out(config):  # MoE experts are read and quantised expert by expert below
        model = AutoModelForCausalLM.from_pretrained(
            load_path(base.path),
            quantization_config=quant,
            dtype=dtype,
            device_map={"": device},
            trust_remote_code=base.trust_remote_code,
        )
    moe.quantise_experts(model, base, cfg, device, dtype)
    support.check_quantised(model)
    model.config.use_cache = False
    keep_plain_layout(model)
    return model


def load_unquantised(base: str | Base, device: str | None = None, trust_remote_code: bool = False) -> nn.Module:
    """Load a causal LM as plain transformers does, in the compute dtype (bf16 on CUDA, fp32 on CPU): for a merged
    export, which a 4-bit load would quantise a second time, away from the adapter it was merged from."""
    base, device = resolved(base, device, trust_remote_code)
    with reading(base):
        model = AutoModelForCausalLM.from_pretrained(load_path(base.path), dtype=compute_dtype(QuantConfig(), device),
                                                     device_map={"": device},
                                                     trust_remote_code=base.trust_remote_code)
    model.config.use_cache = False
    return model


# qmor.attach and qmor.load_adapter: the adapters' own, for a 4-bit model however it was loaded (here, or by
# transformers with a BitsAndBytesConfig), whose layers first keep the plain NF4 layout (keep_plain_layout says why)
def attach(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    keep_plain_layout(model)
    return plain.attach(model, cfg)


def load_adapter(model: nn.Module, path: str | Path) -> AdapterMeta:
    keep_plain_layout(model)
    return plain.load_adapter(model, path)


def load_for_training(
    base: str | Base,
    adapter_cfg: AdapterConfig,
    quant: QuantConfig = QuantConfig(),
    device: str | None = None,
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
    calibration: list[torch.Tensor] | None = None,
) -> tuple[nn.Module, AdapterMeta, dict | None]:
    """4-bit base with the adapter attached: LoftQ- or calibrated-initialised when adapter_cfg.init says so (then
    the third value is the per-layer error report; the calibrated init reads `calibration`, token id sequences),
    else the family's default init that adds zero (report None)."""
    adapter_cfg.check_trainable()
    base = Base.resolve(base, trust_remote_code=trust_remote_code)
    if adapter_cfg.init in OWN_BASE:
        return _load_loftq(base, adapter_cfg, quant, device, cache_dir, calibration)
    model = load_4bit(base, quant, device)
    attach(model, adapter_cfg)
    meta = AdapterMeta(adapter=adapter_cfg, base_model=base.source, quant=quant,
                       base_fingerprint=base.fingerprint_to_record())
    return model, meta, None


def _load_loftq(base: Base, adapter_cfg: AdapterConfig, quant: QuantConfig, device: str | None,
                cache_dir: str | Path | None, calibration: list[torch.Tensor] | None = None,
                ) -> tuple[nn.Module, AdapterMeta, dict]:
    """4-bit model with LoftQ- or calibrated-initialised adapters: loaded from the cache when the same key was
    computed before, else computed layer by layer from the checkpoint and cached."""
    if adapter_cfg.loftq_iters < 1:
        raise QmorError(f"loftq_iters must be at least 1, got {adapter_cfg.loftq_iters}; pass e.g. --loftq-iters 1")
    if adapter_cfg.init == "calibrated":
        check_weighted(adapter_cfg.family)  # before minutes of loading
        if not calibration:
            raise QmorError("--init calibrated needs calibration token ids (qmor train takes the first "
                            "--calibration-samples sequences of its data); pass calibration=[...] or --init loftq")
    names = base.weight_files
    local = base.local()  # the snapshot LoftQ reads is the one loaded
    model = load_4bit(local, quant, device)
    targets = attach(model, adapter_cfg)
    if adapter_cfg.init == "calibrated":
        cache, report = calibrated.initialise_cached(model, base.source, names, targets, adapter_cfg, quant,
                                                     calibration, cache_dir)
    else:
        cache, report = loftq.initialise_cached(model, base.source, names, targets, adapter_cfg, quant, cache_dir)
    meta = AdapterMeta(adapter=adapter_cfg, base_model=base.source, quant=quant, init=adapter_cfg.init,
                       base_weights=str(cache),
                       base_fingerprint=local.fingerprint_to_record())
    return model, meta, report


def load_trained(
    adapter: str | Path | TrainedAdapter,
    device: str | None = None,
    base_model: str | Base | None = None,
    trust_remote_code: bool = False,
    allow_other_base: bool = False,
) -> tuple[nn.Module, AdapterMeta]:
    """The 4-bit base an adapter was trained on (Q_T for LoftQ adapters) with the adapter attached and loaded;
    `base_model` in place of the recorded base, whose fingerprint, when it differs from the recorded one, is refused
    unless `allow_other_base`."""
    adapter = TrainedAdapter.of(adapter, base_model, trust_remote_code)
    base = adapter.check_base(allow_other_base)  # before minutes of loading
    model = load_4bit(base, adapter.meta.quant, device)
    _fill(model, adapter)
    return model, adapter.meta


def attach_trained(model: nn.Module, adapter: str | Path | TrainedAdapter, base: str | Base,
                   allow_other_base: bool = False) -> AdapterMeta:
    """Attach a saved adapter to `model`, the 4-bit `base` already loaded without adapters, as `load_trained` would
    have built it; returns the adapter's metadata."""
    adapter = TrainedAdapter.of(adapter, base)
    adapter.check_base(allow_other_base)
    _fill(model, adapter)
    return adapter.meta


def _fill(model: nn.Module, adapter: TrainedAdapter) -> None:
    """Attach the family, put a LoftQ adapter's Q_T into the 4-bit layers, then load the trained weights."""
    attach(model, adapter.meta.adapter)
    if adapter.meta.init == "loftq":
        loftq.restore_base(model, adapter.meta, adapter.base)
    elif adapter.meta.init == "calibrated":
        calibrated.restore_base(model, adapter.meta)
    load_adapter_weights(model, adapter.folder)
