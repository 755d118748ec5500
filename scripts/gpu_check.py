"""One prepared check of qmor on a CUDA GPU: do its CUDA paths work, and what do an 8B model's memory, speed and
longest context come to against peft?

The stages run in order, each in a process of its own; every result prints a line and is appended to --out as a
JSON record the moment it is known, so a run stopped at any point keeps what it measured:
1. environment: the GPU, the library versions, qmor's version ranges against what is installed;
2. paths (at most 90 s): every adapter family trains 10 steps of the tiny model on CUDA (bf16 compute, paged 8-bit
   AdamW) and its loss falls; save then load gives identical logits; a merged export passes its own check; LoftQ
   on CUDA reaches the CPU init's error within 1%; the CLI's default run with --device cuda exits 0;
3. geometry: the Llama-3.1-8B shape (random weights, built layer by layer straight into NF4 on the GPU), batch 1,
   2048 tokens, rank 16 on every linear, checkpointing, paged 8-bit AdamW for both: peft + bitsandbytes, then
   qmor's LoRA, MoRA and MoSLoRA, in one process: peak allocated and reserved memory, median tokens/s over 10
   steps after 3 warm-up steps;
4. longest: the longest sequence whose full training step fits a 24 GiB card, bisected to 1024 tokens: peft,
   qmor, and qmor with offloaded activations, sharing the time left of --budget.
Every measured memory figure and length stands beside the planner's (qmor.plan) with their ratio; the last record
sets qmor's LoRA against peft's and the targets (peak at most 0.8x, tokens/s at least 1x, longest at least 2x).

    python scripts/gpu_check.py --prepare                   # networked machine: the wheels the GPU lacks -> .whl/
    python scripts/gpu_check.py --out gpu_check.jsonl       # the GPU machine (installs .whl/ when packages miss)
    python scripts/gpu_check.py --device cpu --tiny         # every stage at toy sizes on the CPU (the tests run it)
    python scripts/gpu_check.py --report gpu_check.jsonl    # the results as Markdown tables
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's qmor, as the other scripts run it

import gpu_wheels  # noqa: E402
from gpu_stages import STAGES, emit, run  # noqa: E402  (torch only: the image has it before anything is installed)

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = ["torch", "transformers", "bitsandbytes", "peft", "accelerate", "datasets", "safetensors", "tokenizers",
            "huggingface_hub", "triton"]
TARGETS = {"peak": 0.8, "speed": 1.0, "longest": 2.0}  # qmor LoRA / peft: at most, at least, at least
GIB = 1024**3


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def range_problems() -> list[str]:
    """One line for each of qmor's dependencies that is missing or outside the range pyproject.toml declares."""
    from packaging.requirements import Requirement

    problems = []
    for text in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(text)
        have = version(req.name)
        if have is None:
            problems.append(f"{req.name} is not installed (qmor needs {req.name}{req.specifier})")
        elif not req.specifier.contains(have, prereleases=True):
            problems.append(f"{req.name} {have} is outside qmor's range {req.specifier} (pyproject.toml; "
                            "docs/dependencies.md says what was checked)")
    return problems


