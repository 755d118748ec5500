"""What a run leaves unset is decided from what is trained: the built-in tiny demo keeps its preset, any other model
gets LoRA defaults, its epochs, a length from its data and a batch that fits the free memory (qmor/training/
resolve.py); the decisions are printed in one block and saved in config.json, and a run that cannot fit is refused
before the model loads."""

import json
import math
import sys
from pathlib import Path

import pytest

from qmor.data.pipeline import DataConfig, read_examples
from qmor.model.load import load_tokenizer
from qmor.plan import estimate, geometry, load_config
from qmor.training import measure
from qmor.training.config import TrainConfig
from qmor.training.resolve import Room, fit, plan_options, settle
from qmor.training.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import finetune_4bit  # noqa: E402

QUICK = ["--eval-generate", "0", "--log-steps", "1", "--save-steps", "0", "--device", "cpu"]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QMOR_CACHE", str(tmp_path_factory.getbasetemp() / "qmor-cache"))


def facts(path: Path, n: int, reply_chars: int = 20) -> Path:
    """`n` question-answer records; the first has a reply of `reply_chars` characters (one token each)."""
    rows = [{"instruction": f"question {i}?", "output": ("y" * reply_chars if i == 0 else f"answer {i}.")}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cli_config(*argv) -> TrainConfig:
    return finetune_4bit.build_config(finetune_4bit.parser().parse_args(list(argv)))


def saved(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def start(run: Path) -> dict:
    return RunDir(run).read_events()[0]


def test_the_demo_keeps_its_preset_exactly():
    """`qmor train` with no arguments: the values every earlier version gave it."""
    cfg, settings = settle(cli_config())
    a = cfg.adapter
    assert (cfg.model, a.family, a.r, a.alpha, a.init, a.loftq_iters, a.targets) == (
        "tiny", "mora", 8, 16.0, "loftq", 1, "all-linear")
    assert (cfg.lr, cfg.epochs, cfg.max_steps, cfg.batch_size, cfg.grad_accum) == (5e-3, 1.0, 120, 16, 1)
    assert (cfg.data.source, cfg.data.num_examples, cfg.data.max_len) == ("uuid", 32, 96)
    assert {s.source for s in settings.chosen.values()} == {"default"} and not settings.notes
    # on the demo too, given epochs are honoured: no step cap is left in their way
    assert settle(cli_config("--epochs", "2"))[0].max_steps == 0


def test_a_flag_always_wins_and_is_recorded_as_given(tiny_dir):
    cfg, settings = settle(cli_config("--model", str(tiny_dir), "--rank", "4", "--lr", "1e-3", "--family", "mora"))
    assert (cfg.adapter.family, cfg.adapter.r, cfg.lr) == ("mora", 4, 1e-3)
    assert {k: settings.chosen[k].source for k in ("family", "rank", "lr", "init")} == {
        "family": "given", "rank": "given", "lr": "given", "init": "default"}
    # the family's own learning rate, declared with the family, when none is given
    assert settle(cli_config("--model", str(tiny_dir), "--family", "mora"))[0].lr == 4e-4
    # alpha follows the rank on a model's defaults: alpha / r stays 2
    assert settle(cli_config("--model", str(tiny_dir), "--rank", "64"))[0].adapter.alpha == 128.0


def test_a_model_gets_the_defaults_printed_and_saved(tiny_dir, tmp_path, capsys):
    """Any model but the built-in demo (here a random Llama folder): LoRA r16 alpha 32 on every linear, LoftQ
    init (T = 1), LoRA's learning rate, 3 epochs, the longest example's length and 8 sequences per step."""
    data = facts(tmp_path / "facts.jsonl", 10)
    out = tmp_path / "run"
    assert finetune_4bit.main(["--model", str(tiny_dir), "--dataset", str(data), "--output", str(out), *QUICK]) == 0
    cfg = saved(out)
    assert (cfg["adapter"]["family"], cfg["adapter"]["r"], cfg["adapter"]["alpha"], cfg["adapter"]["init"],
            cfg["adapter"]["targets"]) == ("lora", 16, 32.0, "loftq", "all-linear")
    assert (cfg["lr"], cfg["epochs"], cfg["max_steps"]) == (2e-4, 3.0, 0)
    assert cfg["batch_size"] * cfg["grad_accum"] == 8 and cfg["batch_size"] == 8  # 8 fit in this machine's RAM
    longest = read_examples(load_tokenizer(str(tiny_dir)), DataConfig(source=str(data))).longest
    assert cfg["data"]["max_len"] == longest
    assert start(out)["total_steps"] == math.ceil(3 * 10 / 8)
    # the block: one line per decided setting, saying where its value came from
    shown = capsys.readouterr().out
    block = shown[shown.index("settings on"):].splitlines()
    rows = {line.split()[0]: line.split()[2] for line in block[1:11]}
    assert rows == {"family": "default", "rank": "default", "alpha": "default", "init": "default", "lr": "default",
                    "epochs": "default", "max_steps": "default", "max_len": "data", "batch_size": "planner",
                    "grad_accum": "default"}
    # a resumed or reused run reads the values decided, not the defaults again
    assert RunDir(out).read_config().data.max_len == longest


def test_epochs_are_honoured(tiny_dir, tmp_path):
    n = 13
    out = tmp_path / "run"
    argv = ["--model", str(tiny_dir), "--dataset", str(facts(tmp_path / "d.jsonl", n)), "--output", str(out),
            "--epochs", "2", *QUICK]
    assert finetune_4bit.main(argv) == 0
    cfg = saved(out)
    effective = cfg["batch_size"] * cfg["grad_accum"]
    assert effective == 8 and start(out)["total_steps"] == math.ceil(2 * n / effective) == 4
    done = RunDir(out).read_events()[-1]
    assert (done["event"], done["step"]) == ("done", 4)


def test_both_lengths_given_one_line_says_max_steps_wins(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", str(tiny_dir), "--dataset", str(facts(tmp_path / "d.jsonl", 8)), "--output", str(out),
            "--epochs", "2", "--max-steps", "3", *QUICK]
    assert finetune_4bit.main(argv) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "--max-steps wins" in x]
    assert lines == ["note: --max-steps 3 and --epochs 2 are both given: --max-steps wins, the run stops after 3 "
                     "steps"]
    assert start(out)["total_steps"] == 3


@pytest.mark.parametrize("reply,expected", [(300, "longest"), (700, 512)])
def test_the_length_comes_from_the_data_within_the_context(reply, expected, tiny_dir, tmp_path, capsys):
    """A 300-token reply is trained whole; one longer than the model's context (512) is cut to it."""
    data = facts(tmp_path / "d.jsonl", 4, reply_chars=reply)
    longest = read_examples(load_tokenizer(str(tiny_dir)), DataConfig(source=str(data))).longest
    assert longest > reply
    out = tmp_path / "run"
    argv = ["--model", str(tiny_dir), "--dataset", str(data), "--output", str(out), "--max-steps", "1", *QUICK]
    assert finetune_4bit.main(argv) == 0
    max_len = saved(out)["data"]["max_len"]
    assert max_len == (longest if expected == "longest" else expected) and max_len >= 300
    assert (start(out)["n_truncated"] == 0) == (expected == "longest")
    if expected != "longest":
        assert "cut to the model's context" in capsys.readouterr().out


def plan_bytes(tiny_dir, seq_len: int, batch: int) -> int:
    cfg = settle(TrainConfig(model=str(tiny_dir)))[0]
    shapes = geometry(load_config(str(tiny_dir)), cfg.adapter.targets)
    return estimate(shapes, seq_len, batch, cfg.adapter, **plan_options(cfg, cuda=False, autocast=False)).total_bytes


def fits(tiny_dir, free: int, seq_len: int, batch: int) -> bool:
    return plan_bytes(tiny_dir, seq_len, batch) <= free


def test_a_run_that_cannot_fit_is_refused_before_loading(tiny_dir, tmp_path, monkeypatch, capsys):
    free = plan_bytes(tiny_dir, 256, 8)  # 8 x 256 tokens fit, 8 x 512 do not
    monkeypatch.setattr(measure, "free_bytes", lambda device: free)
    loaded = []
    monkeypatch.setattr("qmor.training.loop.load_for_training", lambda *a, **k: loaded.append(a))
    runs = tmp_path / "runs"
    runs.mkdir()
    argv = ["--model", str(tiny_dir), "--dataset", str(facts(tmp_path / "d.jsonl", 4)), "--output", str(runs / "r"),
            "--batch-size", "8", "--max-len", "512", *QUICK]
    assert finetune_4bit.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: 8 x 512 tokens does not fit: the planner predicts "), err
    length, batch = (int(x) for x in (err.split("what fits: --max-len ")[1].split()[0],
                                      err.split("or --batch-size ")[1].split()[0]))
    assert f"--max-len {length} at --batch-size 8 or --batch-size {batch} at --max-len 512" in err
    assert fits(tiny_dir, free, length, 8) and not fits(tiny_dir, free, length + 8, 8)  # the longest that fits
    assert fits(tiny_dir, free, 512, batch) and not fits(tiny_dir, free, 512, batch + 1)  # the largest batch
    assert not loaded and list(runs.iterdir()) == []


def test_an_unset_batch_and_length_are_chosen_to_fit(tiny_dir, tmp_path, monkeypatch, capsys):
    data = facts(tmp_path / "d.jsonl", 4, reply_chars=300)
    longest = read_examples(load_tokenizer(str(tiny_dir)), DataConfig(source=str(data))).longest
    # 2 sequences of the longest example fit, 4 do not: micro-batches of 2, accumulated 4 times
    free = plan_bytes(tiny_dir, longest, 2)
    monkeypatch.setattr(measure, "free_bytes", lambda device: free)
    out = tmp_path / "run"
    argv = ["--model", str(tiny_dir), "--dataset", str(data), "--output", str(out), "--max-steps", "1", *QUICK]
    assert finetune_4bit.main(argv) == 0
    cfg = saved(out)
    assert (cfg["batch_size"], cfg["grad_accum"], cfg["data"]["max_len"]) == (2, 4, longest)
    # not even one sequence of the longest example fits: the length left unset is cut to what fits at batch 1
    free = plan_bytes(tiny_dir, 200, 1)
    monkeypatch.setattr(measure, "free_bytes", lambda device: free)
    out = tmp_path / "cut"
    argv = ["--model", str(tiny_dir), "--dataset", str(data), "--output", str(out), "--max-steps", "1", *QUICK]
    assert finetune_4bit.main(argv) == 0
    cfg = saved(out)
    assert (cfg["batch_size"], cfg["grad_accum"]) == (1, 8)
    assert 200 <= cfg["data"]["max_len"] < longest and fits(tiny_dir, free, cfg["data"]["max_len"], 1)
    assert "planner (the longest that fits" in capsys.readouterr().out


def test_a_batch_given_is_the_batch_of_each_step(tiny_dir):
    """Accumulation makes up 8 sequences per step only around a micro-batch qmor chose; a --batch-size given is the
    batch of each step, as in transformers and TRL."""
    def decided(*argv):
        cfg, settings = settle(cli_config("--model", str(tiny_dir), *argv))
        shapes = geometry(load_config(str(tiny_dir)), cfg.adapter.targets)
        room = Room(shapes, plan_options(cfg, cuda=False, autocast=False), None, "in RAM")  # free memory unknown
        out = fit(cfg, settings, 100, 512, room, world=1)
        return out.batch_size, out.grad_accum

    assert decided("--batch-size", "2") == (2, 1)
    assert decided("--batch-size", "2", "--grad-accum", "3") == (2, 3)
    assert decided() == (1, 8)  # unknown free memory: micro-batches of 1, accumulated to 8
