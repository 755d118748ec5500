"""Will it fit? Predicted peak GPU memory of 4-bit + adapter training, and the longest sequence that fits.

    qmor plan --model meta-llama/Llama-2-7b-hf --max-len 4096 --gpu-gb 24 --family mora --rank 16
    qmor plan --config run.yaml --gpu-gb 24      # the run a training config describes

The model, adapter, batch, length and memory options are the training flags (same names, aliases and config file);
the defaults differ where a plan asks about a real model: a real model's adapter (LoRA r=16), batch 1, 4096
tokens.
"""

from __future__ import annotations

import argparse
import json
import sys

from qmor.commands import fail
from qmor.commands.options import add_flags, parse
from qmor.errors import QmorError
from qmor.flags import by_key, family_flags
from qmor.training.config import MODEL_ADAPTER

# the training options that change the memory of a step
SHARED = ("model", "family", "rank", "targets", "expert_adapters", "batch_size", "max_len", "gradient_checkpointing",
          "offload_activations", "loss_chunk", "tile_tokens", "attn_implementation")
# a plan asks about a real model: its training defaults' adapter, one sequence of a length worth asking about
UNDER = {"adapter": {"family": MODEL_ADAPTER["family"], "r": MODEL_ADAPTER["r"]}, "batch_size": 1,
         "data": {"max_len": 4096}}
DEFAULTS = {"family": UNDER["adapter"]["family"], "rank": UNDER["adapter"]["r"], "batch_size": UNDER["batch_size"],
            "max_len": UNDER["data"]["max_len"]}  # the same, as --help shows them
# names this command took before it shared the training flags: one line says the new one
RENAMED = {"--seq": "--max-len", "--batch": "--batch-size", "--no-checkpointing": "--no-gradient-checkpointing",
           "--attention": "--attn-implementation"}


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    # no abbreviations: with aliases, a mistyped prefix (--learning-rat) would quietly pick a flag
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--config", help="a training config file (YAML or JSON): plan the run it describes")
    add_flags(p, [by_key()[k] for k in SHARED] + family_flags(), defaults=DEFAULTS)
    p.add_argument("--gpu-gb", type=float, default=24.0, help="GPU memory in GiB (default: 24)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "paged-adamw-8bit"],
                   help="optimizer states (default: adamw; training on a GPU uses paged-adamw-8bit)")
    p.add_argument("--dtype-bytes", type=int, default=2, help="compute dtype size: 2 (bf16/fp16) or 4 (fp32)")
    p.add_argument("--no-autocast", action="store_true",
                   help="16-bit compute without bf16 autocast (a GPU without bf16): adapters keep fp32 input copies")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    # loaded when the command runs, so --help and bad options answer at once
    from qmor.commands.train import build_config
    from qmor.plan import GIB, estimate, geometry, load_config, longest_sequence, pick_tile
    from qmor.training.config import planner_attention

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        old = next((a.split("=")[0] for a in argv if a.split("=")[0] in RENAMED), None)
        if old:
            raise QmorError(f"{old} is now {RENAMED[old]}, the name training uses for it")
        args = parse(parser(prog), argv)
        if args.config is None and "model" not in vars(args):
            raise QmorError("pass --model (a hub id, a local model folder, config.json, or tiny / smollm2) or --config")
        own = {k: vars(args).pop(k) for k in ("gpu_gb", "optimizer", "dtype_bytes", "no_autocast", "json")}
        cfg = build_config(args, under=UNDER)
        seq, batch, adapter = cfg.data.max_len, cfg.batch_size, cfg.adapter
        g = geometry(load_config(cfg.model), adapter.targets, adapter.expert_adapters)
        opts = dict(checkpointing=cfg.gradient_checkpointing, offload=cfg.offload_activations,
                    loss_chunk=cfg.loss_chunk, optimizer=own["optimizer"], param_dtype_bytes=own["dtype_bytes"],
                    attention=planner_attention(cfg.attn_implementation), autocast=not own["no_autocast"],
                    tile=cfg.tile_tokens)
        plan = estimate(g, seq, batch, adapter, **opts)
        longest = longest_sequence(g, own["gpu_gb"], batch, adapter, **opts)
        # a run that does not fit may fit in smaller tiles: the largest that does
        smaller = None
        if cfg.tile_tokens and seq * batch > cfg.tile_tokens // 2 and not plan.fits(own["gpu_gb"]):
            smaller = pick_tile(g, seq, batch, adapter, own["gpu_gb"], **{**opts, "tile": cfg.tile_tokens // 2})
        # the longest sequence with and without offloading, and the host RAM offloading it takes
        both = {}
        if cfg.gradient_checkpointing:
            for offload in (False, True):
                n = longest if offload == cfg.offload_activations else \
                    longest_sequence(g, own["gpu_gb"], batch, adapter, **{**opts, "offload": offload})
                host = estimate(g, max(n, 1), batch, adapter, **{**opts, "offload": offload}).host_bytes
                both["offloaded" if offload else "on the GPU"] = (n, host)
    except QmorError as e:
        return fail(e)
    if own["json"]:
        print(json.dumps({**plan.to_json(), "gpu_gb": own["gpu_gb"], "fits": plan.fits(own["gpu_gb"]),
                          "longest_sequence": longest, "fits_in_tiles_of": smaller,
                          "longest": {k: {"tokens": n, "host_bytes": h} for k, (n, h) in both.items()}}, indent=2))
        return 0
    print(f"{cfg.model}: {adapter.family} r={adapter.r}, {batch} x {seq} tokens, "
          f"{'checkpointing' if cfg.gradient_checkpointing else 'no checkpointing'}"
          f"{', offloaded' if cfg.offload_activations else ''}, "
          f"{f'tiles of {cfg.tile_tokens} tokens' if cfg.tile_tokens else 'untiled'}, {own['optimizer']}")
    print(plan.table())
    print(f"{plan.verdict(own['gpu_gb'])}; longest sequence that fits at batch {batch}: {longest:,} tokens")
    if smaller:
        print(f"  it fits in smaller tiles: --tile-tokens {smaller}")
    for where, (n, host) in both.items():
        ram = f", {host / GIB:.1f} GiB of host RAM" if host else ""
        print(f"  checkpointed layer inputs {where}: {n:,} tokens{ram}")
    return 0
