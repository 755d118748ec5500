"""`qmor eval` on the tiny model: a run that memorised its records scores them, its merged export agrees with it,
exports with a wrong end-of-turn token or chat template are flagged, several runs are compared, bad input is one
line. The SmolLM2 facts run (forgetting measured on real general questions, GGUF) is in test_real_model_eval.py."""

import json
import re
import shutil
from importlib import resources
from pathlib import Path

import pytest

from qmor import cli
from qmor.adapters.config import AdapterConfig
from qmor.data.pipeline import DataConfig
from qmor.data.template import CHATML_TEMPLATE
from qmor.eval import general, items
from qmor.eval.stops import end_of_turn, modelfile_stops
from qmor.export.exporter import export_merged, export_peft
from qmor.model.load import load_tokenizer
from qmor.training.config import TrainConfig
from qmor.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, tiny_dir: Path, steps: int) -> Path:
    """The memorisation task with no held-out split: the run is judged on the records it learnt."""
    cfg = TrainConfig(model=str(tiny_dir), output=str(out), lr=1e-2, max_steps=steps, batch_size=8, warmup_ratio=0.0,
                      adapter=AdapterConfig(family="lora", r=8, init="default"),
                      data=DataConfig(source="uuid", num_examples=8, max_len=96), log_steps=10, save_steps=0,
                      eval_generate=0, device="cpu")
    train(cfg)
    return out


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    learnt = run(folder / "learnt", tiny_dir, 80)
    export_merged(learnt, folder / "learnt-fp16")  # recorded in the run's exports.json
    export_peft(learnt, folder / "learnt-peft")
    return folder, learnt, run(folder / "short", tiny_dir, 4)


