"""Will it fit? Predicted peak GPU memory of 4-bit + adapter training, and the longest sequence that fits.

    python scripts/plan.py --model meta-llama/Llama-2-7b-hf --seq 4096 --gpu-gb 24 --family mora --rank 16
"""

from __future__ import annotations

import argparse
import json
import sys

from qmor.config import AdapterConfig
from qmor.errors import QmorError
from qmor.plan import estimate, geometry, load_config, longest_sequence


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True,
                   help="hub id, local model folder, config.json path, or built-in tiny / smollm2")
    p.add_argument("--seq", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--gpu-gb", type=float, default=24.0, help="GPU memory in GiB")
    p.add_argument("--family", default="lora", help="adapter family: lora, moslora, mora, mor, sira")
    p.add_argument("--rank", type=int, default=16, help="adapter rank")
    p.add_argument("--experts", type=int, default=4, help="MoR / SiRA experts")
    p.add_argument("--targets", nargs="+", default=None, help="linear name suffixes (default: all linears)")
    p.add_argument("--no-checkpointing", action="store_true", help="keep every layer's activations")
    p.add_argument("--offload-activations", action="store_true", help="checkpointed activations in CPU RAM")
    p.add_argument("--loss-chunk", type=int, default=1024, help="tokens per loss chunk; 0 = whole sequence")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "paged-adamw-8bit"])
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    p.add_argument("--dtype-bytes", type=int, default=2, help="compute dtype size: 2 (bf16/fp16) or 4 (fp32)")
    p.add_argument("--no-autocast", action="store_true",
                   help="16-bit compute without bf16 autocast (a GPU without bf16): adapters keep fp32 input copies")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = AdapterConfig.from_dict({"family": args.family, "r": args.rank, "experts": args.experts,
                                       "targets": args.targets or "all-linear"})
        g = geometry(load_config(args.model), cfg.targets)
        opts = dict(checkpointing=not args.no_checkpointing, offload=args.offload_activations,
                    loss_chunk=args.loss_chunk, optimizer=args.optimizer, param_dtype_bytes=args.dtype_bytes,
                    attention=args.attention, autocast=not args.no_autocast)
        plan = estimate(g, args.seq, args.batch, cfg, **opts)
        longest = longest_sequence(g, args.gpu_gb, args.batch, cfg, **opts)
    except QmorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**plan.to_json(), "gpu_gb": args.gpu_gb, "fits": plan.fits(args.gpu_gb),
                          "longest_sequence": longest}, indent=2))
        return 0
    print(f"{args.model}: {args.family} r={args.rank}, {args.batch} x {args.seq} tokens, "
          f"{'no checkpointing' if args.no_checkpointing else 'checkpointing'}"
          f"{', offloaded' if args.offload_activations else ''}, {args.optimizer}")
    print(plan.table())
    print(f"{plan.verdict(args.gpu_gb)}; longest sequence that fits at batch {args.batch}: {longest:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
