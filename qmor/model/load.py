"""Every way qmor loads a model: the 4-bit base, the model to train (base + fresh or LoftQ adapter), a trained one
(base + saved adapter), and a saved adapter onto a base already in memory (chat's switch).

All of them go through here so training, resume, chat and export all see the same base: for a LoftQ adapter that
is the LoftQ-initialised Q_T, not plain nf4(W).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from qmor.adapters import attach as plain
from qmor.adapters.attach import AdapterMeta, load_adapter_weights, read_meta
from qmor.adapters.config import AdapterConfig
from qmor.config import QuantConfig
from qmor.errors import QmorError
from qmor.model import loftq, moe, support
from qmor.model.files import (
    LOAD_ERRORS,
    check_model_source,
    expand_builtin,
    load_failed,
    load_path,
    local_folder,
    missing_folder,
    model_source,
    recorded_base,
    weight_files,
)
from qmor.model.fingerprint import check_base, record
from qmor.model.quant import compute_dtype, keep_plain_layout, storage_dtype


def model_config(name_or_path: str, trust_remote_code: bool = False):
    """The model's config, read as loading reads it; a model qmor cannot train is refused here, before any weight
    is read."""
    try:
        config = AutoConfig.from_pretrained(load_path(name_or_path), trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as e:
        raise load_failed(name_or_path, e) from None
    support.refuse_transposed(config, trust_remote_code)
    return config


def load_4bit(
    name_or_path: str,
    cfg: QuantConfig = QuantConfig(),
    device: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a causal LM with every linear layer but the output head in NF4 (double quantisation by default)."""
    check_model_source(name_or_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
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
    source = load_path(name_or_path)
    config = model_config(name_or_path, trust_remote_code)
    try:
        with moe.experts_left_out(config):  # MoE experts are read and quantised expert by expert below
            model = AutoModelForCausalLM.from_pretrained(
                source,
                quantization_config=quant,
                dtype=dtype,
                device_map={"": device},
                trust_remote_code=trust_remote_code,
            )
    except LOAD_ERRORS as e:
        raise load_failed(name_or_path, e) from None
    except SafetensorError:  # transformers' own read of a damaged file, which its error does not name
        weight_files(local_folder(source))  # names it in one line
        raise
    moe.quantise_experts(model, source, cfg, device, dtype)
    support.check_quantised(model)
    model.config.use_cache = False
    keep_plain_layout(model)
    return model


# qmor.attach and qmor.load_adapter: the adapters' own, for a 4-bit model however it was loaded (here, or by
# transformers with a BitsAndBytesConfig), whose layers first keep the plain NF4 layout (keep_plain_layout says why)
def attach(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    keep_plain_layout(model)
    return plain.attach(model, cfg)


def load_adapter(model: nn.Module, path: str | Path) -> AdapterMeta:
    keep_plain_layout(model)
    return plain.load_adapter(model, path)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (the end-of-sequence one when it has none)."""
    check_model_source(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(load_path(name_or_path), trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as e:
        raise load_failed(name_or_path, e, "tokenizer") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out of attention and loss, so any id will do
    return tok


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
    adapter_cfg.check_trainable()
    if adapter_cfg.init == "loftq":
        return _load_loftq(model_path, adapter_cfg, quant, device, cache_dir, trust_remote_code)
    model = load_4bit(model_path, quant, device, trust_remote_code)
    attach(model, adapter_cfg)
    meta = AdapterMeta(adapter=adapter_cfg, base_model=model_source(model_path), quant=quant,
                       base_fingerprint=record(model_path))
    return model, meta, None


def _load_loftq(model_path: str, adapter_cfg: AdapterConfig, quant: QuantConfig, device: str | None,
                cache_dir: str | Path | None, trust_remote_code: bool) -> tuple[nn.Module, AdapterMeta, dict]:
    """4-bit model with LoftQ-initialised adapters: loaded from the cache when the same key was computed before,
    else computed layer by layer from the checkpoint and cached."""
    if adapter_cfg.loftq_iters < 1:
        raise QmorError(f"loftq_iters must be at least 1, got {adapter_cfg.loftq_iters}; pass e.g. --loftq-iters 1")
    folder = local_folder(model_path)
    names = weight_files(folder)
    model = load_4bit(str(folder), quant, device, trust_remote_code)
    targets = attach(model, adapter_cfg)
    source = model_source(model_path)
    cache, report = loftq.initialise_cached(model, source, names, targets, adapter_cfg, quant, cache_dir)
    meta = AdapterMeta(adapter=adapter_cfg, base_model=source, quant=quant, init="loftq", base_weights=str(cache),
                       base_fingerprint=record(str(folder)))
    return model, meta, report


def load_trained(
    adapter_dir: str | Path,
    device: str | None = None,
    base_model: str | None = None,
    trust_remote_code: bool = False,
    allow_other_base: bool = False,
) -> tuple[nn.Module, AdapterMeta]:
    """The 4-bit base an adapter was trained on (Q_T for LoftQ adapters) with the adapter attached and loaded;
    a base whose fingerprint differs from the recorded one is refused unless `allow_other_base`."""
    meta = read_meta(adapter_dir)
    base = base_of(meta, adapter_dir, base_model)
    check_base(meta.base_fingerprint, meta.base_model, base, allow_other_base)  # before minutes of loading
    model = load_4bit(base, meta.quant, device, trust_remote_code)
    _fill(model, adapter_dir, meta, base)
    return model, meta


def base_of(meta: AdapterMeta, adapter_dir: str | Path, base_model: str | None = None) -> str:
    """The base to load under an adapter: `base_model` when given (a built-in name becomes its folder), else the one
    the adapter records."""
    if base_model:
        return expand_builtin(base_model)
    base = recorded_base(meta.base_model)
    if not base:
        raise QmorError(f"adapter {adapter_dir} does not record its base model; pass the base with --base-model")
    if missing_folder(base):
        raise QmorError(f"the base model folder {base} (recorded in the adapter) does not exist; pass the folder where "
                        "it is now with --base-model (it is checked to be the same model)")
    return base


def attach_trained(model: nn.Module, adapter_dir: str | Path, base: str, allow_other_base: bool = False) -> AdapterMeta:
    """Attach the adapter saved in `adapter_dir` to `model`, the 4-bit `base` already loaded without adapters, as
    `load_trained` would have built it; returns the adapter's metadata."""
    meta = read_meta(adapter_dir)
    check_base(meta.base_fingerprint, meta.base_model, base, allow_other_base)
    _fill(model, adapter_dir, meta, base)
    return meta


def _fill(model: nn.Module, adapter_dir: str | Path, meta: AdapterMeta, base: str) -> None:
    """Attach the family, put a LoftQ adapter's Q_T into the 4-bit layers, then load the trained weights."""
    attach(model, meta.adapter)
    if meta.init == "loftq":
        loftq.restore_base(model, meta, base)
    load_adapter_weights(model, adapter_dir)
