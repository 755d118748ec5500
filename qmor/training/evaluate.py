"""End-of-run checks: validation loss, and greedy generation scored against a built-in task's references."""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from qmor.data import tasks
from qmor.data.pipeline import DataConfig, collate, prompt_text
from qmor.data.template import encode


@torch.no_grad()
def eval_loss(loss_fn: nn.Module, examples: list[dict], batch_size: int, pad_id: int, device) -> float:
    """Mean next-token loss over every labelled token of `examples` (loss_fn: a qmor.training.loss.ChunkedLoss)."""
    was_training = loss_fn.training
    loss_fn.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        loss_sum, n = loss_fn(**batch)
        total, count = total + loss_sum.item(), count + n
    loss_fn.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy continuations of rendered prompts (left-padded batches, KV cache on)."""
    was_training = model.training
    model.eval()  # also switches activation checkpointing off
    device = next(p for p in model.parameters() if p.requires_grad).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generating", leave=False):
        ids = [encode(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)  # (B, T)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)  # (B, T)
        gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, use_cache=True, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return out


def score_task(model: nn.Module, tokenizer, data: DataConfig, n: int) -> dict | None:
    """Exact match and character accuracy of greedy answers on a built-in task's test split (for `uuid`, the
    training keys themselves: memorisation is the task). None for datasets that are not built-in tasks."""
    if n <= 0 or not tasks.is_task(data.source):
        return None
    records = tasks.records(data.source, "test", data.num_examples, data.seed)[:n]
    refs = [r["completion"] for r in records]
    longest = max(len(encode(tokenizer, r)) for r in refs)
    preds = generate(model, tokenizer, [prompt_text(tokenizer, r) for r in records], longest + 4)
    result = tasks.score(data.source, preds, refs, [r["task"] for r in records])
    result["examples"] = [{"prompt": r["prompt"], "reference": ref, "prediction": p}
                          for r, ref, p in zip(records[:3], refs, preds, strict=False)]
    return result
