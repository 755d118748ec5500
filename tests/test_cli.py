"""scripts/finetune_4bit.py end to end on a tiny model: every family, config files, flags, bad input."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qmor.adapters.attach import read_meta
from qmor.training.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import finetune_4bit  # noqa: E402

FAST = ["--max-steps", "3", "--batch-size", "4", "--num-examples", "8", "--max-len", "80", "--eval-generate", "2",
        "--log-steps", "1", "--init", "default", "--device", "cpu"]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QMOR_CACHE", str(tmp_path_factory.getbasetemp() / "qmor-cache"))


@pytest.mark.parametrize("family", ["lora", "moslora", "mora", "mor", "sira"])
def test_every_family_trains_and_writes_the_run_folder(family, tiny_dir, tmp_path):
    out = tmp_path / "run"
    assert finetune_4bit.main(["--model", str(tiny_dir), "--family", family, "--rank", "4", "--output", str(out),
                               *FAST]) == 0
    assert {"adapter", "config.json", "metrics.jsonl", "loss.png"} <= {p.name for p in out.iterdir()}
    events = RunDir(out).read_events()
    assert [e["event"] for e in events] == ["start", "train", "train", "train", "checkpoint", "done"]
    assert events[0]["total_steps"] == 3 and events[0]["family"] == family
    assert (events[0]["optimizer"], events[0]["mixed_precision"]) == ("AdamW", "no")  # what runs on a CPU
    assert all({"time", "step", "loss", "lr", "tokens_per_s", "eta_s", "epoch"} <= set(e) for e in events[1:4])
    assert 0 <= events[-1]["char_accuracy"] <= 1
    meta = read_meta(out / "adapter")
    assert meta.adapter.family == family and meta.adapter.r == 4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["adapter"]["family"] == family and cfg["max_steps"] == 3 and cfg["data"]["num_examples"] == 8


def test_config_file_is_read_and_flags_override_it(tiny_dir, tmp_path):
    conf = tmp_path / "run.yaml"
    conf.write_text(f"model: {tiny_dir}\nlr: 0.001\nmax_steps: 2\nadapter:\n  family: lora\n  r: 2\n"
                    "data:\n  num_examples: 6\n  max_len: 80\n")
    out = tmp_path / "run"
    argv = ["--config", str(conf), "--output", str(out), "--rank", "3", "--targets", "q_proj,v_proj",
            "--eval-generate", "0", "--init", "default", "--batch-size", "2", "--no-gradient-checkpointing"]
    assert finetune_4bit.main(argv) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr"] == 0.001 and cfg["max_steps"] == 2  # from the file
    assert cfg["adapter"]["r"] == 3 and cfg["adapter"]["targets"] == ["q_proj", "v_proj"]  # flags win
    assert cfg["gradient_checkpointing"] is False and cfg["data"]["num_examples"] == 6
    # a finished run's config.json starts the next run the same way
    again = tmp_path / "again"
    assert finetune_4bit.main(["--config", str(out / "config.json"), "--output", str(again)]) == 0
    assert json.loads((again / "config.json").read_text())["adapter"] == cfg["adapter"]


def test_family_options_from_flags_and_config_files(tmp_path):
    def config(*argv):
        return finetune_4bit.build_config(finetune_4bit.parser().parse_args(list(argv))).adapter

    sira = config("--family", "sira", "--experts", "3", "--top-k", "3", "--mora-kind", "rope")
    assert (sira.options.experts, sira.options.top_k) == (3, 3)  # --mora-kind is MoRA's: checked, not kept
    written = tmp_path / "sira.json"
    written.write_text(json.dumps({"adapter": {"family": "sira", "options": {"experts": 3, "top_k": 3}}}))
    assert config("--config", str(written)).options == sira.options
    # another family picked over the file's: the file's options were its family's
    assert config("--config", str(written), "--family", "mora").options.kind == "auto"
    assert config("--config", str(written), "--top-k", "2").options.top_k == 2  # a flag wins over the file


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        finetune_4bit.main(["--help"])
    text = capsys.readouterr().out
    contract = ["--config", "--model", "--dataset", "--format", "--output", "--family", "--rank", "--alpha",
                "--dropout", "--targets", "--mora-kind", "--experts", "--top-k", "--capacity-factor",
                "--expert-dropout", "--aux-loss-weight", "--init", "--loftq-iters", "--lr", "--epochs",
                "--max-steps", "--batch-size", "--grad-accum", "--max-len", "--warmup-ratio", "--weight-decay",
                "--max-grad-norm", "--val-size", "--eval-steps", "--save-steps", "--log-steps", "--packing",
                "--train-on-prompt", "--num-examples", "--seed", "--no-gradient-checkpointing",
                "--offload-activations", "--loss-chunk", "--trust-remote-code", "--resume", "--skip-bad", "--device"]
    missing = [f for f in contract if f not in text]
    assert not missing


BAD = {
    "bad_json.jsonl": ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', "line 2"),
    "missing_field.jsonl": ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', "line 2"),
    "empty.jsonl": ("", "empty.jsonl"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_data_stops_cleanly_and_writes_nothing(name, tiny_dir, tmp_path, capsys):
    text, where = BAD[name]
    data = tmp_path / name
    data.write_text(text)
    runs = tmp_path / "runs"
    runs.mkdir()
    code = finetune_4bit.main(["--model", str(tiny_dir), "--dataset", str(data), "--output", str(runs / "x"), *FAST])
    err = capsys.readouterr().err
    assert code == 2
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert line and name in line[0] and where in line[0]
    assert list(runs.iterdir()) == []  # no run folder, no temporary folder


def test_bad_flags_give_one_line_errors(tiny_dir, tmp_path, capsys):
    cases = [(["--family", "nope"], "unknown adapter family"), (["--rank", "0"], "rank"),
             (["--lr", "-1"], "lr must be positive"), (["--model", str(tmp_path / "missing")], "does not exist"),
             (["--resume"], "--resume needs --output")]
    for extra, message in cases:
        argv = ["--model", str(tiny_dir), "--output", str(tmp_path / "r"), *FAST, *extra]
        if extra == ["--resume"]:
            argv = ["--resume"]
        assert finetune_4bit.main(argv) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], err[-1]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("held", ["checkpoints/step-000001/state.json", "adapter/qmor_adapter.json", "notes.txt"])
def test_existing_run_is_not_overwritten(held, tiny_dir, tmp_path, capsys):
    """A run with a checkpoint or an adapter, or a folder holding anything a run does not write, is refused (a
    run that failed before its first checkpoint is started afresh: tests/test_bad_input.py)."""
    out = tmp_path / "run"
    (out / held).parent.mkdir(parents=True, exist_ok=True)
    (out / held).write_text("{}")
    (out / "metrics.jsonl").write_text("")
    assert finetune_4bit.main(["--model", str(tiny_dir), "--output", str(out), *FAST]) == 2
    assert "--resume" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted({held.split("/")[0], "metrics.jsonl"})


def test_default_run_loss_falls_in_a_subprocess(tmp_path):
    """The built-in default (tiny model, uuid, MoRA + LoftQ) as a real process, with fewer steps."""
    out = tmp_path / "run"
    env = {"QMOR_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "finetune_4bit.py"), "--output", str(out),
                           "--max-steps", "20", "--log-steps", "5", "--eval-generate", "2", "--num-examples", "8",
                           "--batch-size", "8"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "character accuracy" in proc.stdout + proc.stderr
    assert re.search(r"memory plan: predicted peak \d+\.\d+ GiB of \d+\.\d+ GiB available at 8 x 96 tokens",
                     proc.stdout + proc.stderr)
    losses = [e["loss"] for e in RunDir(out).read_events() if e["event"] == "train"]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0]
    assert (out / "loftq_report.json").is_file() and (out / "loss.png").stat().st_size > 0
    assert read_meta(out / "adapter").init == "loftq"
