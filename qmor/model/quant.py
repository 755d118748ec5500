"""NF4 quantisation: the only module that imports bitsandbytes (4-bit models are loaded by qmor/model/load.py).

Everything that quantises or dequantises goes through `quantize` / `dequantize` here, so the Q that LoftQ
optimises is bit for bit the Q that training uses (same block size, same double quantisation).
"""

from __future__ import annotations

import contextlib
import logging
import sys

import torch
from torch import nn

from qmor.config import QuantConfig
from qmor.errors import QmorError

_ABSENT = object()


@contextlib.contextmanager
def _without_hub_kernels():
    """Hide the `kernels` package while bitsandbytes imports.

    On CPUs with AVX512-BF16, importing bitsandbytes asks `kernels` for a hub kernel (quantization-bitsandbytes)
    that serves only the repacked CPU layout, which qmor never uses (see keep_plain_layout). The ask costs a Hub
    request, or a download and a load of remote code, on every start, and offline or unverified it prints notices
    users read as errors. bitsandbytes supports running without `kernels`, so it is shown that environment; the
    package is back in place afterwards for anyone who imports it.
    """
    saved = sys.modules.get("kernels", _ABSENT)
    sys.modules["kernels"] = None  # makes `from kernels import ...` raise ImportError
    try:
        yield
    finally:
        if saved is _ABSENT:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = saved


def _drop_fast_path_notice(record: logging.LogRecord) -> bool:
    # bitsandbytes logs that the hub kernel could not be had (_without_hub_kernels made sure of it); nothing is lost
    return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_fast_path_notice)

with _without_hub_kernels():
    import bitsandbytes as bnb  # after the filter, which must see the import-time message

Packed = bnb.nn.Params4bit  # NF4 storage: packed uint8 codes plus their quant_state (absmax, nested absmax)


def compute_dtype(cfg: QuantConfig, device: str | torch.device) -> torch.dtype:
    if cfg.compute_dtype != "auto":
        return getattr(torch, cfg.compute_dtype)
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def storage_dtype(cfg: QuantConfig) -> torch.dtype:
    if cfg.storage not in ("uint8", "bfloat16", "float16", "float32"):
        raise QmorError(f"quant storage must be uint8, bfloat16, float16 or float32, got {cfg.storage!r}")
    return getattr(torch, cfg.storage)


def quantize(weight: torch.Tensor, cfg: QuantConfig = QuantConfig()) -> Packed:
    """NF4-quantise a dense (d_out, d_in) weight on its own device."""
    packed = bnb.nn.Params4bit(
        weight.detach().to(torch.float32).contiguous(),
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=cfg.double_quant,
        blocksize=cfg.blocksize,
        quant_storage=storage_dtype(cfg),
    )
    return packed.to(weight.device)  # moving a Params4bit is what quantises it


def keep_plain_layout(model: nn.Module) -> None:
    """Switch off bitsandbytes' CPU inference repacking on every 4-bit layer of `model`.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 rewrites a 4-bit weight in place into a kernel-specific layout the
    first time the layer runs in eval mode without grad. qmor keeps the plain NF4 layout instead, because:
    - the repack rounds the block scales to bf16, and its inverse re-quantises them, so eval would multiply by a
      different Q than training does, and Q_T (LoftQ), merge, export and checkpoints would read a changed base;
    - it crashes on layers whose input width is not a multiple of the block size (64);
    - everything that reads the codes (dequantize, packed_state, chat's base swap) would have to undo it first.
    The cost is the bf16 CPU inference kernel; training never used it (it runs only without grad).
    """
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _plain(packed: Packed) -> Packed:
    """`packed` itself, after checking that its codes are in the plain NF4 layout that every reader assumes."""
    if getattr(packed.quant_state, "packing_format_for_cpu", False):
        raise QmorError("a 4-bit weight was repacked in place by bitsandbytes' CPU inference path, so its codes are "
                        "no longer plain NF4; load the model with qmor.model.load.load_4bit, or call "
                        "qmor.model.quant.keep_plain_layout(model) before running it in eval mode")
    return packed


def dequantize(packed: Packed) -> torch.Tensor:
    """The dense fp32 weight that a 4-bit layer multiplies by."""
    packed = _plain(packed)
    return bnb.functional.dequantize_4bit(packed.data, packed.quant_state).to(torch.float32)


def levels(packed: Packed) -> torch.Tensor:
    """The 16 values of the NF4 codebook (ascending), in fp32: code c dequantises to levels[c] times its block's
    scale."""
    return packed.quant_state.code.to(torch.float32)


def block_scales(packed: Packed) -> torch.Tensor:
    """Each 64-weight block's absmax as `dequantize` reads it: after double quantisation when it is on, so a code
    rounded against these scales dequantises to exactly what it was rounded to."""
    state = _plain(packed).quant_state
    if state.nested:
        return (bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset).to(torch.float32)
    return state.absmax.to(torch.float32)


def with_codes(packed: Packed, codes: torch.Tensor) -> Packed:
    """A copy of `packed` holding `codes` (one NF4 index 0..15 per weight, in row-major order) under the same
    quant_state: ordinary bitsandbytes storage, two codes a byte, the first in the high nibble."""
    codes = codes.flatten().to(torch.uint8)
    data = _plain(packed).data.clone()
    data.view(torch.uint8).view(-1).copy_(codes[0::2] << 4 | codes[1::2])
    return bnb.nn.Params4bit(data, requires_grad=False, quant_state=packed.quant_state, blocksize=packed.blocksize,
                             compress_statistics=packed.compress_statistics, quant_type="nf4",
                             quant_storage=packed.quant_storage, bnb_quantized=True)


def is_4bit(module: nn.Module) -> bool:
    return isinstance(module, bnb.nn.Linear4bit)


def linear_4bit(packed: Packed, dtype: torch.dtype) -> nn.Module:
    """A bias-free 4-bit linear around an already quantised weight (one expert's matrix of an MoE block)."""
    d_out, d_in = packed.quant_state.shape
    linear = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=dtype, quant_type="nf4", device="meta")
    linear.support_avx512bf16_for_cpu = False  # see keep_plain_layout
    set_packed(linear, packed)
    return linear


def set_packed(linear: nn.Module, packed: Packed) -> None:
    """Replace a 4-bit layer's stored weight (e.g. with LoftQ's Q_T)."""
    packed.module = linear
    linear.weight = _plain(packed)


def packed_state(packed: Packed) -> dict[str, torch.Tensor]:
    """Tensors that fully describe an NF4 weight, for safetensors (quant_state serialised the bitsandbytes way)."""
    out = {"weight": _plain(packed).data}
    out.update(packed.quant_state.as_dict(packed=True))
    return out


def packed_from_state(state: dict[str, torch.Tensor], device: str | torch.device) -> Packed:
    stats = {k: v for k, v in state.items() if k != "weight"}
    return bnb.nn.Params4bit.from_prequantized(state["weight"], stats, requires_grad=False, device=device)


def paged_adamw_8bit(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW with 8-bit states in paged (unified) memory: states move to CPU RAM instead of failing on a GPU
    memory spike. Needs CUDA; CPU training uses torch.optim.AdamW."""
    return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
