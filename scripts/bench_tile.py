"""Sequence tiling on one decoder layer of Llama-3.1-8B's width: its measured peak memory against the planner's
layer phase, tiled and untiled, and the speed of tiled against untiled.

The layer (hidden 4096, MLP 14336, 32 heads of which 8 key/value heads) is built straight into NF4 with random
weights, LoRA r=32 on its seven linears, in bf16 under autocast (qmor's GPU path; the adapters stay fp32) with
SDPA. A step is what the planner's layer phase is: with the layer checkpointed, its forward keeps only its input;
backward gets the output's gradient, recomputes the layer and differentiates it.
Memory: each (length, variant) in a fresh process, the peak resident set size during backward above the size just
before it (glibc's mmap threshold fixed at 64 KiB, so freed tensors leave the RSS), against the layer phase of
`qmor.plan.estimate(..., device="cpu")`. Speed: both variants resident in one process, their steps taken in turn
(who goes first alternates), median over rounds of the per-round time ratio.

    python scripts/bench_tile.py --seqs 4096 8192 16384 --speed-seq 2048 --out docs/bench_tile_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
if __package__ in (None, ""):  # run from a checkout: its own qmor comes first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_runner import TARGETS, Memory, build_random_4bit, llama_config, preload, rss_bytes  # noqa: E402

WIDTH = (1, 4096, 14336, 32, 8, 256)  # (layers, hidden, intermediate, heads, kv heads, vocab): one 8B layer
RANK = 32
GIB = 1024**3


def build(tile: int):
    """The adapted, checkpointed one-layer model, tiled in tiles of `tile` tokens (0: untiled)."""
    from qmor.adapters.attach import attach
    from qmor.adapters.config import AdapterConfig
    from qmor.model.tile import tile as tile_model
    from qmor.training.loss import enable_checkpointing

    torch.manual_seed(0)
    model = build_random_4bit(llama_config(*WIDTH), "cpu", torch.bfloat16)
    attach(model, AdapterConfig(family="lora", r=RANK, alpha=2 * RANK, targets=TARGETS))
    enable_checkpointing(model)
    model.train()
    if tile:
        tile_model(model, tile)
    return model


def layer_inputs(model, seq: int):
    x = torch.randn(1, seq, WIDTH[1], dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(seq)[None]
    rotary = model.model.rotary_emb(x, positions)
    return x, {"position_embeddings": rotary, "position_ids": positions, "attention_mask": None}


def step(model, seq: int, memory: Memory | None = None) -> int:
    """One checkpointed forward and backward of the layer; with `memory`, the peak during backward above the
    resident size just before it."""
    x, kwargs = layer_inputs(model, seq)
    layer = model.model.layers[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, **kwargs)
    if memory is not None:
        memory.reset()
        before = rss_bytes()
    y.backward(torch.randn_like(y))  # the incoming gradient counts: in a model, the next layer's backward made it
    for p in model.parameters():
        p.grad = None
    return rss_bytes("VmHWM") - before if memory is not None else 0


def planned(seq: int, tile: int) -> int:
    from qmor.adapters.config import AdapterConfig
    from qmor.plan import estimate

    cfg = AdapterConfig(family="lora", r=RANK, alpha=2 * RANK, targets=TARGETS)
    plan = estimate(llama_config(*WIDTH), seq, 1, cfg, param_dtype_bytes=2, tile=tile, device="cpu")
    return plan.phases["layer"]


def measure_one(seq: int, tile: int) -> dict:
    preload()
    import qmor.model.tile  # noqa: F401  (imported before the baseline size is read)

    memory = Memory("cpu")
    model = build(tile)
    step(model, 64)  # first-call allocations (autocast's weight casts, kernels) happen before the mark
    peak = step(model, seq, memory)
    plan = planned(seq, tile)
    return {"seq": seq, "tile": tile, "measured": peak, "planned": plan, "measured_over_planned": peak / plan}


def memory_table(seqs: list[int], tile: int, threads: int) -> list[dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    rows = []
    for seq in seqs:
        for t in (0, tile):
            out = subprocess.run([sys.executable, __file__, "--one", str(seq), str(t)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(f"{seq:>6} tokens, {'tiled ' + str(t) if t else 'untiled':>11}: measured "
                  f"{row['measured'] / GIB:.2f} GiB, planned {row['planned'] / GIB:.2f} GiB, measured / planned "
                  f"{row['measured_over_planned']:.2f}", flush=True)
    return rows


def speed(seq: int, tiles: list[int], rounds: int) -> list[dict]:
    """Both variants resident; per round each takes one step, the order alternating; median time ratios."""
    models = {t: build(t) for t in [0, *tiles]}
    for model in models.values():
        step(model, seq)  # warm-up
    times: dict[int, list[float]] = {t: [] for t in models}
    order = list(models)
    for r in range(rounds):
        for t in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            step(models[t], seq)
            times[t].append(time.perf_counter() - start)
    rows = []
    for t in tiles:
        ratio = statistics.median(a / b for a, b in zip(times[t], times[0], strict=True))
        rows.append({"seq": seq, "tile": t, "untiled_s": statistics.median(times[0]),
                     "tiled_s": statistics.median(times[t]), "time_ratio": ratio})
        print(f"{seq} tokens, tiles of {t}: {statistics.median(times[t]):.2f} s against untiled "
              f"{statistics.median(times[0]):.2f} s, tiled / untiled time {ratio:.3f} (median of {rounds})",
              flush=True)
    return rows


def plot(result: dict, path: str) -> None:
    """Measured and planned layer-phase memory against length, untiled and tiled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for tile, colour in ((0, "tab:red"), (max(r["tile"] for r in result["memory"]), "tab:blue")):
        rows = sorted((r for r in result["memory"] if r["tile"] == tile), key=lambda r: r["seq"])
        label = f"tiles of {tile}" if tile else "untiled"
        ax.plot([r["seq"] for r in rows], [r["measured"] / GIB for r in rows], "o-", color=colour,
                label=f"{label}: measured")
        ax.plot([r["seq"] for r in rows], [r["planned"] / GIB for r in rows], "x--", color=colour,
                label=f"{label}: planned")
    ax.set_xlabel("tokens")
    ax.set_ylabel("layer phase (GiB)")
    ax.set_title("one Llama-3.1-8B-width layer, LoRA r32, bf16 (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="*", default=[4096, 8192, 16384], help="lengths for the memory table")
    p.add_argument("--tile", type=int, default=None, help="tile tokens (default: training's, qmor.model.tile.TILE)")
    p.add_argument("--speed-seq", type=int, default=2048, help="length of the speed comparison (0: none)")
    p.add_argument("--speed-tiles", type=int, nargs="*", default=[512], help="tile sizes timed against untiled")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--plot", help="draw the memory table into this PNG (with --replot: from that JSON, no runs)")
    p.add_argument("--replot", help="a JSON this script wrote: only draw --plot from it")
    p.add_argument("--one", type=int, nargs=2, help=argparse.SUPPRESS)  # (seq, tile): one measurement, one process
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(*args.one)))
        return 0
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), args.plot)
        return 0
    from qmor.model.tile import TILE

    torch.set_num_threads(args.threads)
    tile = args.tile or TILE
    result = {"command": "python scripts/bench_tile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.machine()}, {args.threads} thread(s), torch {torch.__version__}",
              "memory": memory_table(args.seqs, tile, args.threads)}
    if args.speed_seq:
        result["speed"] = speed(args.speed_seq, args.speed_tiles, args.rounds)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
