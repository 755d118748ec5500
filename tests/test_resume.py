"""Stop and resume: 10 steps straight equal 5 steps + stop + resume + 5 steps, losses and adapter weights; a
finished run is left as it is, or given more steps or epochs on a schedule recomputed for the new total."""

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qmor import cli
from qmor.adapters.config import AdapterConfig
from qmor.data.pipeline import DataConfig
from qmor.training.config import TrainConfig
from qmor.training.loop import resume, train
from qmor.training.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QMOR_CACHE", str(tmp_path / "cache"))


def config(tiny_dir, out, family, init) -> TrainConfig:
    return TrainConfig(model=str(tiny_dir), output=str(out), max_steps=10, batch_size=4, grad_accum=2, lr=5e-3,
                       log_steps=1, save_steps=3, keep_checkpoints=2, eval_generate=0, device="cpu",
                       adapter=AdapterConfig(family=family, r=4, dropout=0.1, init=init),
                       data=DataConfig(source="uuid", num_examples=12, max_len=80, val_size=2))


def losses(run) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in RunDir(run).read_events() if e["event"] == "train"}


@pytest.mark.parametrize("family,init", [("lora", "default"), ("sira", "loftq")])
def test_stop_and_resume_equals_a_straight_run(family, init, tiny_dir, tmp_path):
    straight = train(config(tiny_dir, tmp_path / "straight", family, init))
    assert straight["step"] == 10 and not straight["stopped"]

    def interrupt(step, model):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does; handled at the end of this step

    stopped = train(config(tiny_dir, tmp_path / "split", family, init), on_step=interrupt)
    assert stopped["stopped"] and stopped["step"] == 5 and stopped["signal"] == signal.SIGINT
    assert [p.name for p in RunDir(tmp_path / "split").checkpoint_dirs()] == ["step-000003", "step-000005"]
    assert RunDir(tmp_path / "split").read_events()[-1]["event"] == "stopped"
    assert not (tmp_path / "split" / "adapter").exists()

    resumed = resume(tmp_path / "split")  # the run's own config.json rules
    assert resumed["step"] == 10 and not resumed["stopped"]
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in range(1, 11):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    wa = load_file(str(tmp_path / "straight" / "adapter" / "adapter.safetensors"))
    wb = load_file(str(tmp_path / "split" / "adapter" / "adapter.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)
    # the last step is kept as well, so the finished run can be given more steps
    assert [p.name for p in RunDir(tmp_path / "split").checkpoint_dirs()] == ["step-000009", "step-000010"]


def test_resume_without_checkpoint_is_a_clear_error(tiny_dir, tmp_path):
    from qmor.errors import QmorError

    with pytest.raises(QmorError, match="no checkpoint"):
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "config.json").write_text("{}")
        resume(tmp_path / "run")


def test_sigterm_leaves_a_resumable_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "QMOR_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, str(ROOT / "scripts" / "finetune_4bit.py"), "--model", str(tiny_dir), "--output",
           str(out), "--init", "default", "--family", "lora", "--max-steps", "100000", "--batch-size", "2",
           "--num-examples", "8", "--max-len", "80", "--log-steps", "1", "--save-steps", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not any(e["event"] == "train" for e in RunDir(out).read_events()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        said, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    last = RunDir(out).read_events()[-1]
    assert last["event"] == "stopped" and Path(last["checkpoint"]).is_dir()
    assert f"continue with: qmor train --resume --output {shlex.quote(str(out))}" in said
    assert RunDir(out).checkpoint_dirs()[-1].name == f"step-{last['step']:06d}"
    assert {"adapter", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"} <= {
        p.name for p in RunDir(out).checkpoint_dirs()[-1].iterdir()}


def lrs(run) -> dict[int, float]:
    return {e["step"]: e["lr"] for e in RunDir(run).read_events() if e["event"] == "train"}


def cosine(step: int, total: int, peak: float = 5e-3) -> float:
    """The learning rate of step `step` (1-based) of a `total`-step run: no warmup at 5% of up to 12 steps."""
    return peak * 0.5 * (1 + math.cos(math.pi * (step - 1) / total))


def test_a_finished_run_is_left_alone_or_trained_further(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = config(tiny_dir, out, "lora", "default")
    cfg.max_steps = 4
    assert train(cfg)["step"] == 4
    weights = (out / "adapter" / "adapter.safetensors").read_bytes()
    events = RunDir(out).read_events()
    capsys.readouterr()

    # --resume alone: one line, exit 0, nothing trained again
    assert cli.main(["train", "--resume", "--output", str(out)]) == 0
    said = capsys.readouterr()
    assert said.out.strip().splitlines()[-1] == (f"{out} is finished at step 4 of 4; to train it further pass "
                                                 "--max-steps M (more than 4) or --epochs E with --resume")
    assert RunDir(out).read_events() == events
    assert (out / "adapter" / "adapter.safetensors").read_bytes() == weights

    # a length that does not go beyond the last step is refused in one line, before anything is written
    assert cli.main(["train", "--resume", "--output", str(out), "--max-steps", "4"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {out} is at step 4 and the new length is 4 steps; pass --max-steps above 4 (or more --epochs) with "
        "--resume to train it further")
    assert RunDir(out).read_events() == events

    # --max-steps extends it: the cosine schedule is recomputed over 8 steps and followed from step 4 on; other
    # flags are still named as ignored
    assert cli.main(["train", "--resume", "--output", str(out), "--max-steps", "8", "--lr", "1"]) == 0
    err = capsys.readouterr().err
    assert "--lr will not apply" in err and "--max-steps" not in err
    assert json.loads((out / "config.json").read_text())["max_steps"] == 8
    assert RunDir(out).finished_step() == 8
    got = lrs(out)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 5):
        assert got[step] == pytest.approx(cosine(step, 4), abs=1e-12), step
    for step in range(5, 9):
        assert got[step] == pytest.approx(cosine(step, 8), abs=1e-12), step
    assert (out / "adapter" / "adapter.safetensors").read_bytes() != weights

    # --epochs alone: the epochs decide (10 sequences, 8 a step: 6 epochs are 8 steps, 7.2 epochs are 9)
    assert resume(out, epochs=7.2)["step"] == 9
    saved = json.loads((out / "config.json").read_text())
    assert (saved["max_steps"], saved["epochs"]) == (0, 7.2)
    assert RunDir(out).finished_step() == 9


def test_an_extended_run_stopped_again_resumes_to_its_new_length(tiny_dir, tmp_path):
    out = tmp_path / "run"
    cfg = config(tiny_dir, out, "lora", "default")
    cfg.max_steps = 2
    train(cfg)

    def interrupt(step, model):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    assert resume(out, max_steps=5, on_step=interrupt)["stopped"]
    assert RunDir(out).finished_step() is None  # the adapter/ of step 2 is there, but the run goes on
    done = resume(out)
    assert done["step"] == 5 and not done["stopped"] and RunDir(out).finished_step() == 5
    assert sorted(losses(out)) == list(range(1, 6))
