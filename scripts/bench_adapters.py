"""Forward + backward time of one adapted 4-bit layer, every family at matched trainable parameters.

Reports each family's time as a ratio to LoRA's and to the frozen 4-bit base alone, measured side by side in one
process (interleaved repeats, median), so machine load affects every row alike.

    python scripts/bench_adapters.py                      # 4096->4096 and 4096->11008, 2048 tokens
    python scripts/bench_adapters.py --tokens 256 --quick # smoke run
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from qmor.adapters import ADAPTERS, build_adapter
from qmor.adapters.config import AdapterConfig
from qmor.adapters.layer import AdaptedLinear
from qmor.adapters.mora import mora_kind
from qmor.model.quant import quantize, set_packed


def matched_config(family: str, d_in: int, d_out: int, lora_rank: int, experts: int) -> AdapterConfig:
    """The family's config whose trainable parameter count is closest to LoRA's at `lora_rank`."""
    target = ADAPTERS["lora"].module.num_params(d_in, d_out, AdapterConfig(r=lora_rank).hyperparams)
    if family in ("lora", "moslora", "mora"):
        return AdapterConfig(family=family, r=lora_rank)  # MoRA: "auto" operators, as training picks them
    candidates = [AdapterConfig.from_dict({"family": family, "r": r, "experts": experts, "top_k": 2,
                                           "expert_dropout": 0.0}) for r in range(1, lora_rank + 1)]
    return min(candidates, key=lambda c: abs(ADAPTERS[family].module.num_params(d_in, d_out, c.hyperparams) - target))


def frozen_4bit(d_in: int, d_out: int) -> torch.nn.Linear:
    import bitsandbytes as bnb  # noqa: F401  (only to build the layer; quantisation itself goes through qmor.model.quant)

    layer = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    set_packed(layer, quantize(torch.randn(d_out, d_in) * d_in**-0.5))
    return layer


def step_time(layer: torch.nn.Module, x: torch.Tensor) -> float:
    x = x.detach().requires_grad_(True)  # inside a network the input carries gradient from earlier layers
    start = time.perf_counter()
    layer(x).float().square().mean().backward()
    return time.perf_counter() - start


def bench_shape(d_in: int, d_out: int, tokens: int, lora_rank: int, experts: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    base = frozen_4bit(d_in, d_out)
    layers = {"base": base}
    configs = {}
    for family in ADAPTERS:
        cfg = matched_config(family, d_in, d_out, lora_rank, experts)
        adapter = build_adapter(cfg, d_in, d_out)
        with torch.no_grad():
            for p in adapter.parameters():
                p.normal_(0, 0.01)  # non-zero, so no family gets a shortcut through zero weights
        layers[family] = AdaptedLinear(base, adapter).train()
        configs[family] = cfg
    x = torch.randn(tokens, d_in)
    times = {name: [] for name in layers}
    for layer in layers.values():
        step_time(layer, x)  # warm-up
    for _ in range(repeats):
        for name, layer in layers.items():
            times[name].append(step_time(layer, x))
    median = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for family, cfg in configs.items():
        params = ADAPTERS[family].module.num_params(d_in, d_out, cfg.hyperparams)
        rows.append({"shape": f"{d_in}->{d_out}", "family": family, "config": describe(cfg), "params": params,
                     "ms": 1000 * median[family], "vs_lora": median[family] / median["lora"],
                     "vs_base": median[family] / median["base"]})
    rows.append({"shape": f"{d_in}->{d_out}", "family": "frozen base", "config": "NF4, no adapter", "params": 0,
                 "ms": 1000 * median["base"], "vs_lora": median["base"] / median["lora"], "vs_base": 1.0})
    return rows


def describe(cfg: AdapterConfig) -> str:
    if cfg.family == "mora":
        return f"r={cfg.r} ({mora_kind(cfg.hyperparams)})"
    if cfg.family in ("mor", "sira"):
        extra = f", top-{cfg.options.top_k}" if cfg.family == "sira" else ""
        return f"r={cfg.r}, {cfg.options.experts} experts{extra}"
    return f"r={cfg.r}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank whose parameter count every family matches")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small shapes and few repeats (smoke run)")
    args = ap.parse_args()
    shapes = [(256, 256), (256, 704)] if args.quick else [(4096, 4096), (4096, 11008)]
    repeats = 2 if args.quick else args.repeats
    cpu = platform.processor() or platform.machine()
    print(f"# {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.tokens} tokens, "
          f"median of {repeats}")
    print("| shape | family | config | trainable params | fwd+bwd ms | vs LoRA | vs frozen base |")
    print("|---|---|---|---|---|---|---|")
    for d_in, d_out in shapes:
        for row in bench_shape(d_in, d_out, args.tokens, args.rank, args.experts, repeats):
            print(f"| {row['shape']} | {row['family']} | {row['config']} | {row['params']:,} | {row['ms']:.1f} | "
                  f"{row['vs_lora']:.2f}x | {row['vs_base']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
