"""Training memory and speed, qmor against peft LoRA on the same bitsandbytes 4-bit model.

The runners (scripts/bench_runner.py) get the same model, rank, targets (every linear), batch, non-reentrant
activation checkpointing and optimizer; qmor computes the loss in chunks through the head
(qmor.training.loss.ChunkedLoss), the baseline is `prepare_model_for_kbit_training` + `get_peft_model` with the
model's own loss. The model is a random NF4 Llama of a named geometry (`--model llama31-8b`, built layer by layer
straight into NF4) or a real model (`--model smollm2`, a folder).

Memory: every runner in a process of its own, so one runner's peak cannot leak into the next (CUDA: peak
`max_memory_allocated` / `max_memory_reserved` under a 24 GiB cap, and the longest sequence found by probing from
the planner's prediction; CPU: the peak resident set size above the process's size before the model was built).
Speed on the CPU: every runner resident in one process, their steps taken in turn, the median over `--steps`
steps after `--warmup`; ratios are medians of the step-time ratios of the same round, so machine load hits every
runner alike. On CUDA, where a step's time does not depend on the neighbours, each runner is timed in its own
process.

    python scripts/bench_train.py                                   # CUDA: 8B geometry, 512/2048/8192 + longest
    python scripts/bench_train.py --device cpu                      # CPU: small geometry
    python scripts/bench_train.py --device cpu --model smollm2 --runners peft-lora lora --seqs 256 --batch 2
    python scripts/bench_train.py --quick                           # CPU smoke test, a few seconds per runner

On a GPU with little time, split the runners over calls and collect them with --merge:

    python scripts/bench_train.py --runners peft-lora lora moslora mora --no-longest
    python scripts/bench_train.py --runners mor sira lora+offload --no-longest --merge
    python scripts/bench_train.py --runners peft-lora lora lora+offload --seqs --merge   # longest only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_runner import BASELINE, GEOMETRIES  # noqa: E402

RUNNER = Path(__file__).resolve().parent / "bench_runner.py"

RUNNERS = [BASELINE, "lora", "moslora", "mora", "mor", "sira", "lora+offload"]


def spawn(spec: dict) -> dict:
    """bench_runner in a fresh Python process; its last stdout line is the JSON result."""
    # glibc keeps freed blocks below its (self-raising, up to 32 MiB) mmap threshold in the heap, so peak RSS
    # would count dead activations; a fixed 64 KiB threshold returns every tensor's pages when it is freed
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, str(RUNNER), json.dumps(spec)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{spec.get('runner') or ', '.join(spec['runners'])} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def environment(device: str) -> dict:
    from importlib.metadata import version

    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")] if cpuinfo.exists() else []
        name = f"{models[0] if models else platform.machine()}, {os.cpu_count()} cores"
    return {"device": name, "torch": torch.__version__, "transformers": version("transformers"),
            "bitsandbytes": version("bitsandbytes"), "peft": version("peft"),
            "command": "python scripts/bench_train.py " + " ".join(sys.argv[1:])}


def merge(old: dict, new: dict) -> dict:
    """New rows replace old ones of the same runner and length; the rest of the old file stays."""
    keys = {(r["runner"], r["seq"]) for r in new["results"]}
    results = [r for r in old.get("results", []) if (r["runner"], r["seq"]) not in keys] + new["results"]
    return {"results": results, "longest": {**old.get("longest", {}), **new["longest"]},
            "runners": {**old.get("runners", {}), **new["runners"]},
            "environment": new["environment"],
            "commands": list(dict.fromkeys([*old.get("commands", []), new["environment"]["command"]]))}


def speed_ratio(r: dict, other: dict) -> float:
    """r's tokens/s over other's: the median of their step-time ratios round by round when both were timed in one
    interleaved run, else the ratio of their medians."""
    if r.get("interleaved") and other.get("interleaved"):
        return statistics.median(b / a for a, b in zip(r["step_seconds"], other["step_seconds"], strict=True))
    return r["tokens_per_s"] / other["tokens_per_s"]


def table(results: list[dict], runners: list[str]) -> str:
    """Memory and speed against the baseline, and speed against qmor's LoRA, for every length measured. On CUDA
    the peak is the reserved memory (what runs out), with the allocated peak beside it."""
    by = {(r["runner"], r["seq"]): r for r in results}
    cuda = any("peak_allocated" in r for r in results)
    extra = " allocated MiB | allocated / baseline |" if cuda else ""
    rows = [f"| runner | seq | peak MiB | peak / baseline |{extra} tokens/s | tokens/s / baseline | tokens/s / lora |",
            "|---" * (7 + 2 * cuda) + "|"]

    def ratio(r: dict, other: dict | None, key: str) -> str:
        if other is None or other["oom"] or key not in r or key not in other:
            return "-"
        return f"{speed_ratio(r, other) if key == 'tokens_per_s' else r[key] / other[key]:.2f}"

    for seq in sorted({r["seq"] for r in results}):
        base, lora = by.get((BASELINE, seq)), by.get(("lora", seq))
        for runner in runners:
            r = by.get((runner, seq))
            if r is None:
                continue
            if r["oom"]:
                rows.append(f"| {runner} | {seq} | OOM |" + " |" * (4 + 2 * cuda))
                continue
            allocated = (f" {r['peak_allocated'] / 2**20:,.0f} | {ratio(r, base, 'peak_allocated')} |"
                         if cuda else "")
            speed = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
            rows.append(f"| {runner} | {seq} | {r['peak'] / 2**20:,.0f} | {ratio(r, base, 'peak')} |{allocated} "
                        f"{speed} | {ratio(r, base, 'tokens_per_s')} | {ratio(r, lora, 'tokens_per_s')} |")
    return "\n".join(rows)


def longest_table(longest: dict, runners: list[str]) -> str:
    base = longest.get(BASELINE)
    rows = ["| runner | tokens | / baseline | planner's guess |", "|---|---|---|---|"]
    for runner in runners:
        if runner in longest:
            n, guess = longest[runner]["tokens"], longest[runner]["guess"]
            shown = f"at least {n:,} (the search's limit)" if n >= longest[runner]["limit"] else f"{n:,}"
            rel = f"{n / base['tokens']:.2f}" if base and base["tokens"] else "-"
            rows.append(f"| {runner} | {shown} | {rel} | {guess:,} |")
    return "\n".join(rows)


def plot(results: list[dict], runners: list[str], path: Path, title: str) -> None:
    """Peak memory against sequence length, and beside it each runner's tokens/s over the baseline's per length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, speed) = plt.subplots(1, 2, figsize=(12, 4.5))
    by = {(r["runner"], r["seq"]): r for r in results if not r["oom"]}
    seqs = sorted({seq for _, seq in by})
    width = 0.8 / max(len(runners), 1)
    for i, runner in enumerate(runners):
        pts = sorted((seq, r["peak"] / 2**20) for (name, seq), r in by.items() if name == runner)
        if pts:
            mem.plot(*zip(*pts, strict=True), marker="o", linestyle="--" if runner == BASELINE else "-", label=runner)
        bars = [(j, speed_ratio(by[runner, seq], by[BASELINE, seq])) for j, seq in enumerate(seqs)
                if (runner, seq) in by and (BASELINE, seq) in by and "tokens_per_s" in by[runner, seq]]
        if bars:
            speed.bar([j + (i - len(runners) / 2 + 0.5) * width for j, _ in bars], [v for _, v in bars], width,
                      label=runner)
    mem.set_xscale("log", base=2)
    mem.set_xlabel("sequence length (tokens)")
    mem.set_ylabel("peak memory (MiB)")
    mem.set_title(title)
    mem.grid(alpha=0.3)
    mem.legend()
    speed.axhline(1.0, color="grey", linewidth=0.8)
    speed.set_xticks(range(len(seqs)), [str(s) for s in seqs])
    speed.set_xlabel("sequence length (tokens)")
    speed.set_ylabel(f"tokens/s / {BASELINE}")
    speed.set_title("speed against the baseline (above 1: faster)")
    speed.grid(alpha=0.3, axis="y")
    speed.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--model", default=None,
                   help=f"a random geometry ({', '.join(GEOMETRIES)}) or a real model (smollm2, a folder); default "
                   "llama31-8b on CUDA, small on the CPU")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: tiny model, baseline and lora, 64 tokens")
    p.add_argument("--runners", nargs="+", default=RUNNERS,
                   help=f"{BASELINE}, qmor families, or a family with +offload")
    p.add_argument("--seqs", type=int, nargs="*", default=None, help="sequence lengths (none: longest only)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--optimizer", default=None, choices=["adamw", "paged-adamw-8bit"],
                   help="both sides' optimizer (default: paged-adamw-8bit on CUDA, as qmor trains there; adamw on "
                   "the CPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--threads", type=int, default=0, help="CPU threads per runner process (0: torch's default)")
    p.add_argument("--cap-gb", type=float, default=None, help="memory cap in GiB (CUDA default 24, CPU 1)")
    p.add_argument("--no-longest", action="store_true", help="skip the search for the longest sequence")
    p.add_argument("--longest-step", type=int, default=None, help="granularity of that search (CUDA 1024, CPU 256)")
    p.add_argument("--workers", type=int, default=1,
                   help="memory runners at once (CPU; memory stays exact; speed is always measured alone)")
    p.add_argument("--merge", action="store_true", help="add to the results already in --out instead of replacing")
    p.add_argument("--out", default="docs", help="folder for bench_train_<device>[_<model>].json / .md / .png")
    return p.parse_args(argv)


