"""Data parallel: two CPU processes under torchrun (gloo) train and keep identical adapter weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

from qmor.training.run_dir import RunDir

WORKER = """
import hashlib, json, os, sys
from qmor.adapters.attach import adapter_state
from qmor.adapters.config import AdapterConfig
from qmor.data.pipeline import DataConfig
from qmor.training.loop import train
from qmor.training.config import TrainConfig

rank = int(os.environ["RANK"])
out = sys.argv[2]

def record(step, model):
    state = adapter_state(model)
    digest = hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()
    with open(f"{out}.rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "hash": digest}) + "\\n")

cfg = TrainConfig(model=sys.argv[1], output=out, max_steps=3, batch_size=2, lr=1e-2, log_steps=1, save_steps=2,
                  eval_generate=0, device="cpu", adapter=AdapterConfig(family="lora", r=4, dropout=0.1),
                  data=DataConfig(source="uuid", num_examples=8, max_len=80))
train(cfg, on_step=record)
"""


def test_two_processes_agree_on_the_adapter_after_every_step(tiny_dir, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "run"
    env = {**os.environ, "QMOR_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29500 + os.getpid() % 1000), str(script), str(tiny_dir), str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hashes = [[json.loads(x) for x in Path(f"{out}.rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [h["step"] for h in hashes[0]] == [1, 2, 3]
    assert hashes[0] == hashes[1]  # the gradients were averaged: both replicas took the same steps
    assert len({h["hash"] for h in hashes[0]}) == 3  # and the weights really changed every step
    events = RunDir(out).read_events()  # one log, written by rank 0 only
    assert [e["event"] for e in events].count("start") == 1 and events[-1]["event"] == "done"
    assert (out / "checkpoints" / "step-000002" / "rng.pt").is_file()
