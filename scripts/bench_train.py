"""Training memory and speed, qmor against peft LoRA on the same bitsandbytes 4-bit model, side by side.

Every runner (scripts/bench_runner.py) works in its own process, so one runner's peak cannot leak into the next:
the same random NF4 model, rank, targets (every linear), batch and non-reentrant activation checkpointing, AdamW.
qmor computes the loss in chunks through the head (qmor.training.loss.ChunkedLoss); the baseline is
`prepare_model_for_kbit_training` + `get_peft_model` with the model's own loss. On CUDA: Llama-2-7B geometry built
layer by layer straight into NF4, bf16 autocast, peak `max_memory_allocated` / `max_memory_reserved` under a
24 GiB cap, and the longest sequence found by probing from the planner's prediction. On the CPU: a small geometry
and the peak resident set size above the process's size before the model was built.

    python scripts/bench_train.py                 # CUDA: 7B geometry, 512/2048/8192 + longest under 24 GiB
    python scripts/bench_train.py --device cpu    # CPU: small geometry, peak RSS
    python scripts/bench_train.py --quick         # CPU smoke test, a few seconds per runner

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
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_runner import BASELINE  # noqa: E402

RUNNER = Path(__file__).resolve().parent / "bench_runner.py"

RUNNERS = [BASELINE, "lora", "moslora", "mora", "mor", "sira", "lora+offload"]
GEOMETRIES = {  # (layers, hidden, intermediate, heads, vocab)
    "llama2-7b": (32, 4096, 11008, 32, 32000),
    "small": (2, 256, 688, 4, 32000),
    "tiny": (2, 128, 344, 4, 2048),
}


def spawn(spec: dict) -> dict:
    """bench_runner.run in a fresh Python process; its last stdout line is the JSON result."""
    # glibc keeps freed blocks below its (self-raising, up to 32 MiB) mmap threshold in the heap, so peak RSS
    # would count dead activations; a fixed 64 KiB threshold returns every tensor's pages when it is freed
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, str(RUNNER), json.dumps(spec)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{spec['runner']} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def environment(device: str) -> dict:
    import bitsandbytes
    import peft
    import transformers

    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")] if cpuinfo.exists() else []
        name = f"{models[0] if models else platform.machine()}, {os.cpu_count()} cores"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "bitsandbytes": bitsandbytes.__version__, "peft": peft.__version__,
            "command": "python scripts/bench_train.py " + " ".join(sys.argv[1:])}


def merge(old: dict, new: dict) -> dict:
    """New rows replace old ones of the same runner and length; the rest of the old file stays."""
    keys = {(r["runner"], r["seq"]) for r in new["results"]}
    results = [r for r in old.get("results", []) if (r["runner"], r["seq"]) not in keys] + new["results"]
    return {"results": results, "longest": {**old.get("longest", {}), **new["longest"]},
            "runners": {**old.get("runners", {}), **new["runners"]},
            "environment": new["environment"],
            "commands": list(dict.fromkeys([*old.get("commands", []), new["environment"]["command"]]))}


def table(results: list[dict], runners: list[str]) -> str:
    """Memory and speed against the baseline, and speed against qmor's LoRA, for every length measured. On CUDA
    the peak is the reserved memory (what runs out), with the allocated peak beside it."""
    by = {(r["runner"], r["seq"]): r for r in results}
    cuda = any("peak_allocated" in r for r in results)
    extra = " allocated MiB | allocated / baseline |" if cuda else ""
    rows = [f"| runner | seq | peak MiB | peak / baseline |{extra} tokens/s | tokens/s / baseline | tokens/s / lora |",
            "|---" * (7 + 2 * cuda) + "|"]

    def ratio(r: dict, other: dict | None, key: str) -> str:
        return f"{r[key] / other[key]:.2f}" if other is not None and not other["oom"] else "-"

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
            rows.append(f"| {runner} | {seq} | {r['peak'] / 2**20:,.0f} | {ratio(r, base, 'peak')} |{allocated} "
                        f"{r['tokens_per_s']:,.0f} | {ratio(r, base, 'tokens_per_s')} "
                        f"| {ratio(r, lora, 'tokens_per_s')} |")
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for runner in runners:
        pts = sorted((r["seq"], r["peak"] / 2**20) for r in results if r["runner"] == runner and not r["oom"])
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", linestyle="--" if runner == BASELINE else "-", label=runner)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("peak memory (MiB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="CPU smoke test: tiny model, baseline and lora, 64 tokens")
    p.add_argument("--runners", nargs="+", default=RUNNERS,
                   help=f"{BASELINE}, qmor families, or a family with +offload")
    p.add_argument("--seqs", type=int, nargs="*", default=None, help="sequence lengths (none: longest only)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--cap-gb", type=float, default=None, help="memory cap in GiB (CUDA default 24, CPU 1)")
    p.add_argument("--no-longest", action="store_true", help="skip the search for the longest sequence")
    p.add_argument("--longest-step", type=int, default=None, help="granularity of that search (CUDA 1024, CPU 256)")
    p.add_argument("--workers", type=int, default=1, help="runners at once (CPU; memory stays exact)")
    p.add_argument("--merge", action="store_true", help="add to the results already in --out instead of replacing")
    p.add_argument("--out", default="docs", help="folder for bench_train_<device>.json / .md / .png")
    return p.parse_args(argv)


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
    geometry = "llama2-7b" if cuda else "tiny" if args.quick else "small"
    step = args.longest_step or (1024 if cuda else 256)
    base = {"device": device, "geometry": GEOMETRIES[geometry], "batch": args.batch, "rank": args.rank,
            "checkpointing": True, "loss_chunk": args.loss_chunk, "warmup": warmup, "steps": steps,
            "cap_gb": cap_gb, "seqs": seqs,
            "longest": None if args.quick or args.no_longest else {"step": step, "limit": 1 << 17 if cuda else 1 << 14}}
    with ThreadPoolExecutor(1 if cuda else 2 if args.quick else args.workers) as pool:
        done = list(pool.map(spawn, [{**base, "runner": r} for r in runners]))
    new = {"results": [{**row, "trainable": d["trainable"]} for d in done for row in d["results"]],
           "longest": {d["runner"]: {"tokens": d["longest"], "guess": d["longest_guess"], "probes": d["probes"],
                                 "limit": base["longest"]["limit"]}
                       for d in done if "longest" in d},
           "runners": {d["runner"]: {"trainable": d["trainable"], "settled": d["settled"], "allocator": d["allocator"]}
                       for d in done},
           "environment": environment(device)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"bench_train_{device}{'_quick' if args.quick else ''}"
    path = out / f"{name}.json"
    data = merge(json.loads(path.read_text()), new) if args.merge and path.exists() else \
        {**new, "commands": [new["environment"]["command"]]}
    shown = list(dict.fromkeys(r for r in RUNNERS + sorted(data["runners"]) if r in data["runners"]))
    env = data["environment"]
    report = [f"{env['device']}; geometry (layers, hidden, mlp, heads, vocab) {base['geometry']}; "
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
