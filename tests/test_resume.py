"""Stop and resume: 10 steps straight equal 5 steps + stop + resume + 5 steps, losses and adapter weights."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qmor.config import AdapterConfig
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
    assert [p.name for p in RunDir(tmp_path / "split").checkpoint_dirs()] == ["step-000006", "step-000009"]


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
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    last = RunDir(out).read_events()[-1]
    assert last["event"] == "stopped" and Path(last["checkpoint"]).is_dir()
    assert RunDir(out).checkpoint_dirs()[-1].name == f"step-{last['step']:06d}"
    assert {"adapter", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"} <= {
        p.name for p in RunDir(out).checkpoint_dirs()[-1].iterdir()}
