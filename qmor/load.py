"""Build the model to train (4-bit base + fresh adapter) and rebuild a trained one (base + saved adapter).

Both go through here so training, resume, chat and export all see the same base: for a LoftQ adapter that is the
LoftQ-initialised Q_T, not plain nf4(W).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from qmor.attach import AdapterMeta, attach, load_adapter_weights, read_meta
from qmor.config import AdapterConfig, QuantConfig
from qmor.errors import QmorError
from qmor.fingerprint import check_base, record
from qmor.quant import is_local, load_4bit


def model_source(model_path: str) -> str:
    """What an adapter records as its base: an absolute folder for local models, the hub id otherwise."""
    return str(Path(model_path).expanduser().resolve()) if is_local(model_path) else model_path


def load_for_training(
    model_path: str,
    adapter_cfg: AdapterConfig,
    quant: QuantConfig = QuantConfig(),
    device: str | None = None,
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, AdapterMeta, dict | None]:
    """4-bit base with the adapter attached: LoftQ-initialised when adapter_cfg.init == "loftq" (then the third
    value is the per-layer error report), else the family's default init that adds zero (report None)."""
    if adapter_cfg.init == "loftq":
        from qmor.loftq import loftq_init

        return loftq_init(model_path, adapter_cfg, quant, device, cache_dir, trust_remote_code)
    model = load_4bit(model_path, quant, device, trust_remote_code)
    attach(model, adapter_cfg)
    meta = AdapterMeta(adapter=adapter_cfg, base_model=model_source(model_path), quant=quant,
                       base_fingerprint=record(model_path))
    return model, meta, None


def load_trained(
    adapter_dir: str | Path,
    device: str | None = None,
    base_model: str | None = None,
    trust_remote_code: bool = False,
    allow_other_base: bool = False,
) -> tuple[nn.Module, AdapterMeta]:
    """The 4-bit base an adapter was trained on (Q_T for LoftQ adapters) with the adapter attached and loaded;
    a base whose fingerprint differs from the recorded one is refused unless `allow_other_base`."""
    from qmor.builtin import resolve_model

    meta = read_meta(adapter_dir)
    base = resolve_model(base_model or meta.base_model)  # a built-in name (tiny, smollm2) becomes its folder
    if not base:
        raise QmorError(f"adapter {adapter_dir} does not record its base model; pass the base with --base-model")
    check_base(meta.base_fingerprint, meta.base_model, base, allow_other_base)
    model = load_4bit(base, meta.quant, device, trust_remote_code)
    attach(model, meta.adapter)
    if meta.init == "loftq":
        from qmor.loftq import restore_base

        restore_base(model, meta, base, trust_remote_code)
    load_adapter_weights(model, adapter_dir)
    return model, meta
