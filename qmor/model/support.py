"""Which architectures qmor can train: checked where a base model is loaded in 4-bit.

qmor quantises and adapts the base's `nn.Linear` layers, which transformers' bitsandbytes loader turns into 4-bit
layers. Models built otherwise are caught here, in one line each:
- GPT-2 style `Conv1D` layers store their weight transposed (d_in, d_out); the loader quantises it as it is, so the
  4-bit layer computes with the wrong orientation: refused before anything loads;
- layers that are subclasses of `nn.Linear` (Falcon's `FalconLinear`) are left unquantised by the loader: when no
  layer at all became 4-bit, the model is refused;
- weights that are not linear layers stay 16/32-bit and get no adapter: a warning gives their share of the layer
  weights. Mixture-of-experts blocks in the common layout become 4-bit experts (qmor.model.moe); others (gpt-oss's
  transposed experts with biases) are what this warning is about. MoE routers stay 16-bit by design.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from qmor.errors import QmorError
from qmor.model.quant import is_4bit


def refuse_transposed(config, trust_remote_code: bool = False) -> None:
    """Refuse, before loading, a model whose projections are transformers' transposed Conv1D layers."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        with torch.device("meta"):  # shapes only: nothing is allocated or read
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError:
        return  # not a causal LM config: loading reports that in its own words
    if any(isinstance(m, Conv1D) for m in model.modules()):
        raise QmorError(f"{type(model).__name__} stores its projections as transposed Conv1D layers, which "
                        "transformers' 4-bit loader quantises without transposing, so qmor cannot train it; use a "
                        "model built from nn.Linear layers (see the README's supported architectures)")


def unquantised_weights(model: nn.Module) -> tuple[int, dict[str, int], torch.dtype | None]:
    """Parameter counts of the 4-bit linears and of the weight matrices left unquantised (by owning module class),
    and the dtype those are stored in.

    Embeddings and the output head stay 16/32-bit by design and are not counted; nor are norms and biases (1-D)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) or m is head for p in m.parameters()}
    skip |= {id(p) for m in model.modules() if type(m).__name__.endswith("Router") for p in m.parameters()}  # MoE
    # routers stay 16-bit by design, like the embeddings
    quantised, owners, dtype = 0, {}, None
    for module in model.modules():
        if is_4bit(module):
            quantised += module.in_features * module.out_features  # the packed tensor holds two codes a byte
            continue
        for p in module.parameters(recurse=False):
            if p.dim() >= 2 and id(p) not in skip:
                owners[type(module).__name__] = owners.get(type(module).__name__, 0) + p.numel()
                dtype = p.dtype
    return quantised, owners, dtype


def check_quantised(model: nn.Module) -> None:
    """After a 4-bit load: refuse a model with no 4-bit layer; warn with the share of weights left unquantised."""
    quantised, owners, dtype = unquantised_weights(model)
    left = sum(owners.values())
    name = type(model).__name__
    classes = ", ".join(sorted(owners, key=owners.get, reverse=True))
    if quantised == 0:
        raise QmorError(f"no layer of {name} could be quantised to 4-bit: its weight layers ({classes}) are not "
                        "plain nn.Linear, which is all transformers' 4-bit loader converts, so qmor cannot train "
                        "this architecture (see the README's supported architectures)")
    if left:
        share = left / (left + quantised)
        moe = ("; qmor quantises only experts with concatenated gate/up weights, untransposed and without bias"
               if "expert" in classes.lower() else "")
        kept = str(dtype).removeprefix("torch.")
        print(f"warning: {share:.0%} of {name}'s layer weights ({left:,} parameters in {classes}) are not linear "
              f"layers, so they stay {kept}, unquantised and without adapters{moe}", file=sys.stderr)
