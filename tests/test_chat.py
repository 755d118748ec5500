"""Streaming chat on a tiny 4-bit Llama: incremental pieces, adapter switching on one loaded base."""

import pytest
import torch
from conftest import perturb

from qmor import AdapterConfig, QmorError, attach, save_adapter
from qmor.adapters.attach import AdapterMeta, adapted_layers
from qmor.chat import ChatSession
from qmor.model.load import load_4bit, load_for_training

MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]
GREEDY = {"temperature": 0, "max_new_tokens": 24}


@pytest.fixture(scope="module")
def session(tiny_dir):
    return ChatSession(str(tiny_dir))


@pytest.fixture(scope="module")
def lora_dir(tiny_dir, tmp_path_factory):
    model = load_4bit(str(tiny_dir))
    cfg = AdapterConfig(family="lora", r=4, alpha=8.0)
    attach(model, cfg)
    perturb(model)
    return save_adapter(model, tmp_path_factory.mktemp("chat") / "adapter", AdapterMeta(cfg, str(tiny_dir)))


@torch.no_grad()
def base_reply(tiny_dir, session):
    """The same prompt through a separately loaded 4-bit base with plain greedy generate()."""
    model = load_4bit(str(tiny_dir)).eval()
    ids = session.encode(MESSAGES)
    out = model.generate(**ids, do_sample=False, max_new_tokens=GREEDY["max_new_tokens"], pad_token_id=0)
    return session.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_stream_arrives_in_pieces(session):
    session.use_adapter(None)
    pieces = list(session.stream(MESSAGES, system="Be brief.", temperature=0.8, top_p=0.95, top_k=20,
                                 repetition_penalty=1.1, max_new_tokens=16, seed=3))
    assert len(pieces) > 1 and all(pieces)
    again = session.reply(MESSAGES, system="Be brief.", temperature=0.8, top_p=0.95, top_k=20,
                          repetition_penalty=1.1, max_new_tokens=16, seed=3)
    assert "".join(pieces) == again  # the seed makes sampling reproducible


def test_base_alone_equals_plain_generate(tiny_dir, session):
    session.use_adapter(None)
    assert session.reply(MESSAGES, **GREEDY) == base_reply(tiny_dir, session)


def test_switching_adapters_keeps_the_base(tiny_dir, session, lora_dir, tmp_path):
    model = session.model
    session.use_adapter(lora_dir.parent)  # a run-style folder holding adapter/ works too
    first = session.reply(MESSAGES, **GREEDY)
    session.use_adapter(None)
    plain = session.reply(MESSAGES, **GREEDY)
    session.use_adapter(lora_dir)
    second = session.reply(MESSAGES, **GREEDY)
    assert session.model is model and len(adapted_layers(model)) == 14
    assert first == second and first != plain
    assert plain == base_reply(tiny_dir, session)

    # a LoftQ adapter brings its own base Q_T; switching away restores plain NF4
    loftq, meta, _ = load_for_training(str(tiny_dir), AdapterConfig(family="lora", r=4, alpha=8.0, init="loftq"),
                                       cache_dir=tmp_path / "cache")
    loftq_dir = save_adapter(loftq, tmp_path / "loftq", meta)
    with torch.no_grad():
        expected = loftq.eval()(**session.encode(MESSAGES)).logits
    session.use_adapter(loftq_dir)
    with torch.no_grad():
        got = session.model(**session.encode(MESSAGES)).logits
    assert torch.allclose(got, expected, atol=1e-5)
    session.use_adapter(None)
    assert session.reply(MESSAGES, **GREEDY) == plain


def test_bad_settings_and_paths(session, tmp_path):
    with pytest.raises(QmorError, match="temperature"):
        session.reply(MESSAGES, temperature=-1)
    with pytest.raises(QmorError, match="unknown sampling"):
        session.reply(MESSAGES, temprature=0.5)
    with pytest.raises(QmorError, match="role"):
        session.reply([{"role": "robot", "content": "hi"}])
    with pytest.raises(QmorError, match="qmor_adapter.json"):
        session.use_adapter(tmp_path)
    assert session.adapter is None and not adapted_layers(session.model)
