"""Peak RAM and time of the streaming merged export, against the size of one shard and of the whole model.

Builds a wide, shallow Llama (random weights, saved in several safetensors shards) and a LoRA adapter for it, then
runs each stage in its own subprocess so every peak (ru_maxrss) is that stage's alone:
  load      the 4-bit base + adapter (what every export needs first)
  merge     load + the shard-by-shard merged write (no verification)
  export    the full export_merged (merge + tokenizer/config + verification, which loads the exported model)
  naive     baseline: the whole model loaded in fp32 and saved in fp16 (what a non-streaming merge costs)

    python scripts/bench_export.py                         # hidden 2048, 2 layers, 32 MB shards
    python scripts/bench_export.py --hidden 1024 --layers 2 --shard-size 8MB   # quick
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(stage: str, work: Path, shard_size: str) -> dict:
    import torch

    start = time.perf_counter()
    if stage == "naive":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(work / "base"), dtype=torch.float32)
        model.to(torch.float16).save_pretrained(work / "naive", max_shard_size=shard_size)
    elif stage == "export":
        from qmor.export.exporter import export_merged

        export_merged(work / "adapter", work / "export", shard_size=shard_size, overwrite=True)
    else:
        from qmor.model.load import load_trained

        model, _ = load_trained(work / "adapter")
        if stage == "merge":
            from qmor.export.merge import parse_size, write_merged
            from qmor.model.files import weight_files

            out = work / "merge"
            out.mkdir(exist_ok=True)
            write_merged(model, weight_files(work / "base"), out, torch.float16, parse_size(shard_size))
    return {"stage": stage, "seconds": time.perf_counter() - start, "peak_mb": peak_mb()}


def build(work: Path, hidden: int, layers: int, shard_size: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from qmor import AdapterConfig, attach, save_adapter
    from qmor.adapters.attach import AdapterMeta
    from qmor.model.load import load_4bit
    from qmor.model.tiny import make_tiny

    tiny = make_tiny(work / "one-file", seed=0, hidden=hidden, layers=layers)
    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float16)
    model.save_pretrained(work / "base", max_shard_size=shard_size)  # an fp16 checkpoint in several shards
    for f in tiny.glob("*"):
        if not f.name.endswith((".safetensors", ".json")) or f.name in ("tokenizer.json", "tokenizer_config.json"):
            (work / "base" / f.name).write_bytes(f.read_bytes())
    del model
    m = load_4bit(str(work / "base"))
    cfg = AdapterConfig(family="lora", r=16, alpha=32.0)
    attach(m, cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    save_adapter(m, work / "adapter", AdapterMeta(adapter=cfg, base_model=str(work / "base")))


def run_child(stage: str, work: Path, shard_size: str) -> dict:
    cmd = [sys.executable, __file__, "--child", stage, "--work", str(work), "--shard-size", shard_size]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--shard-size", default="32MB")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.work), args.shard_size)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build(work, args.hidden, args.layers, args.shard_size)
        rows = [run_child(stage, work, args.shard_size) for stage in ("load", "merge", "export", "naive")]
        shards = sorted((work / "export").glob("model-*.safetensors"))
        largest = max(f.stat().st_size for f in shards) / 1e6
        whole = sum(f.stat().st_size for f in shards) / 1e6
    load = rows[0]["peak_mb"]
    print(f"model: hidden {args.hidden}, {args.layers} layers; fp16 export {whole:.0f} MB in {len(shards)} shards, "
          f"largest {largest:.0f} MB; {platform.processor() or platform.machine()}, torch CPU")
    print("| stage | time (s) | peak RSS (MB) | peak − load peak (MB) | ÷ largest shard | ÷ whole model |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        extra = r["peak_mb"] - load
        print(f"| {r['stage']} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | {extra:.0f} | {extra / largest:.2f} | "
              f"{extra / whole:.2f} |")


if __name__ == "__main__":
    main()
