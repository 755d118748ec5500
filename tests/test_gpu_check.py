"""The GPU check runs every stage's code path on the CPU at toy sizes, and its offline wheels are sound."""

import hashlib
import json
import subprocess
import sys
import zipfile
from base64 import urlsafe_b64encode
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402
import gpu_stages  # noqa: E402
import gpu_wheels  # noqa: E402


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "check.jsonl"
    # time enough for every search on a loaded machine: the budget's cut is tested on its own below
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--budget", "3600", "--out", str(out)], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, [json.loads(line) for line in out.read_text().splitlines()], proc.stdout


def by(records, stage):
    return [r for r in records if r["stage"] == stage]


def test_every_cuda_path_runs_and_passes_its_own_check(toy_run):
    _, records, _ = toy_run
    paths = {r["check"]: r for r in by(records, "paths")}
    families = ["lora", "moslora", "mora", "mor", "sira"]
    assert [f"train {f}" for f in families] == [k for k in paths if k.startswith("train")]
    failed = [r["line"] for r in paths.values() if not r["ok"] and r["check"] != "time"]
    assert not failed
    for f in families:
        losses = paths[f"train {f}"]["losses"]
        assert len(losses) == 10 and losses[-1] < losses[0]
        assert paths[f"reload {f}"]["max_abs_diff"] == 0.0  # saved then loaded: the same logits, bit for bit
    assert paths["export lora"]["top1"] == 1.0 and paths["loftq lora"]["relative_gap"] <= 0.01
    assert paths["cli"]["returncode"] == 0


def test_geometry_and_longest_stand_beside_the_planner(toy_run):
    _, records, _ = toy_run
    geometry = {r["runner"]: r for r in by(records, "geometry")}
    assert list(geometry) == ["peft-lora", "lora", "mora", "moslora"]
    for r in geometry.values():
        assert r["ok"] and r["peak"] > 0 and r["tokens_per_s"] > 0 and r["planned_bytes"] > 0
        assert r["measured_over_planned"] == pytest.approx(r["peak"] / r["planned_bytes"])
    # same rank and targets: peft's LoRA and qmor's train the same number of parameters
    assert geometry["peft-lora"]["trainable"] == geometry["lora"]["trainable"]
    longest = {r["runner"]: r for r in by(records, "longest")}
    assert list(longest) == ["peft-lora", "lora", "lora+offload"]
    for r in longest.values():
        assert r["ok"] and r["tokens"] > 0 and r["planned"] > 0 and r["probes"][str(r["tokens"])] is True


def test_the_run_ends_with_targets_and_a_report(toy_run):
    out, records, stdout = toy_run
    env = records[0]
    assert env["stage"] == "environment" and env["versions"]["torch"] and env["tiny"] is True
    assert {t["what"] for t in by(records, "targets")} == {
        "peak memory at 64 tokens", "tokens/s at 64 tokens", "longest context, lora", "longest context, lora+offload"}
    assert records[-1]["stage"] == "done"
    report = out.with_suffix(".md").read_text()
    assert "| lora | 64 |" in report and "| train lora |" in report and "| longest context, lora |" in report
    assert "[paths] train lora: loss" in stdout  # each result is printed as it comes


def test_a_search_cut_short_reports_what_it_bracketed():
    assert gpu_stages.bracket({}) == (0, None)  # no time for a single probe: nothing is claimed
    assert gpu_stages.bracket({4096: True, 8192: False, 6144: True, 7168: False}) == (6144, 7168)
    assert gpu_stages.bracket({4096: True, 5120: True}) == (5120, None)
    assert gpu_stages.bracket({4096: False}) == (0, 4096)


def test_a_stage_that_dies_leaves_a_record_and_the_next_stage_runs(tmp_path, monkeypatch):
    out = tmp_path / "check.jsonl"
    args = gpu_check.parse_args(["--device", "cpu", "--tiny", "--out", str(out)])
    monkeypatch.setattr(gpu_check, "__file__", str(tmp_path / "missing.py"))  # the stage's process cannot start
    gpu_check.run_stage(args, "paths", 0.0)
    record = json.loads(out.read_text())
    assert record["stage"] == "paths" and record["ok"] is False and record["returncode"] != 0


def test_versions_outside_the_declared_range_are_one_line_each(monkeypatch):
    changed = {"torch": "2.1.0", "datasets": None}
    monkeypatch.setattr(gpu_check, "version", lambda name: changed[name] if name in changed else version(name))
    problems = gpu_check.range_problems()
    assert any(p.startswith("torch 2.1.0 is outside qmor's range") for p in problems)
    assert "datasets is not installed (qmor needs datasets>=3.0)" in problems
    assert all("\n" not in p for p in problems)


def test_without_wheels_a_missing_package_is_one_line_naming_the_prepare_step(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "range_problems", lambda: ["bitsandbytes is not installed (qmor needs ...)"])
    monkeypatch.setattr(gpu_wheels, "WHEELS", tmp_path)
    monkeypatch.delenv("QMOR_GPU_INSTALLED", raising=False)
    with pytest.raises(SystemExit) as e:
        gpu_check.install_and_restart()
    assert "bitsandbytes not installed" in str(e.value) and "--prepare" in str(e.value)


def fake_wheel(folder: Path, name: str, libraries: list[str]) -> Path:
    """A wheel as pip builds them: package files, METADATA, WHEEL and a RECORD of them all."""
    files = {f"{name}/__init__.py": b"VERSION = '1.0'\n", **{f"{name}/{lib}": lib.encode() * 100 for lib in libraries},
             f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{name}-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\n"
                                            b"Tag: py3-none-any\n"}
    record = "".join(f"{n},sha256={urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}\n"
                     for n, d in files.items()) + f"{name}-1.0.dist-info/RECORD,,\n"
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr(f"{name}-1.0.dist-info/RECORD", record)
    return path


def test_slimmed_bitsandbytes_keeps_one_cuda_major_and_still_installs(tmp_path):
    libs = ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda128.so", "libbitsandbytes_cuda130.so",
            "libbitsandbytes_cuda132.so", "libbitsandbytes_rocm72.so", "libbitsandbytes_xpu2026.so"]
    wheel = gpu_wheels.slim_bitsandbytes(fake_wheel(tmp_path, "bnbfake", libs), "13")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record = z.read("bnbfake-1.0.dist-info/RECORD").decode().splitlines()
        for line in record[:-1]:  # every kept file's hash and size match what the wheel holds
            name, digest, size = line.rsplit(",", 2)
            data = z.read(name)
            assert digest == "sha256=" + urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert int(size) == len(data)
    kept = {n.rsplit("/", 1)[-1] for n in names if n.endswith(".so")}
    assert kept == {"libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so"}
    assert len(record) == len(names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
                    str(wheel)], check=True)
    assert (target / "bnbfake" / "libbitsandbytes_cuda130.so").is_file()
    assert not (target / "bnbfake" / "libbitsandbytes_cuda128.so").exists()


def test_only_wheels_of_missing_packages_are_installed(tmp_path):
    present = fake_wheel(tmp_path, "pytest", [])  # installed here: the image's copy must stay
    missing = fake_wheel(tmp_path, "surely_not_installed_pkg", [])
    assert gpu_wheels.missing_wheels(tmp_path) == [missing]
    assert gpu_wheels.dist_name(present) == "pytest"