def environment(args: argparse.Namespace) -> dict:
    """The record that heads a run: what ran where, and what is off in the installed versions."""
    import torch

    versions = {name: version(name) for name in VERSIONS}
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        where = {"device": props.name, "memory_bytes": props.total_memory, "capability": f"{props.major}.{props.minor}",
                 "bf16": torch.cuda.is_bf16_supported(), "cuda": torch.version.cuda}
        about = (f"{props.name} ({props.total_memory / GIB:.1f} GiB, sm {props.major}.{props.minor}, "
                 f"{'bf16' if where['bf16'] else 'no bf16'}), CUDA {torch.version.cuda}")
    else:
        where = {"device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
        about = where["device"]
    problems = range_problems()
    installed = os.environ.get("QMOR_GPU_INSTALLED", "")
    line = (f"{about}; Python {platform.python_version()}; "
            + ", ".join(f"{k} {v}" for k, v in versions.items() if v)
            + (f"; installed from .whl/: {installed}" if installed else ""))
    return {"line": line, **where, "python": platform.python_version(), "versions": versions,
            "problems": problems, "installed": installed.split(", ") if installed else [],
            "command": "python scripts/gpu_check.py " + " ".join(sys.argv[1:]), "tiny": args.tiny}


def install_and_restart() -> None:
    """Missing packages come from .whl/ into their own folder, then this command starts again with it on the path."""
    missing = [p.split(" ")[0] for p in range_problems() if " is not installed" in p]
    if not missing or os.environ.get("QMOR_GPU_INSTALLED") is not None:
        return
    if not any(gpu_wheels.WHEELS.glob("*.whl")):
        sys.exit(f"error: {', '.join(missing)} not installed and no wheels in .whl/; run `python scripts/gpu_check.py "
                 "--prepare` on a machine with network first and bring .whl/ along (docs/gpu.md)")
    print(f"installing {', '.join(missing)} and qmor from .whl/ into {gpu_wheels.SITE} (no network, no deps)",
          flush=True)
    names = gpu_wheels.install()
    path = os.pathsep.join(filter(None, [str(gpu_wheels.SITE), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "QMOR_GPU_INSTALLED": ", ".join(names)}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def run_stage(args: argparse.Namespace, stage: str, deadline: float) -> None:
    """One stage in a fresh process, so a crash, a CUDA error or a fragmented allocator stays in its stage."""
    cmd = [sys.executable, __file__, "--stage", stage, "--device", args.device, "--out", str(args.out),
           "--deadline", str(deadline), *(["--tiny"] if args.tiny else [])]
    # growable segments, as qmor's training sets them; one setting for both sides, peft's included
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", **os.environ, "TOKENIZERS_PARALLELISM": "false"}
    code = subprocess.run(cmd, env=env).returncode
    if code != 0:
        emit(args.out, stage, f"the {stage} stage ended with exit code {code}; its records so far are kept",
             ok=False, returncode=code)


def latest_run(records: list[dict]) -> list[dict]:
    """The records of the last run in a file that may hold several (each starts with its environment record)."""
    starts = [i for i, r in enumerate(records) if r["stage"] == "environment"]
    return records[starts[-1]:] if starts else records


def find(records: list[dict], stage: str, runner: str) -> dict | None:
    return next((r for r in records if r["stage"] == stage and r.get("runner") == runner and r.get("ok")), None)


def targets(records: list[dict]) -> list[tuple[str, float, str, bool]]:
    """(what, qmor LoRA / peft, goal, met) for each target whose figures were measured."""
    out = []
    peft, lora = find(records, "geometry", "peft-lora"), find(records, "geometry", "lora")
    if peft and lora:
        key = "peak_reserved" if "peak_reserved" in lora else "peak"
        ratio = lora[key] / peft[key]
        out.append((f"peak memory at {lora['seq']} tokens", ratio, f"at most {TARGETS['peak']}",
                    ratio <= TARGETS["peak"]))
        ratio = lora["tokens_per_s"] / peft["tokens_per_s"]
        out.append((f"tokens/s at {lora['seq']} tokens", ratio, f"at least {TARGETS['speed']}",
                    ratio >= TARGETS["speed"]))
    base = find(records, "longest", "peft-lora")
    for name in ("lora", "lora+offload"):
        mine = find(records, "longest", name)
        if base and mine and base["tokens"]:
            ratio = mine["tokens"] / base["tokens"]
            out.append((f"longest context, {name}", ratio, f"at least {TARGETS['longest']}",
                        ratio >= TARGETS["longest"]))
    return out


def relative(r: dict, base: dict | None, key: str) -> str:
    return f"{r[key] / base[key]:.2f}" if base else "-"


def report(records: list[dict]) -> str:
    """The run's records as Markdown: environment, paths, the 8B comparison, the longest context, the targets."""
    records = latest_run(records)
    env = records[0] if records and records[0]["stage"] == "environment" else {}
    lines = [f"{env.get('line', '')}", "", f"    {env.get('command', '')}", ""]
    lines += [f"- version note: {p}" for p in env.get("problems", [])]
    lines += ["", "| CUDA path | result | ok |", "|---|---|---|"]
    lines += [f"| {r.get('check', '')} | {r['line'].split(': ', 1)[-1]} | {'yes' if r.get('ok') else '**no**'} |"
              for r in records if r["stage"] == "paths"]
    rows = [r for r in records if r["stage"] == "geometry"]
    peft = find(records, "geometry", "peft-lora")
    lines += ["", "| runner | seq | peak allocated GiB | peak reserved GiB | reserved / peft | tokens/s | "
              "tokens/s / peft | planner GiB | measured / planned |", "|---" * 9 + "|"]
    for r in rows:
        if not r.get("ok"):
            lines.append(f"| {r.get('runner', r.get('check'))} | {r.get('seq', '')} | {r['line']} |" + " |" * 6)
            continue
        key = "peak_reserved" if "peak_reserved" in r else "peak"
        lines.append(f"| {r['runner']} | {r['seq']} | {r.get('peak_allocated', r['peak']) / GIB:.2f} | "
                     f"{r[key] / GIB:.2f} | {relative(r, peft, key)} | {r['tokens_per_s']:,.0f} | "
                     f"{relative(r, peft, 'tokens_per_s')} | {r['planned_bytes'] / GIB:.2f} | "
                     f"{r['measured_over_planned']:.2f} |")
    base = find(records, "longest", "peft-lora")
    lines += ["", "| runner | longest that fits 24 GiB | / peft | planner | measured / planned | probes |",
              "|---|---|---|---|---|---|"]
    for r in (r for r in records if r["stage"] == "longest"):
        if not r.get("ok"):
            lines.append(f"| {r.get('check', '')} | {r['line']} | | | | |")
            continue
        tokens = f"{r['tokens']:,}" if r["complete"] else f"at least {r['tokens']:,} (time ran out)"
        rel = f"{r['tokens'] / base['tokens']:.2f}" if base and base["tokens"] else "-"
        lines.append(f"| {r['runner']} | {tokens} | {rel} | {r['planned']:,} | {r['measured_over_planned']:.2f} | "
                     f"{len(r['probes'])} |")
    lines += ["", "| target (qmor LoRA / peft) | measured | goal | met |", "|---|---|---|---|"]
    lines += [f"| {what} | {ratio:.2f} | {goal} | {'yes' if met else '**no**'} |"
              for what, ratio, goal, met in targets(records)]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--prepare", action="store_true", help="download the wheels the GPU machine lacks into .whl/")
    p.add_argument("--python", default="3.12", help="--prepare: the GPU machine's Python version")
    p.add_argument("--cuda", default="13", help="--prepare: the CUDA major whose bitsandbytes library is kept")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="toy sizes: every stage's code path in about a minute")
    p.add_argument("--out", type=Path, default=Path("gpu_check.jsonl"), help="JSON lines, appended as results come")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check; the longest-context "
                   "searches share what the earlier stages leave")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--report", type=Path, help="print the Markdown tables of a results file and stop")
    p.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)  # one stage, in its own process
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        print(report([json.loads(line) for line in args.report.read_text().splitlines() if line.strip()]))
        return 0
    if args.prepare:
        wheels = gpu_wheels.fetch(python=args.python, cuda_major=args.cuda)
        print("\n".join(f"{w.stat().st_size / 2**20:6.1f} MiB  {w.name}" for w in wheels))
        print(f"{len(wheels)} wheels in {gpu_wheels.WHEELS}; the tree that travels, wheels included: "
              f"{gpu_wheels.tree_size() / 2**20:.1f} MiB (at most 64 MiB)")
        return 0
    if args.stage:
        run(args.stage, args.device, args.tiny, args.out, args.deadline)
        return 0
    install_and_restart()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU is visible to torch here; pass --device cpu --tiny for the toy run")
    start = time.time()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = environment(args)
    emit(args.out, "environment", env.pop("line"), **env)
    for problem in env["problems"]:
        print(f"[environment] note: {problem}", flush=True)
    for stage in args.stages:
        run_stage(args, stage, start + args.budget)
    records = latest_run([json.loads(line) for line in args.out.read_text().splitlines() if line.strip()])
    for what, ratio, goal, met in targets(records):
        emit(args.out, "targets", f"{what}: qmor LoRA / peft {ratio:.2f} (goal {goal}): {'met' if met else 'MISSED'}",
             what=what, ratio=ratio, goal=goal, met=met)
    emit(args.out, "done", f"{time.time() - start:.0f} s in all", seconds=time.time() - start)
    args.out.with_suffix(".md").write_text(report(records) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