def evaluate(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(["eval", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def report(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval.json").read_text())


def test_a_memorising_run_scores_what_it_learnt_and_its_export_agrees(trained, capsys):
    folder, learnt, _ = trained
    code, out, err = evaluate([str(learnt), "--prompts", "4"], capsys)
    assert code == 0, err
    r = report(learnt)
    print(f"\n{out}")
    assert r["data"] == {"source": "uuid", "split": "training data", "examples": 8, "answers": 8}
    assert r["loss"]["adapter"]["loss"] < 0.5 * r["loss"]["base"]["loss"]
    assert r["answers"]["base"]["exact_match"] == 0 and r["answers"]["adapter"]["exact_match"] >= 0.75
    assert r["answers"]["adapter"]["char_accuracy"] > r["answers"]["base"]["char_accuracy"] + 0.5
    assert r["end_of_turn"] == "<|end|>"
    assert [(e["name"], e["kind"]) for e in r["exports"]] == [("learnt-fp16", "merged"), ("learnt-peft", "peft")]
    for export in r["exports"]:
        assert export["ok"] and export["top1"] >= 0.95 and export["kl_mean"] < 0.01, export
        assert export["template_same"] and export["stops_on_end_of_turn"]
        # the memorised replies end on <|end|>, and the export ends each of them there too
        assert export["adapter_stopped"] >= 2 and export["stopped_with_adapter"] == export["adapter_stopped"]
    side = r["side_by_side"]
    assert len(side) == 4 and side[0]["prompt"] == r["answers"]["items"][0]["prompt"]
    assert side[0]["exports"]["learnt-fp16"] == side[0]["exports"]["learnt-peft"] == side[0]["adapter"]
    assert side[-1]["prompt"] == general.questions()[1].question  # the last half: general questions
    md = (learnt / "eval.md").read_text()
    assert "| learnt-fp16 | merged |" in md and "| learnt-peft | peft |" in md and "## Side by side" in md
    assert (learnt / "eval.png").stat().st_size > 10_000
    assert not list(learnt.glob(".*tmp*"))  # written under temporary names, renamed


def broken_copy(source: Path, folder: Path, **change) -> Path:
    out = folder / change.pop("name")
    if not out.exists():
        shutil.copytree(source, out)
    if "eos" in change:  # what generate() stops on, as a wrongly configured export would have it
        config = json.loads((out / "generation_config.json").read_text())
        (out / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": change["eos"]}))
    if "template" in change:
        (out / "chat_template.jinja").write_text(change["template"])
        tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
        tokenizer_config["chat_template"] = change["template"]
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return out


def test_exports_that_stop_elsewhere_or_template_otherwise_are_flagged(trained, capsys):
    folder, learnt, _ = trained
    good = folder / "learnt-fp16"
    wrong_eos = broken_copy(good, folder, name="wrong-eos", eos=2)  # </s>, which the adapter never writes
    wrong_template = broken_copy(good, folder, name="wrong-template", template=CHATML_TEMPLATE)
    code, out, err = evaluate([str(learnt), "--export", str(wrong_eos), "--export", str(wrong_template),
                               "--prompts", "2", "--no-general"], capsys)
    assert code == 1 and "flagged: wrong-eos, wrong-template" in err
    found = {e["name"]: e for e in report(learnt)["exports"]}
    assert found["learnt-fp16"]["ok"]
    eos = found["wrong-eos"]
    assert not eos["ok"] and not eos["stops_on_end_of_turn"] and eos["stop_tokens"] == ["</s>"]
    assert eos["problems"] == ["it does not stop on <|end|>, the token that ends the adapter's replies (it stops on "
                               "</s>), so it talks on past its answer"]
    assert eos["stopped_with_adapter"] == 0 < eos["adapter_stopped"]  # seen in the replies too: none ends
    assert eos["top1"] >= 0.95  # the same weights: only where it stops is wrong
    template = found["wrong-template"]
    assert not template["ok"] and not template["template_same"] and template["stops_on_end_of_turn"]
    assert "chat template differs" in template["problems"][0]
    assert "wrong-eos: it does not stop on <|end|>" in (learnt / "eval.md").read_text()


def test_several_runs_are_compared_in_one_table_and_plot(trained, capsys, tmp_path):
    folder, learnt, short = trained
    out_dir = tmp_path / "both"
    code, out, err = evaluate([str(learnt), str(short), "--output", str(out_dir), "--prompts", "2", "--no-general"],
                              capsys)
    assert code == 0, err
    table = (out_dir / "eval.md").read_text().splitlines()
    assert table[0].startswith("| run | family |") and len(table) == 4
    assert table[2].startswith("| learnt | lora r=8 |") and table[3].startswith("| short | lora r=8 |")
    runs = json.loads((out_dir / "eval.json").read_text())["runs"]
    assert runs[0]["answers"]["adapter"]["char_accuracy"] > runs[1]["answers"]["adapter"]["char_accuracy"]
    assert runs[1]["exports"] == []  # the short run was never exported
    assert runs[0]["loss"]["base"] == runs[1]["loss"]["base"]  # one base, measured once for the same data
    # the bar ends full: the stages of the base, measured once for both runs, are counted for the second too
    assert re.search(r"short: adapter log-probabilities: 100%\|[^|]*\| (\d+)/\1 \[", err)
    assert (out_dir / "eval.png").stat().st_size > 10_000 and (short / "eval.json").is_file()
    assert "| learnt | lora r=8 |" in out


def test_bad_input_is_one_line(trained, capsys, tmp_path):
    folder, learnt, _ = trained
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(learnt / "config.json", unfinished / "config.json")
    cases = [([str(unfinished)], "has no adapter yet: its training has not finished"),
             ([str(tmp_path / "nowhere")], "does not exist; pass a run folder"),
             ([str(learnt), "--export", str(tmp_path)], "is not an export"),
             ([str(learnt), str(learnt), "--export", str(folder / "learnt-fp16")], "--export goes with one run"),
             ([str(learnt), "--limit", "0"], "--limit must be at least 1")]
    for argv, expected in cases:
        code, out, err = evaluate(argv, capsys)
        assert code == 2 and err.startswith("error: ") and expected in err and err.count("\n") == 1, err


def test_a_gone_export_is_a_note_not_an_error(trained, tmp_path):
    from qmor.eval.exports import find
    from qmor.training.run_dir import RunDir

    folder, learnt, _ = trained
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.record_export(folder / "learnt-fp16", "merged")
    run.record_export(tmp_path / "deleted", "gguf")
    run.record_export(folder / "learnt-fp16", "merged")  # exported again to the same place: one record
    found, notes = find(run, [])
    assert [e.name for e in found] == ["learnt-fp16"] and len(run.recorded_exports()) == 2
    assert notes == [f"export {(tmp_path / 'deleted').resolve()} (recorded in exports.json) is gone; left out"]


def test_end_of_turn_is_the_token_after_the_reply(tiny_dir):
    tok = load_tokenizer(str(tiny_dir))
    assert tok.convert_ids_to_tokens(end_of_turn(tok, tok.chat_template)) == "<|end|>"
    chatml = tok.convert_ids_to_tokens(end_of_turn(tok, "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
                                                        "{% if add_generation_prompt %}[{% endif %}"))
    assert chatml == "]"


def test_the_reference_is_the_last_labelled_span(tiny_dir):
    tok = load_tokenizer(str(tiny_dir))
    ids = tok("<|user|>hi<|end|><|assistant|>hello<|end|>", add_special_tokens=False)["input_ids"]
    start = ids.index(tok.convert_tokens_to_ids("<|assistant|>")) + 1
    found = items.answer(tok, {"input_ids": ids, "labels": [-100] * start + ids[start:]})
    assert found.prompt == ids[:start] and found.reference == "hello" and found.reference_tokens == 6
    assert items.question(tok, tok.chat_template, found.prompt) == "hi"
    assert items.answer(tok, {"input_ids": ids, "labels": list(ids)}) is None  # plain text: no prompt to ask


def test_general_questions_ship_with_the_package_and_score_whole_words():
    assert resources.files("qmor.eval").joinpath("general.json").is_file()
    assert '"qmor.eval" = ["general.json"]' in (ROOT / "pyproject.toml").read_text()  # in the wheel too
    found = general.questions()
    assert len(found) >= 12 and len({q.question for q in found}) == len(found)
    france = next(q for q in found if "France" in q.question)
    assert france.correct("It is PARIS.") and not france.correct("Parisian food")
    result = general.forgetting(found[:2], ["Paris", "Tokyo"], ["Paris", "Kyoto"])
    assert (result["kept"], result["lost"], result["base_correct"]) == (1, [found[1].question], 2)


def test_modelfile_stop_lines_are_read():
    text = 'FROM x.gguf\nPARAMETER stop "<|im_end|>"\nPARAMETER temperature 0.2\nPARAMETER stop "<|endoftext|>"\n'
    assert modelfile_stops(text) == ["<|im_end|>", "<|endoftext|>"]


def test_exports_sharing_a_folder_name_are_told_apart(tmp_path):
    from qmor.eval.exports import find
    from qmor.training.run_dir import RunDir

    for kind in ("merged", "gguf"):
        (tmp_path / kind / "NAME").mkdir(parents=True)
    (tmp_path / "merged" / "NAME" / "config.json").write_text("{}")
    (tmp_path / "gguf" / "NAME" / "NAME-q8_0.gguf").write_bytes(b"GGUF")
    found, _ = find(RunDir(tmp_path / "run"), [tmp_path / "merged" / "NAME", tmp_path / "gguf" / "NAME"])
    assert [(e.name, e.kind) for e in found] == [("merged/NAME", "merged"), ("gguf/NAME", "gguf")]
