"""The training benchmark runs end to end on the CPU (tiny model, baseline and qmor, fresh processes)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_runs_and_reports_both_sides(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "bench_train_cpu_quick.json").read_text())["results"]
    runners = {r["runner"] for r in results}
    assert runners == {"peft-lora", "lora"}
    for r in results:
        assert not r["oom"] and r["peak"] > 0 and r["tokens_per_s"] > 0 and r["trainable"] > 0
    by = {r["runner"]: r for r in results}
    # same rank and targets on both sides: peft's LoRA and qmor's LoRA train the same number of parameters
    assert by["lora"]["trainable"] == by["peft-lora"]["trainable"]
    assert "| lora | 64 |" in out.stdout and (tmp_path / "bench_train_cpu_quick.png").stat().st_size > 1000
