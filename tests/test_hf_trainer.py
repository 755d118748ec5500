"""A qmor-adapted 4-bit model trained by transformers' Trainer and TRL's SFTTrainer: the loss goes down, only the
qmor adapter is saved, and it reloads with qmor.model.load to the same logits."""

import pytest
import torch

from qmor import AdapterConfig, QmorError
from qmor.adapters.attach import CONFIG, WEIGHTS
from qmor.data import tasks
from qmor.data.pipeline import DataConfig, build_datasets
from qmor.model.load import load_4bit, load_for_training, load_trained
from qmor.training.hf_trainer import chunked_loss, collator, prepare_model

STEPS = 10


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QMOR_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir))


def adapted(tiny_dir):
    return load_for_training(str(tiny_dir), AdapterConfig(family="lora", r=4, alpha=8.0), device="cpu")[:2]


def common_args(out):
    return dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=2e-2,
                lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_steps=5, report_to="none",
                use_cpu=True, seed=0)


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def assert_learnt(trainer):
    seen = losses(trainer)
    assert len(seen) == STEPS and sum(seen[-3:]) / 3 < 0.85 * sum(seen[:3]) / 3, seen


def assert_only_the_qmor_adapter(folder):
    names = {p.name for p in folder.iterdir()}
    assert {WEIGHTS, CONFIG} <= names
    assert not names & {"model.safetensors", "adapter_model.safetensors", "adapter_config.json"}, names


@torch.no_grad()
def assert_reloads(model, folder):
    x = torch.randint(8, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    trained = model.eval()(input_ids=x).logits
    fresh, meta = load_trained(folder, device="cpu")
    assert torch.equal(fresh.eval()(input_ids=x).logits, trained)
    return meta


def test_trainer_with_the_chunked_loss(tiny_dir, tok, tmp_path):
    from transformers import Trainer, TrainingArguments

    model, meta = adapted(tiny_dir)
    train, _, _ = build_datasets(tok, DataConfig(source="uuid", num_examples=8, max_len=96))
    prepare_model(model, meta, tok)
    loss_fn, collate = chunked_loss(model), collator(tok.pad_token_id)
    batch = collate(train[:4])
    with torch.no_grad():  # the chunked loss is the model's own mean cross-entropy, without the full logits
        ours = loss_fn(model(**{k: v for k, v in batch.items() if k != "labels"}), batch["labels"])
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["labels"]).loss
    assert torch.allclose(ours, theirs, atol=1e-5)
    trainer = Trainer(model=model, args=TrainingArguments(**common_args(tmp_path / "out")), train_dataset=train,
                      data_collator=collate, compute_loss_func=loss_fn)
    trainer.train()
    assert_learnt(trainer)
    assert_only_the_qmor_adapter(tmp_path / "out" / "checkpoint-5")
    trainer.save_model(str(tmp_path / "final"))
    assert_only_the_qmor_adapter(tmp_path / "final")
    assert assert_reloads(model, tmp_path / "final").chat_template == tok.chat_template


def test_trainer_eval_loss_carries_no_auxiliary_loss(tiny_dir, tok, tmp_path):
    """SiRA's load-balancing loss belongs to training steps; Trainer's eval loss is the plain cross-entropy, the
    same as qmor's own eval loss (at aux weight 1 every SiRA layer would add about 1 nat)."""
    from transformers import Trainer, TrainingArguments

    from qmor.training.evaluate import eval_loss
    from qmor.training.loss import ChunkedLoss

    cfg = AdapterConfig(family="sira", r=4, alpha=8.0, options={"aux_loss_weight": 1.0})
    model, meta = load_for_training(str(tiny_dir), cfg, device="cpu")[:2]
    train, val, _ = build_datasets(tok, DataConfig(source="uuid", num_examples=16, max_len=96, val_size=0.25))
    prepare_model(model, meta, tok)
    args = TrainingArguments(**{**common_args(tmp_path / "out"), "max_steps": 2, "save_steps": 100},
                             per_device_eval_batch_size=len(val))  # one eval batch: one token-mean, like ours
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                      data_collator=collator(tok.pad_token_id), compute_loss_func=chunked_loss(model))
    trainer.train()
    theirs = trainer.evaluate()["eval_loss"]
    ours = eval_loss(ChunkedLoss(model), val, len(val), tok.pad_token_id, "cpu")
    assert theirs == pytest.approx(ours, rel=1e-5)


def test_sft_trainer_on_conversations(tiny_dir, tok, tmp_path):
    import datasets
    from trl import SFTConfig, SFTTrainer

    model, meta = adapted(tiny_dir)
    records = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}]}
               for r in tasks.records("uuid", "train", 8, 0)]
    prepare_model(model, meta, tok)
    config = SFTConfig(**common_args(tmp_path / "out"), bf16=False, max_length=96)
    trainer = SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(records),
                         processing_class=tok)
    trainer.train()
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # not TRL's bf16
    assert_learnt(trainer)
    assert_only_the_qmor_adapter(tmp_path / "out" / "checkpoint-5")
    trainer.save_model(str(tmp_path / "final"))
    assert_only_the_qmor_adapter(tmp_path / "final")
    assert_reloads(model, tmp_path / "final")


def test_a_model_without_adapters_is_refused(tiny_dir):
    from qmor.adapters.attach import AdapterMeta

    with pytest.raises(QmorError, match="no qmor adapters to train"):
        prepare_model(load_4bit(str(tiny_dir), device="cpu"), AdapterMeta(adapter=AdapterConfig()))