def measure(base: dict, runners: list[str], workers: int) -> list[dict]:
    """Every runner's memory in a process of its own; on the CPU the speed of all of them from one interleaved
    process afterwards, alone on the machine."""
    interleave = base["device"] == "cpu" and bool(base["seqs"])
    alone = {"warmup": 2, "steps": 0} if interleave else {}  # speed comes from the interleaved run
    with ThreadPoolExecutor(workers) as pool:
        done = list(pool.map(spawn, [{**base, **alone, "runner": r} for r in runners]))
    if interleave:
        speed = spawn({**base, "runners": runners})["speed"]
        for d in done:
            for row in d["results"]:
                s = speed[str(row["seq"])][d["runner"]]
                row.update(tokens_per_s=s["tokens_per_s"], step_seconds=s["step_seconds"], interleaved=True)
    return done


def main(argv=None) -> int:
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cuda = device == "cuda"
    runners, seqs, warmup, steps = args.runners, args.seqs, args.warmup, args.steps
    if args.quick:
        device, cuda, runners, warmup, steps = "cpu", False, [BASELINE, "lora"], 1, 2
        seqs = [64] if seqs is None else seqs
    seqs = ([512, 2048, 8192] if cuda else [64, 128, 256, 512]) if seqs is None else seqs
    cap_gb = args.cap_gb or (24.0 if cuda else 1.0)
    model = args.model or ("llama31-8b" if cuda else "tiny" if args.quick else "small")
    step = args.longest_step or (1024 if cuda else 256)
    base = {"device": device, "batch": args.batch, "rank": args.rank, "checkpointing": True,
            "loss_chunk": args.loss_chunk, "optimizer": args.optimizer or ("paged-adamw-8bit" if cuda else "adamw"),
            "threads": args.threads,
            "warmup": warmup, "steps": steps, "cap_gb": cap_gb, "seqs": seqs,
            **({"geometry": GEOMETRIES[model]} if model in GEOMETRIES else {"model": model}),
            "longest": None if args.quick or args.no_longest else {"step": step, "limit": 1 << 17 if cuda else 1 << 14}}
    done = measure(base, runners, 1 if cuda else 2 if args.quick else args.workers)
    new = {"results": [{**row, "trainable": d["trainable"]} for d in done for row in d["results"]],
           "longest": {d["runner"]: {"tokens": d["longest"], "guess": d["longest_guess"], "probes": d["probes"],
                                 "limit": base["longest"]["limit"]}
                       for d in done if "longest" in d},
           "runners": {d["runner"]: {"trainable": d["trainable"], "settled": d["settled"], "allocator": d["allocator"]}
                       for d in done},
           "environment": environment(device)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    named = f"_{Path(args.model).name}" if args.model else ""  # a model chosen by name keeps its own results file
    name = f"bench_train_{device}{named}{'_quick' if args.quick else ''}"
    path = out / f"{name}.json"
    data = merge(json.loads(path.read_text()), new) if args.merge and path.exists() else \
        {**new, "commands": [new["environment"]["command"]]}
    shown = list(dict.fromkeys(r for r in RUNNERS + sorted(data["runners"]) if r in data["runners"]))
    env = data["environment"]
    what = f"geometry (layers, hidden, mlp, heads, kv heads, vocab) {tuple(base['geometry'])}" \
        if "geometry" in base else f"model {model}"
    threads = f", {args.threads} thread(s) per process" if args.threads else ""
    report = [f"{env['device']}{threads}; {what}; batch {args.batch}, rank {args.rank}, {base['optimizer']}; "
              f"torch {env['torch']}, transformers {env['transformers']}, bitsandbytes {env['bitsandbytes']}, "
              f"peft {env['peft']}", "",
              *(f"    {c}" for c in data["commands"]), "", table(data["results"], shown)]
    if data["longest"]:
        report += ["", f"longest sequence that trains under {cap_gb:g} GiB (multiples of {step}):", "",
                   longest_table(data["longest"], shown)]
    text = "\n".join(report)
    print(text)
    path.write_text(json.dumps(data, indent=1) + "\n")
    (out / f"{name}.md").write_text(text + "\n")
    plot(data["results"], shown, out / f"{name}.png", f"training peak memory, {env['device']}, rank {args.rank}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
