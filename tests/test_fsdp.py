"""FSDP2 through accelerate's config (examples/accelerate/fsdp.yaml): two CPU processes (gloo) shard a tiny 4-bit
Llama whose codes sit in bf16 and train with the single-process losses, step for step; the adapter and the
checkpoint they write are whole, and a run resumed under FSDP from that checkpoint takes the same last step."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qmor.errors import QmorError
from qmor.training.fsdp import check
from qmor.training.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "finetune_4bit.py")
COMMON = ["--model", "tiny", "--dataset", "uuid", "--num-examples", "16", "--family", "lora", "--rank", "4",
          "--dropout", "0", "--max-steps", "3", "--lr", "1e-2", "--log-steps", "1", "--eval-generate", "0",
          "--device", "cpu", "--quant-storage", "bfloat16", "--max-len", "80", "--val-size", "0"]


def env(tmp_path):
    return {**os.environ, "QMOR_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def launch(tmp_path, *args):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "examples" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "--main_process_port",
           str(29600 + os.getpid() % 1000), SCRIPT, *COMMON, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(run):
    return [e["loss"] for e in RunDir(run).read_events() if e["event"] == "train"]


def test_fsdp_matches_single_process_training_and_saves_the_whole_adapter(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    # the same four examples a step: one process with 4, or two processes with 2 each
    proc = subprocess.run([sys.executable, SCRIPT, *COMMON, "--batch-size", "4", "--output", str(single)],
                          capture_output=True, text=True, env=env(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = launch(tmp_path, "--batch-size", "2", "--save-steps", "2", "--output", str(sharded))
    assert "FSDP: 4 decoder layers and the rest of the model sharded over 2 processes" in proc.stderr + proc.stdout

    expected, got = losses(single), losses(sharded)
    assert len(got) == 3 and len(set(got)) == 3
    assert got == pytest.approx(expected, abs=1e-5)
    reference, adapter = (load_file(str(run / "adapter" / "adapter.safetensors")) for run in (single, sharded))
    assert adapter.keys() == reference.keys()
    for key, value in reference.items():  # whole tensors, not one process's shard
        assert adapter[key].shape == value.shape
        assert torch.allclose(adapter[key], value, atol=1e-5), key

    # the checkpoint holds the whole optimizer state too, in the single-process layout
    step2 = RunDir(sharded).checkpoint(2)
    optimizer = torch.load(step2 / "optimizer.pt", weights_only=True)
    shapes = sorted(tuple(v.shape) for v in reference.values())
    assert sorted(tuple(s["exp_avg"].shape) for s in optimizer["state"].values()) == shapes

    resumed = tmp_path / "resumed"
    shutil.copytree(sharded, resumed)
    # as if it had stopped after step 2 (a finished run keeps its last step's checkpoint, and is not trained again)
    shutil.rmtree(resumed / "adapter")
    shutil.rmtree(RunDir(resumed).checkpoint(3))
    launch(tmp_path, "--resume", "--output", str(resumed))
    events = RunDir(resumed).read_events()  # appended to: the resumed part starts at the last start
    again = [e for e in events[max(i for i, e in enumerate(events) if e["event"] == "start"):] if e["event"] == "train"]
    assert [e["step"] for e in again] == [3] and again[0]["loss"] == pytest.approx(got[2], abs=1e-5)
    final = load_file(str(resumed / "adapter" / "adapter.safetensors"))
    assert all(torch.allclose(final[k], adapter[k], atol=1e-5) for k in adapter)
    assert json.loads((resumed / "config.json").read_text())["quant"]["storage"] == "bfloat16"


def test_fsdp_without_a_float_quant_storage_is_one_line(tmp_path):
    cli = [a for a in COMMON if a not in ("--quant-storage", "bfloat16")]
    proc = subprocess.run([sys.executable, SCRIPT, *cli, "--output", str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=600,
                          env={**env(tmp_path), "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: FSDP shards float tensors only, and the 4-bit codes are stored as uint8; add --quant-storage "
        "bfloat16 (the same codes in a bf16 container)")
    assert not (tmp_path / "run").exists()


def test_fsdp1_and_a_single_process_are_refused(monkeypatch):
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(QmorError, match="set fsdp_version: 2"):
        check("bfloat16", 2)
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(QmorError, match="--num_processes N"):
        check("bfloat16", 1)
    check("bfloat16", 2)
