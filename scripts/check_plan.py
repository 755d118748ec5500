"""How close is the planner? Predicted peak memory (qmor.plan.estimate) against a measured training step.

On the CPU the measurement is the peak resident set size of a fresh process above its size before the model was
built, for reduced-depth, full-width models (Llama-2-7B width with 1-2 layers and a shortened vocabulary), trained
in fp32 (the CPU compute dtype). The CPU has no CUDA context, so the plan is taken with device="cpu"; RSS also
counts heap pages that were freed but not yet returned to the system, which inflates the measured side a little.

    python scripts/check_plan.py                 # CPU, 7B width
    python scripts/check_plan.py --device cuda   # GPU: peak max_memory_reserved against the plan without context
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_runner import llama_config  # noqa: E402
from bench_train import spawn  # noqa: E402

from qmor.adapters.config import AdapterConfig  # noqa: E402
from qmor.plan import CUDA_CONTEXT, estimate  # noqa: E402

CASES = [  # (family, layers, seq, checkpointing)
    ("lora", 1, 128, True),
    ("lora", 1, 512, True),
    ("mora", 1, 512, True),
    ("lora", 1, 256, False),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--vocab", type=int, default=4096, help="shortened vocabulary (the head is a full-width matrix)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--loss-chunk", type=int, default=256)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    rows = []
    print("| family | layers | seq | checkpointing | predicted MiB | measured MiB | measured / predicted |")
    print("|---|---|---|---|---|---|---|")
    for family, layers, seq, ckpt in CASES:
        geometry = (layers, 4096, 11008, 32, 32, args.vocab)
        spec = {"device": args.device, "geometry": geometry, "batch": 1, "rank": args.rank, "checkpointing": ckpt,
                "loss_chunk": args.loss_chunk, "warmup": 1, "steps": 1, "cap_gb": 80.0, "runner": family,
                "seqs": [seq]}
        measured = spawn(spec)["results"][0]["peak"]
        cfg = AdapterConfig(family=family, r=args.rank, alpha=2 * args.rank,
                            targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        plan = estimate(llama_config(*geometry).to_dict(), seq, 1, cfg, checkpointing=ckpt,
                        loss_chunk=args.loss_chunk, param_dtype_bytes=2 if cuda else 4, device=args.device)
        predicted = plan.total_bytes - (CUDA_CONTEXT if cuda else 0)
        rows.append({"family": family, "layers": layers, "seq": seq, "checkpointing": ckpt, "predicted": predicted,
                     "measured": measured, "ratio": measured / predicted, "parts": plan.parts})
        print(f"| {family} | {layers} | {seq} | {ckpt} | {predicted / 2**20:,.0f} | {measured / 2**20:,.0f} "
              f"| {measured / predicted:.2f} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
