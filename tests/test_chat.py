"""Streaming chat on a tiny 4-bit Llama: incremental pieces, adapter switching on one loaded base; `qmor chat` on the
base the adapter records."""

import io
import json
import shutil

import pytest
import torch
from conftest import perturbed_lora

from qmor import AdapterConfig, QmorError, cli, save_adapter
from qmor.adapters.attach import adapted_layers
from qmor.chat import ChatSession
from qmor.model.files import expand_builtin
from qmor.model.load import load_4bit, load_for_training, load_trained
from qmor.model.quant import is_4bit

MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]
GREEDY = {"temperature": 0, "max_new_tokens": 24}


@pytest.fixture(scope="module")
def session(tiny_dir):
    return ChatSession(str(tiny_dir))


@pytest.fixture(scope="module")
def lora_dir(tiny_dir, tmp_path_factory):
    return perturbed_lora(tiny_dir, tmp_path_factory.mktemp("chat") / "adapter")


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


def chat(monkeypatch, capsys, *argv, typed: str = "") -> tuple[int, str, str]:
    """`qmor chat ARGV` with `typed` as the terminal's input, then its end."""
    monkeypatch.setattr("sys.stdin", io.StringIO(typed))
    code = cli.main(["chat", *argv])
    said = capsys.readouterr()
    return code, said.out, said.err


def test_chat_command_takes_the_base_the_adapter_records(tiny_dir, lora_dir, monkeypatch, capsys):
    code, out, _ = chat(monkeypatch, capsys, "--adapter", str(lora_dir), typed="/quit\n")
    assert code == 0 and f"from {lora_dir} on base {tiny_dir}" in out
    # leaving with a mergeable adapter says how to export it
    assert out.strip().splitlines()[-1].endswith(f"merge it into an fp16 model: qmor export {lora_dir} --output "
                                                 f"{lora_dir}-fp16")  # after the "> " prompt of the /quit line
    # --base-model names the base; --model, the name chat took before, still works
    for flag in ("--base-model", "--model"):
        code, out, _ = chat(monkeypatch, capsys, flag, str(tiny_dir))
        assert code == 0 and f"[base {tiny_dir} (no adapter)]" in out
    code, _, err = chat(monkeypatch, capsys)
    assert code == 2 and err == ("error: pass --adapter (a run folder: its base is the one it records) or --base-model "
                                 "(a model folder, hub id, tiny or smollm2)\n")


def test_chat_command_on_a_recorded_base_that_moved(lora_dir, tmp_path, monkeypatch, capsys):
    moved = shutil.copytree(lora_dir, tmp_path / "adapter")
    meta = json.loads((moved / "qmor_adapter.json").read_text())
    (moved / "qmor_adapter.json").write_text(json.dumps({**meta, "base_model": str(tmp_path / "gone")}))
    code, _, err = chat(monkeypatch, capsys, "--adapter", str(moved))
    assert code == 2 and err == (f"error: the base model folder {tmp_path / 'gone'} (recorded in the adapter) does not "
                                 "exist; pass the folder where it is now with --base-model (it is checked to be the "
                                 "same model)\n")


def test_a_recorded_builtin_base_is_built_again_when_its_folder_is_gone(tmp_path, monkeypatch, capsys):
    """Built-in models are recorded as their cache folder: chat builds it again rather than refusing the adapter."""
    monkeypatch.setenv("QMOR_CACHE", str(tmp_path / "cache"))
    folder = expand_builtin("tiny")
    model, meta, _ = load_for_training(folder, AdapterConfig(family="lora", r=4, alpha=8.0))
    adapter = save_adapter(model, tmp_path / "adapter", meta)  # records the folder and its fingerprint
    shutil.rmtree(folder)
    code, out, err = chat(monkeypatch, capsys, "--adapter", str(adapter))
    assert code == 0, err
    assert f"on base {folder}" in out


def test_a_merged_export_chats_unquantised_as_exported(lora_dir, tmp_path, monkeypatch, capsys):
    """--no-4bit loads a merged export as transformers does: its logits stay with the 4-bit + adapter model it was
    merged from, where a 4-bit load of the export quantises it a second time and moves away."""
    from transformers import AutoModelForCausalLM

    from qmor.export.exporter import export_merged

    merged = tmp_path / "merged"
    export_merged(lora_dir, merged)
    plain = ChatSession(str(merged), quant=None)
    assert not any(is_4bit(m) for m in plain.model.modules())
    assert plain.describe() == f"base {merged} (unquantised, no adapter)"
    x = plain.encode(MESSAGES)["input_ids"]
    with torch.no_grad():
        adapter = load_trained(lora_dir)[0].eval()(x).logits
        requantised = ChatSession(str(merged)).model(x).logits
        unquantised = plain.model(x).logits
        exported = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()(x).logits
    assert torch.equal(unquantised, exported)
    assert (unquantised - adapter).abs().max() < 0.1 * (requantised - adapter).abs().max()
    with pytest.raises(QmorError, match="needs the 4-bit base"):
        plain.use_adapter(lora_dir)

    code, out, _ = chat(monkeypatch, capsys, "--base-model", str(merged), "--no-4bit", "--temperature", "0",
                        "--max-new-tokens", "8", typed="Hello there, how are you?\n/quit\n")
    assert code == 0 and f"[base {merged} (unquantised, no adapter)]" in out
    assert plain.reply(MESSAGES, temperature=0, max_new_tokens=8) in out
    code, _, err = chat(monkeypatch, capsys, "--adapter", str(lora_dir), "--no-4bit")
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: an adapter needs the 4-bit base it was trained on, and --no-4bit")
