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


sys.path.insert(0, str(ROOT / "scripts"))

from bench_runner import search  # noqa: E402
from bench_train import merge  # noqa: E402


def test_search_finds_the_boundary_from_any_guess_and_few_probes_from_a_good_one():
    boundary, step, limit = 37 * 256, 256, 1 << 16
    for guess in (256, 20 * 256, 36 * 256, 37 * 256, 38 * 256, 200 * 256, limit):
        probes = []

        def fits(n, probes=probes):
            probes.append(n)
            return n <= boundary

        assert search(fits, guess, step, limit) == boundary
        assert all(n % step == 0 and 0 < n <= limit for n in probes)
        if abs(guess - boundary) <= step:
            assert len(probes) <= 4  # the planner's guess is usually this close: the search stays cheap
    assert search(lambda n: False, 4096, 256, limit) == 0
    assert search(lambda n: True, 4096, 256, limit) == limit


def test_merge_keeps_other_runners_and_replaces_the_same_ones():
    env = {"command": "python scripts/bench_train.py"}
    old = {"results": [{"runner": "lora", "seq": 512, "peak": 1}, {"runner": "mora", "seq": 512, "peak": 2}],
           "longest": {"lora": {"tokens": 1}}, "runners": {"lora": {}, "mora": {}}, "environment": env,
           "commands": ["first"]}
    new = {"results": [{"runner": "lora", "seq": 512, "peak": 3}], "longest": {"sira": {"tokens": 5}},
           "runners": {"lora": {}, "sira": {}}, "environment": env}
    merged = merge(old, new)
    assert sorted((r["runner"], r["peak"]) for r in merged["results"]) == [("lora", 3), ("mora", 2)]
    assert merged["longest"] == {"lora": {"tokens": 1}, "sira": {"tokens": 5}}
    assert set(merged["runners"]) == {"lora", "mora", "sira"} and merged["commands"] == ["first", env["command"]]


def test_longest_search_stops_at_the_memory_cap():
    from bench_train import GEOMETRIES, spawn

    spec = {"device": "cpu", "geometry": GEOMETRIES["tiny"], "batch": 1, "rank": 16, "checkpointing": True,
            "loss_chunk": 1024, "warmup": 0, "steps": 1, "cap_gb": 1.0, "runner": "lora", "longest": None}
    # the CPU peak counts whatever the libraries load on first use, which differs between installs: place the cap
    # between two measured peaks instead of at a fixed size
    peaks = {r["seq"]: r["peak"] for r in spawn({**spec, "seqs": [256, 2048]})["results"]}
    run = spawn({**spec, "cap_gb": (peaks[256] + peaks[2048]) / 2 / 1024**3, "seqs": [],
                 "longest": {"step": 256, "limit": 1 << 13}})
    n, probes = run["longest"], run["probes"]
    assert 256 <= n < 2048 and n % 256 == 0
    assert probes[str(n)] is True and probes[str(n + 256)] is False  # the boundary itself was measured


def test_cuda_table_shows_reserved_and_allocated_ratios_and_oom():
    from bench_train import table

    rows = [{"runner": "peft-lora", "seq": 512, "oom": False, "peak": 4 << 30, "peak_allocated": 2 << 30,
             "tokens_per_s": 100.0},
            {"runner": "lora", "seq": 512, "oom": False, "peak": 3 << 30, "peak_allocated": 1 << 30,
             "tokens_per_s": 110.0},
            {"runner": "mora", "seq": 512, "oom": True}]
    lines = table(rows, ["peft-lora", "lora", "mora"]).splitlines()
    assert all(line.count("|") == 10 for line in lines)  # nine columns in every row, the OOM row too
    assert lines[3] == "| lora | 512 | 3,072 | 0.75 | 1,024 | 0.50 | 110 | 1.10 | 1.00 |"
    assert lines[4].startswith("| mora | 512 | OOM |")


def test_interleaved_runners_share_one_process_and_pair_their_steps():
    """Speed ratios on a shared machine come from steps taken in turn: every runner gets the same number of timed
    steps, and its ratio is the median of its step times over the first runner's in the same round."""
    from bench_train import GEOMETRIES, spawn, speed_ratio

    spec = {"device": "cpu", "geometry": GEOMETRIES["tiny"], "batch": 1, "rank": 8, "checkpointing": True,
            "loss_chunk": 1024, "warmup": 1, "steps": 3, "seqs": [32], "runners": ["peft-lora", "lora"]}
    speed = spawn(spec)["speed"]["32"]
    assert set(speed) == {"peft-lora", "lora"}
    for r in speed.values():
        assert len(r["step_seconds"]) == 3 and r["tokens_per_s"] > 0
    assert speed["peft-lora"]["time_ratio"] == 1.0
    rows = {name: {"interleaved": True, **r} for name, r in speed.items()}
    paired = speed_ratio(rows["lora"], rows["peft-lora"])
    expected = sorted(b / a for a, b in zip(rows["lora"]["step_seconds"], rows["peft-lora"]["step_seconds"],
                                            strict=True))[1]
    assert paired == expected
    # timed apart (a GPU's runners, each in its own process), the ratio is that of the medians
    apart = {k: {**v, "interleaved": False} for k, v in rows.items()}
    assert speed_ratio(apart["lora"], apart["peft-lora"]) == rows["lora"]["tokens_per_s"] / rows["peft-lora"][
        "tokens_per_s"]
