"""Chunked loss: same value and gradients as the model's own cross-entropy; offloading changes nothing."""

import pytest
import torch

import qmor.training.loss as loss_mod
import qmor.training.offload as offload_mod
from qmor.adapters.attach import attach
from qmor.adapters.config import AdapterConfig
from qmor.model.load import load_4bit
from qmor.training.loss import ChunkedLoss, chunked_cross_entropy, enable_checkpointing


@pytest.fixture()
def model(tiny_dir):
    m = load_4bit(str(tiny_dir), device="cpu")
    attach(m, AdapterConfig(family="lora", r=4))
    with torch.no_grad():  # B = 0 at init would leave A without gradient; make both matter
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    m.train()
    return m


def batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(8, vocab, (3, 21), generator=g)  # (B, T)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :6] = -100  # a prompt without loss
    labels[mask == 0] = -100
    return ids, mask, labels


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_chunked_loss_matches_model_loss_and_grads(model):
    ids, mask, labels = batch(model.config.vocab_size)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    expected = grads(model)
    model.zero_grad()
    loss_sum, n = ChunkedLoss(model, chunk=7)(input_ids=ids, labels=labels, attention_mask=mask)
    assert n == int((labels[:, 1:] != -100).sum())
    (loss_sum / n).backward()
    torch.testing.assert_close(loss_sum / n, ref, rtol=1e-5, atol=1e-6)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunk_size_does_not_change_result():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = -100
    out = []
    for chunk in (1, 4, 1000):
        hidden.grad = None
        total, n = chunked_cross_entropy(hidden, labels, head, chunk)
        total.backward()
        out.append((total.detach(), hidden.grad.clone()))
    ref = torch.nn.functional.cross_entropy(head(hidden[:, :-1]).reshape(-1, 50), labels[:, 1:].reshape(-1),
                                            reduction="sum")
    for total, g in out:
        torch.testing.assert_close(total, ref)
        torch.testing.assert_close(g, out[0][1])


def plain_cross_entropy(hidden, labels, head, softcap=None, scale=1.0):
    """The whole-sequence computation that the chunked loss must equal: every logit at once."""
    logits = head(hidden[:, :-1]).float() * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             reduction="sum")


class ShapeLog(torch.nn.Module):
    """The head, recording how many rows each call gets (the logits it makes)."""

    def __init__(self, head):
        super().__init__()
        self.head, self.rows = head, []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return self.head(x)


def loss_and_grads(fn, leaves):
    for p in leaves:
        p.grad = None
    total, n = fn()
    (total / max(n, 1) * 3.0).backward()  # a downstream scale: the kept gradients must follow the incoming one
    return total.detach(), n, [p.grad.clone() for p in leaves]


@pytest.mark.parametrize(("softcap", "scale", "case"), [
    (None, 1.0, "ignored"), (30.0, 1.0, "ignored"), (None, 0.25, "ignored"), (5.0, 4.0, "all"), (None, 1.0, "none"),
])
def test_chunked_loss_equals_whole_logits(softcap, scale, case):
    torch.manual_seed(0)
    up = torch.nn.Linear(8, 16)  # stands for the decoder: the gradient must flow on through the hidden states
    head = torch.nn.Linear(16, 50)
    x = torch.randn(3, 11, 8)
    labels = torch.randint(0, 50, (3, 11))
    if case == "ignored":
        labels[0, :4] = -100  # a prompt
        labels[2, 7:] = -100  # padding
    elif case == "none":
        labels[:] = -100
    labelled = int((labels[:, 1:] != -100).sum())
    leaves = [*up.parameters(), *head.parameters()]  # a trainable head too: its gradient is kept in forward as well

    def plain():
        return plain_cross_entropy(up(x), labels, head, softcap, scale), labelled

    logged = ShapeLog(head)

    def chunked():
        return chunked_cross_entropy(up(x), labels, logged, 4, softcap, scale)

    ref, ref_n, ref_grads = loss_and_grads(plain, leaves)
    got, n, got_grads = loss_and_grads(chunked, leaves)
    assert n == ref_n == labelled
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    assert all(rows <= 4 for rows in logged.rows)  # never more than one chunk of logits at once
    assert sum(logged.rows) == labelled  # each labelled token went through the head once: no recompute in backward


def test_chunked_loss_without_gradients_gives_the_same_value():
    torch.manual_seed(0)
    head = ShapeLog(torch.nn.Linear(16, 50, bias=False).requires_grad_(False))
    hidden = torch.randn(2, 9, 16)
    labels = torch.randint(0, 50, (2, 9))
    labels[1, :5] = -100
    with torch.no_grad():
        total, n = chunked_cross_entropy(hidden, labels, head, 3, 30.0, 0.5)
    torch.testing.assert_close(total, plain_cross_entropy(hidden, labels, head.head, 30.0, 0.5))
    assert n == 12 and head.rows == [3, 3, 3, 3]


def test_checkpointing_falls_back_to_the_name_before_transformers_5_23():
    calls = []

    class Before523:  # a model from transformers < 5.23: only gradient_checkpointing_enable exists
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(gradient_checkpointing_kwargs)

    enable_checkpointing(Before523())
    assert calls == [{"use_reentrant": False}]


@pytest.fixture()
def offload_all(monkeypatch):
    """Every saved tensor offloaded (the tiny model's are all under the 1 MiB a real run keeps on the device), each
    Offload made kept for the test to read."""
    made = []

    class Recorded(offload_mod.Offload):
        def __init__(self):
            super().__init__(min_bytes=0)
            made.append(self)

    monkeypatch.setattr(loss_mod, "Offload", Recorded)
    return made


def test_offloaded_checkpointing_gives_the_same_gradients(model, offload_all):
    ids, mask, labels = batch(model.config.vocab_size)
    enable_checkpointing(model)
    results = []
    for offload in (False, True):
        model.zero_grad()
        loss_sum, n = ChunkedLoss(model, chunk=16, offload=offload)(input_ids=ids, labels=labels,
                                                                     attention_mask=mask)
        (loss_sum / n).backward()
        results.append((loss_sum.detach(), grads(model)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=0, atol=0, msg=name)
    assert any(g.abs().sum() > 0 for g in results[0][1].values())
    assert len(offload_all) == 1 and offload_all[0].host


def test_offload_keeps_the_layer_inputs_and_fetches_each_one_layer_ahead(model, offload_all):
    """The (B, T, d) layer inputs go through the hooks; backward fetches them last layer first, each one started
    while the layer after it is being recomputed (before its own unpack), never all at once."""
    enable_checkpointing(model)
    ids, mask, labels = batch(model.config.vocab_size)
    ChunkedLoss(model, offload=True)(input_ids=ids, labels=labels, attention_mask=mask)[0].backward()
    hooks = offload_all[0]
    hidden = model.config.hidden_size
    inputs = [i for i, t in enumerate(hooks.host) if t.shape == (*ids.shape, hidden)]
    assert len(inputs) >= model.config.num_hidden_layers
    order = [i for i in hooks.fetched if i in inputs]
    assert order == sorted(order, reverse=True)  # backward order, each fetched once
    assert hooks.fetched == sorted(hooks.fetched, reverse=True) and not hooks.back  # nothing left on the device


def test_small_saved_tensors_stay_where_they_are():
    hooks = offload_mod.Offload()
    small, big = torch.ones(4), torch.ones(1 << 19)  # 16 bytes and 2 MiB
    assert hooks.pack(small) is small
    i = hooks.pack(big)
    assert i == 0 and hooks.unpack(i) is big and hooks.fetched == [0]
