"""Packing keeps documents apart: a packed document's loss equals its loss alone (tiny 4-bit Llama, SDPA and eager)."""

import pytest
import torch

from qmor.adapters.config import AdapterConfig
from qmor.data.packing import check_documents_apart
from qmor.data.pipeline import DataConfig, build_datasets, collate, pack
from qmor.errors import QmorError
from qmor.model.load import load_for_training
from qmor.model.tiny import tiny_tokenizer
from qmor.training.config import TrainConfig
from qmor.training.loop import train
from qmor.training.loss import ChunkedLoss, enable_checkpointing


def documents(vocab, lengths=(13, 9, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        ids = torch.randint(10, vocab, (n,), generator=g).tolist()
        docs.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return docs


@pytest.fixture(scope="module")
def model(tiny_dir):
    model, _, _ = load_for_training(str(tiny_dir), AdapterConfig(family="lora", r=4, targets=["q_proj", "v_proj"]),
                                    device="cpu")
    model.config.use_cache = False
    enable_checkpointing(model)
    return model.train()  # as in training: checkpointing on


def test_pack_restarts_positions_and_clears_each_first_label():
    docs = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    (row,) = pack(docs, 8)
    assert row == {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1]}
    batch = collate([row, {"input_ids": [7], "labels": [7], "position_ids": [0]}], pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask: it would hide the packing
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]  # padding is a document of its own


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_documents_have_their_unpacked_loss(model, attention, monkeypatch):
    monkeypatch.setattr(model.config, "_attn_implementation", attention)
    docs = documents(model.config.vocab_size)
    loss = ChunkedLoss(model)
    rows = pack(docs, 64)
    assert len(rows) == 1  # all three share one row
    # a second row, holding one document and padding, shares the batch
    packed_sum, n = loss(**collate(rows + [dict(docs[0], position_ids=list(range(13)))], 0))
    alone = [loss(**collate([d], 0)) for d in docs + docs[:1]]
    assert n == sum(k for _, k in alone)
    assert packed_sum.item() == pytest.approx(sum(s.item() for s, _ in alone), rel=1e-5)
    packed_sum.backward()  # and it trains: gradients reach the adapters
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad()


def test_one_causal_row_would_leak_and_the_check_sees_it(model, monkeypatch):
    import transformers.masking_utils as masking

    docs = documents(model.config.vocab_size)
    loss = ChunkedLoss(model)
    with torch.no_grad():
        apart, n = loss(**collate(pack(docs, 64), 0))
        one_row = collate([{k: v for k, v in pack(docs, 64)[0].items() if k != "position_ids"}], 0)
        leaked, _ = loss(**one_row)
    assert abs(leaked.item() - apart.item()) / n > 1e-4  # documents seeing each other change the loss
    assert check_documents_apart(model) < 1e-4
    # a model whose attention ignored the restarting positions would train on the wrong context: refused
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(QmorError, match="does not keep packed documents apart.*without --packing"):
        check_documents_apart(model)


def test_packed_training_run(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QMOR_CACHE", str(tmp_path / "cache"))
    data = DataConfig(source="reverse", num_examples=24, max_len=96, packing=True)
    rows, _, stats = build_datasets(tiny_tokenizer(), data)
    assert stats.packed and stats.n_train < 24 and all("position_ids" in r for r in rows)
    result = train(TrainConfig(model=str(tiny_dir), output=str(tmp_path / "run"), data=data, max_steps=2,
                               batch_size=2, eval_generate=0, device="cpu",
                               adapter=AdapterConfig(family="lora", r=4, init="default")))
    assert result["step"] == 2 and result["loss"] is not None
