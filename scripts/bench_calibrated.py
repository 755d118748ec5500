"""Peak memory and wall time of the calibrated init (`--init calibrated`), on the CPU.

- a layer of 8B geometry (hidden 4096, 8 KV heads of 128, MLP 14336): each of its seven linears initialised on its
  own from a synthetic weight (decaying spectrum, outlier columns) and the Gram matrix of synthetic inputs; the
  init streams one linear at a time, so the largest of these peaks bounds the whole model's per-layer peak;
- --model smollm2 (a folder, a Hub id): the whole model's init through `calibrated.initialise`, calibrated on the
  first --samples paragraphs of Python's documentation (the experiments' training text).

Peak memory is the resident set's high-water mark above the size before the init, reset before each measurement
(Linux's /proc/self/clear_refs).

    python scripts/bench_calibrated.py                       # 8B layer, a few minutes on one core
    python scripts/bench_calibrated.py --model smollm2       # the whole SmolLM2-135M init
    python scripts/bench_calibrated.py --quick               # smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_loftq import realistic

from qmor.adapters import build_adapter
from qmor.adapters.config import AdapterConfig
from qmor.config import QuantConfig
from qmor.model import calibrated

GEOMETRY = {"hidden": 4096, "kv": 1024, "mlp": 14336}
QUICK = {"hidden": 256, "kv": 64, "mlp": 704}


def rss_peak() -> int:
    """The high-water mark of the resident set, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")
    return rss_now()


def inputs_gram(d_in: int, tokens: int, seed: int) -> torch.Tensor:
    """H = XᵀX / n of inputs whose features have heavy-tailed scales (a few large ones, as LLM activations do)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.distributions.Pareto(1.0, 2.0).sample((d_in,)).clamp(max=50.0)
    X = torch.randn(tokens, d_in, generator=g) * scales
    return X.T @ X / tokens


def layer_rows(dims: dict, args) -> list[dict]:
    h, kv, mlp = dims["hidden"], dims["kv"], dims["mlp"]
    linears = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, mlp),
               "up_proj": (h, mlp), "down_proj": (mlp, h)}
    cfg = AdapterConfig(family=args.family, r=args.rank, loftq_iters=args.iters, init="calibrated")
    rows = []
    for i, (name, (d_in, d_out)) in enumerate(linears.items()):
        W, H = realistic(d_out, d_in, seed=i), inputs_gram(d_in, args.tokens, seed=i)
        adapter = build_adapter(cfg, d_in, d_out)
        before = reset_peak()
        start = time.time()
        _, errors = calibrated.calibrated_layer(W, H, adapter, args.family, QuantConfig(), args.iters)
        wall = time.time() - start
        rows.append({"linear": name, "shape": f"{d_out}x{d_in}", "wall_s": wall,
                     "peak_above_start_gib": (rss_peak() - before) / 2**30,
                     "held_gib": (W.numel() + H.numel()) * 4 / 2**30, **errors})
        print(json.dumps(rows[-1]))
        del W, H, adapter
    return rows


def model_rows(args) -> list[dict]:
    from pydoc_data.topics import topics

    import loftq_real  # the experiments' prose: Python's own documentation

    from qmor.model.base import Base
    from qmor.model.load import attach, load_4bit

    base = Base.resolve(args.model)
    tokenizer = base.tokenizer()
    texts = loftq_real.paragraphs([n for i, n in enumerate(sorted(topics)) if i % 4])[: args.samples]
    sequences = [torch.tensor(tokenizer(t)["input_ids"][:64]) for t in texts]
    model = load_4bit(base, QuantConfig(), "cpu")
    cfg = AdapterConfig(family=args.family, r=args.rank, loftq_iters=args.iters, init="calibrated")
    attach(model, cfg)
    before = reset_peak()
    start = time.time()
    errors = calibrated.initialise(model, base.weight_files, QuantConfig(), cfg, sequences)
    row = {"model": args.model, "linears": len(errors), "sequences": len(sequences),
           "tokens": sum(len(s) for s in sequences), "wall_s": time.time() - start,
           "peak_above_start_gib": (rss_peak() - before) / 2**30, "model_rss_gib": before / 2**30}
    print(json.dumps(row))
    return [row]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="measure a whole model's init instead of one 8B-geometry layer")
    p.add_argument("--family", default="lora")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--iters", type=int, default=1, help="alternations T")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens behind each Gram matrix")
    p.add_argument("--samples", type=int, default=128, help="--model: calibration sequences")
    p.add_argument("--quick", action="store_true", help="a small layer, seconds")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = model_rows(args) if args.model else layer_rows(QUICK if args.quick else GEOMETRY, args)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
