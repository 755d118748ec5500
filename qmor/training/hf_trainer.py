"""Train a qmor-adapted 4-bit model with transformers' Trainer or TRL's SFTTrainer.

What the two need from the model, and what `prepare_model` gives them:
- the marker transformers sets when adapters are attached to a quantised model (`_hf_peft_config_loaded`). Without
  it, Trainer refuses "purely quantized models", and gradient checkpointing does not make the frozen embeddings'
  output require grad, so no gradient would reach adapters inside reentrant-checkpointed layers;
- saving: Trainer writes checkpoints and `save_model` through `model.save_pretrained`, which for this model would
  write the 4-bit base and the adapters under module names that load nowhere. The prepared model's save_pretrained
  writes the qmor adapter only (adapter.safetensors + qmor_adapter.json), which `qmor.model.load.load_trained` reloads;
- fp32 adapters: SFTTrainer casts the trainable weights of a 4-bit model to bf16 (the QLoRA paper's choice), in
  which small updates vanish; the prepared model puts qmor's adapters back to fp32 before each forward.

The loss: with Trainer, pass `compute_loss_func=chunked_loss(model)` and `data_collator=collator(pad_id)`: the
collator asks the model for its final hidden states instead of full logits, and the loss runs the output head and
cross-entropy chunk by chunk (training/loss.py), as qmor's own loop does. SFTTrainer already computes its loss without
full logits (its fused LM head), so it needs neither; a compute_loss_func there would make it run the model twice.
Resuming through Trainer's `resume_from_checkpoint` is not supported: it looks for full model weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from qmor.adapters.attach import CONFIG, WEIGHTS, AdapterMeta, adapted_layers, adapter_state, aux_loss
from qmor.data.pipeline import collate
from qmor.data.template import template_text
from qmor.errors import QmorError
from qmor.files import save_json
from qmor.training.loss import chunked_cross_entropy, head_scaling


def prepare_model(model: nn.Module, meta: AdapterMeta, tokenizer=None) -> nn.Module:
    """Mark `model` (4-bit base + qmor adapters, e.g. from qmor.model.load.load_for_training) as adapted, make its
    save_pretrained write the qmor adapter, and keep its adapters fp32. `tokenizer`: its chat template is recorded
    with the adapter, for chat and export. Returns the model."""
    layers = adapted_layers(model)
    if not layers:
        raise QmorError("the model has no qmor adapters to train; attach them first (qmor.adapters.attach, or "
                        "qmor.model.load.load_for_training)")
    if tokenizer is not None:
        meta.chat_template = template_text(tokenizer)
    model._hf_peft_config_loaded = True
    # dict.fromkeys: a shared expert adapter sits in every expert's layer, its parameters belong in the list once
    params = list(dict.fromkeys(p for layer in layers.values() for p in layer.adapter.parameters()))

    def keep_fp32(module: nn.Module, args) -> None:
        for p in params:
            if p.dtype != torch.float32:
                p.data = p.data.float()

    def save_pretrained(save_directory, is_main_process: bool = True, **ignored) -> None:
        if is_main_process:
            save_adapter_files(model, save_directory, meta)

    model.register_forward_pre_hook(keep_fp32)
    model.save_pretrained = save_pretrained  # the instance's own: Trainer and users call it by this name
    return model


def save_adapter_files(model: nn.Module, folder: str | Path, meta: AdapterMeta) -> None:
    """adapter.safetensors + qmor_adapter.json into `folder`, each file written whole under a temporary name and
    renamed; the rest of the folder (a Trainer checkpoint's optimizer state, the tokenizer) is left alone."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{WEIGHTS}.tmp"
    save_file(adapter_state(model), str(tmp), metadata={"format": "qmor"})
    tmp.replace(folder / WEIGHTS)
    save_json(meta.to_json(), folder / CONFIG)


def collator(pad_id: int):
    """A Trainer data collator for qmor examples ({"input_ids", "labels"}, e.g. from data.pipeline.build_datasets) that
    asks the model for hidden states and a single position's logits, for `chunked_loss`."""
    def collate_for_trainer(examples: list[dict]) -> dict:
        return {**collate(examples, pad_id), "output_hidden_states": True, "logits_to_keep": 1}

    return collate_for_trainer


def chunked_loss(model: nn.Module, chunk: int = 1024):
    """Trainer's `compute_loss_func`: the mean next-token cross-entropy over the labelled tokens of the whole
    accumulated batch, from the final hidden states (transformers' last one is after the final norm) in chunks of
    `chunk` tokens, plus the adapters' weighted auxiliary loss (SiRA's load balancing)."""

    def compute_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        hidden = getattr(outputs, "hidden_states", None)
        if not hidden:
            raise QmorError("the model returned no hidden states, so the chunked loss has nothing to work on; pass "
                            "data_collator=qmor.training.hf_trainer.collator(tokenizer.pad_token_id) to the Trainer")
        softcap, scale = head_scaling(model.config)
        total, n = chunked_cross_entropy(hidden[-1], labels, model.get_output_embeddings(), chunk, softcap, scale)
        count = max(int(num_items_in_batch), 1) if num_items_in_batch is not None else max(n, 1)
        loss = total / count
        extra = aux_loss(model)  # a per-micro-batch mean: weighted by this micro-batch's share of the tokens
        if extra is not None:
            loss = loss + extra * (n / count)
        return loss

    return compute_loss
