"""The inputs of a model's adapted linears on calibration text, gathered in GPTQ's sequential order: a linear's
statistics come through the layers below it as they already are after their init (quantised, adapters fitted), so
each init corrects the errors of the ones before it.

The decoder runs a layer at a time over every calibration sequence. Within a layer, the linears that read one input
(q/k/v read the normed hidden states; gate/up the MLP's input) form a group: the layer runs until the first linear
of another group is called, the group's Gram matrix H = Σ xᵀx is summed over the sequences, and the caller
initialises the group before the next one is gathered. Memory: one layer's inputs (every sequence's hidden states)
and one group's H, never the whole model's activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from qmor.errors import QmorError
from qmor.model.tile import decoder_layers

# per batch of sequences: a decoder layer's hidden states (B, T, d), its kwargs, and which positions are tokens
# (B, T) rather than right padding (their activations stay out of every H)
Inputs = list[tuple[torch.Tensor, dict, torch.Tensor]]
BATCH = 16  # sequences per forward: a decoder layer's call costs about as much for one sequence as for sixteen


class _Stop(Exception):
    """Raised in a hook to end a forward pass once it has given what was needed."""


def blocks_of(model: nn.Module, names: list[str]) -> list[tuple[nn.Module, list[str]]]:
    """The decoder layers in order, each with the adapted linears in `names` inside it; a target outside every
    decoder layer is refused (its input would not come from the layer stream)."""
    owner = {id(m): n for n, m in model.named_modules()}
    layers = [(layer, owner[id(layer)]) for layer in decoder_layers(model)]
    out = [(layer, [n for n in names if n.startswith(prefix + ".")]) for layer, prefix in layers]
    outside = sorted(set(names) - {n for _, mine in out for n in mine})
    if outside:
        raise QmorError(f"--init calibrated fits linears inside the decoder layers only, and {outside[0]} is not in "
                        "one; leave it out of --targets, or pass --init loftq")
    return out


@torch.no_grad()
def first_inputs(model: nn.Module, sequences: list[torch.Tensor], device: torch.device) -> Inputs:
    """What the first decoder layer receives (embeddings, position embeddings, attention mask), for the sequences
    right-padded in batches of BATCH: causal attention never lets a token see the padding after it."""
    caught: Inputs = []

    def catch(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden, kwargs, mask))
        raise _Stop

    handle = decoder_layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, len(sequences), BATCH):
            batch = sequences[start : start + BATCH]
            width = max(len(s) for s in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.bool)
            for row, s in enumerate(batch):
                ids[row, : len(s)], mask[row, : len(s)] = s, True
            mask = mask.to(device)
            try:
                model(input_ids=ids.to(device), attention_mask=mask.long(), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return caught


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def forward(layer: nn.Module, inputs: Inputs) -> Inputs:
    """The next layer's inputs: this one's outputs, with the same keyword arguments."""
    return [(_output(layer(hidden, **kwargs)), kwargs, mask) for hidden, kwargs, mask in inputs]


@torch.no_grad()
def groups(layer: nn.Module, inputs: Inputs, linears: dict[str, nn.Module]) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(names, H) for each group of `linears` in the order the layer calls them; the caller changes the group's
    layers before asking for the next, whose inputs then run through them."""
    pending = dict(linears)
    while pending:
        names, gram = _next_group(layer, inputs, pending)
        yield names, gram
        for name in names:
            del pending[name]


def _next_group(layer: nn.Module, inputs: Inputs, pending: dict[str, nn.Module]) -> tuple[list[str], torch.Tensor]:
    seen: dict = {}
    gram: dict[str, torch.Tensor] = {}  # one running sum: a d x d matrix per sequence would not fit for wide layers

    def hook(name: str) -> Callable:
        def record(module, args):
            x = args[0]
            if "x" not in seen:  # the first pending linear the layer calls opens the group
                seen["x"] = x
                flat = x[seen["mask"]].to(torch.float32)  # (tokens, d_in): the padding left out
                gram["H"] = flat.T @ flat if "H" not in gram else gram["H"].addmm_(flat.T, flat)
            elif x is not seen["x"]:  # another input: the group is complete for this sequence
                raise _Stop
            seen.setdefault("names", []).append(name)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in pending.items()]
    members = None
    try:
        for hidden, kwargs, mask in inputs:
            seen.clear()
            seen["mask"] = mask
            try:
                layer(hidden, **kwargs)
            except _Stop:
                pass
            if members is None:
                members = seen.get("names", [])
            elif seen.get("names", []) != members:
                raise QmorError("the calibration sequences call this layer's linears in different orders, so their "
                                "inputs cannot be gathered group by group; pass --init loftq")
    finally:
        for h in handles:
            h.remove()
    if not members:
        raise QmorError(f"calibration never reached {next(iter(pending))}: the layer did not call it; leave it out "
                        "of --targets, or pass --init loftq")
    tokens = sum(int(mask.sum()) for _, _, mask in inputs)
    return members, gram["H"] / max(tokens, 1)
