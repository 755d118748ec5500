"""Greedy replies from token ids, cut at the first stop token, in left-padded batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Reply:
    ids: list[int]  # the new tokens, up to and including the stop token when there is one
    stopped: bool  # ended on a stop token (False: ran into max_new_tokens)


def stop_ids_of(model: nn.Module) -> list[int]:
    """The tokens `generate` stops on for this model as it was saved: its generation config's eos, else its
    config's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(x) for x in (eos if isinstance(eos, list | tuple) else [eos])]


@torch.no_grad()
def greedy(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int,
           batch_size: int = 8) -> list[Reply]:
    """Each prompt's greedy continuation, stopped at the first of `stop_ids` (none: only max_new_tokens ends it)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)  # (B, T)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)  # (B, T)
        # the stop tokens are given explicitly, so a model's saved generation settings cannot change where it ends
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, use_cache=True, pad_token_id=pad_id,
                             eos_token_id=stop_ids or None)
        for row in gen[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in stop_ids), None)
            out.append(Reply(row[:end + 1], True) if end is not None else Reply(row, False))
    model.train(was_training)
    return out
