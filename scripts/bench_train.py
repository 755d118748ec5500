"""Training memory and speed, qmor against peft LoRA on the same bitsandbytes 4-bit model, side by side.

Every configuration runs in a fresh subprocess (so one run's peak cannot leak into the next): the same random
NF4 model, rank, targets (every linear), batch and non-reentrant activation checkpointing, AdamW. qmor computes
the loss in chunks through the head (qmor.loss.ChunkedLoss); the baseline is `prepare_model_for_kbit_training`
+ `get_peft_model` with the model's own loss. On CUDA: Llama-2-7B geometry built layer by layer straight into NF4,
peak `max_memory_allocated` / `max_memory_reserved` under a 24 GiB cap. On the CPU: a small geometry and the peak
resident set size above the process's size before the model was built.

    python scripts/bench_train.py                 # CUDA: 7B geometry, 512/2048/8192 + longest under 24 GiB
    python scripts/bench_train.py --device cpu    # CPU: small geometry, peak RSS
    python scripts/bench_train.py --quick         # CPU smoke test, a few seconds per configuration
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

FAMILIES = ["lora", "moslora", "mora", "mor", "sira"]
BASELINE = "peft-lora"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GEOMETRIES = {  # (layers, hidden, intermediate, heads, vocab)
    "llama2-7b": (32, 4096, 11008, 32, 32000),
    "small": (2, 256, 688, 4, 32000),
    "tiny": (2, 128, 344, 4, 2048),
}


def llama_config(layers: int, hidden: int, intermediate: int, heads: int, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                       max_position_embeddings=1 << 20, use_cache=False, tie_word_embeddings=False)


def build_random_4bit(config, device: str, dtype: torch.dtype) -> nn.Module:
    """A causal LM whose linears are NF4 from the start: each decoder layer is made dense on `device`,
    quantised and its dense weights dropped before the next, so a full 16-bit copy never exists."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    from qmor.quant import quantize, set_packed

    layers = config.num_hidden_layers
    with torch.device("meta"):
        config.num_hidden_layers = 1
        layer_cls = type(AutoModelForCausalLM.from_config(config).get_decoder().layers[0])
    config.num_hidden_layers = 0
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    config.num_hidden_layers = layers
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    for i in range(layers):
        with torch.device(device):
            layer = layer_cls(config, i).to(dtype)
        dense = {n: m.weight.data for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        replace_with_bnb_linear(layer, quantization_config=quant)
        for name, weight in dense.items():
            set_packed(layer.get_submodule(name), quantize(weight))
        del dense
        model.get_decoder().layers.append(layer)
    model.is_loaded_in_4bit = True  # what from_pretrained sets; peft's kbit preparation looks for it
    return model


def qmor_step(model: nn.Module, family: str, rank: int, checkpointing: bool, loss_chunk: int, offload: bool):
    from qmor.attach import attach
    from qmor.config import AdapterConfig
    from qmor.loss import ChunkedLoss

    attach(model, AdapterConfig(family=family, r=rank, alpha=2 * rank, targets=TARGETS))
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    loss_fn = ChunkedLoss(model, loss_chunk, offload)

    def step(ids: torch.Tensor) -> torch.Tensor:
        total, n = loss_fn(ids, ids)
        return total / n

    return model, step


def peft_step(model: nn.Module, rank: int, checkpointing: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    return model, lambda ids: model(input_ids=ids, labels=ids).loss


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_rss_peak() -> None:
    """Give freed heap pages back (glibc) and restart the VmHWM high-water mark from the current RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")


def preload() -> None:
    """Import everything a run uses before the baseline size is read, so the peak counts no module code."""
    import peft.tuners.lora  # noqa: F401
    import transformers.integrations.bitsandbytes  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    import qmor.attach  # noqa: F401
    import qmor.loss  # noqa: F401
    import qmor.quant  # noqa: F401


def run_one(spec: dict) -> dict:
    """Build, train `warmup + steps` steps and report peak memory and median tokens/s (the child process)."""
    device, seq, batch = spec["device"], spec["seq"], spec["batch"]
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    preload()
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gb"] * 1024**3 / total))
    base_rss = rss_bytes()
    model = build_random_4bit(llama_config(*spec["geometry"]), device, dtype)
    if spec["runner"] == BASELINE:
        model, step = peft_step(model, spec["rank"], spec["checkpointing"])
    else:
        model, step = qmor_step(model, spec["runner"], spec["rank"], spec["checkpointing"], spec["loss_chunk"],
                                spec.get("offload", False))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, spec["geometry"][4], (batch, seq), device=device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_rss_peak()
    settled = torch.cuda.memory_allocated() if cuda else rss_bytes() - base_rss  # model + optimizer before step 1
    times = []
    try:
        for i in range(spec["warmup"] + spec["steps"]):
            start = time.perf_counter()
            step(ids).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return {**spec, "oom": True}
    out = {**spec, "oom": False, "trainable": sum(p.numel() for p in params), "settled": settled,
           "tokens_per_s": batch * seq / statistics.median(times)}
    if cuda:
        out["peak_allocated"] = torch.cuda.max_memory_allocated()
        out["peak_reserved"] = torch.cuda.max_memory_reserved()
        out["peak"] = out["peak_reserved"]
    else:
        out["peak"] = rss_bytes("VmHWM") - base_rss
    return out


def spawn(spec: dict) -> dict:
    """run_one in a fresh Python process; its last stdout line is the JSON result."""
    # glibc keeps freed blocks below its (self-raising, up to 32 MiB) mmap threshold in the heap, so peak RSS
    # would count dead activations; a fixed 64 KiB threshold returns every tensor's pages when it is freed
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{spec['runner']} at {spec['seq']} tokens failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fits(spec: dict, cap_bytes: int) -> bool:
    result = spawn(spec)
    return not result["oom"] and result["peak"] <= cap_bytes


def longest(spec: dict, cap_bytes: int, start: int, step: int, limit: int) -> int:
    """Longest multiple of `step` tokens that trains under the cap: double from `start`, then bisect."""
    probe = {**spec, "warmup": 1, "steps": 1}
    lo, hi = 0, max(start // step, 1)
    while hi * step <= limit and fits({**probe, "seq": hi * step}, cap_bytes):
        lo, hi = hi, hi * 2
    if hi * step > limit:
        return lo * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits({**probe, "seq": mid * step}, cap_bytes) else (lo, mid)
    return lo * step


def table(results: list[dict], runners: list[str], seqs: list[int]) -> str:
    by = {(r["runner"], r["seq"]): r for r in results}
    rows = ["| runner | seq | peak MiB | peak / baseline | tokens/s | tokens/s / baseline |",
            "|---|---|---|---|---|---|"]
    for seq in seqs:
        base = by.get((BASELINE, seq))
        for runner in runners:
            r = by.get((runner, seq))
            if r is None:
                continue
            if r["oom"]:
                rows.append(f"| {runner} | {seq} | OOM | | | |")
                continue
            ok = base is not None and not base["oom"]
            mem = f"{r['peak'] / base['peak']:.2f}" if ok else "baseline OOM"
            speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if ok else ""
            rows.append(f"| {runner} | {seq} | {r['peak'] / 2**20:,.0f} | {mem} | {r['tokens_per_s']:,.0f} "
                        f"| {speed} |")
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
    p.add_argument("--families", nargs="+", default=FAMILIES, help="qmor families to compare with the baseline")
    p.add_argument("--seqs", type=int, nargs="+", default=None, help="sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--cap-gb", type=float, default=None, help="memory cap in GiB (CUDA default 24, CPU 1)")
    p.add_argument("--no-longest", action="store_true", help="skip the search for the longest sequence")
    p.add_argument("--workers", type=int, default=1, help="configurations run at once (CPU; memory stays exact)")
    p.add_argument("--out", default="docs", help="folder for bench_train_<device>.json / .md / .png")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_one(json.loads(args.child))))
        return 0
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cuda = device == "cuda"
    families, seqs, warmup, steps = args.families, args.seqs, args.warmup, args.steps
    if args.quick:
        device, cuda, families, warmup, steps = "cpu", False, ["lora"], 1, 2
        seqs = seqs or [64]
    seqs = seqs or ([512, 2048, 8192] if cuda else [64, 128, 256, 512])
    cap_gb = args.cap_gb or (24.0 if cuda else 1.0)
    runners = [BASELINE, *families]
    geometry = "llama2-7b" if cuda else "tiny" if args.quick else "small"
    base = {"device": device, "geometry": GEOMETRIES[geometry], "batch": args.batch,
            "rank": args.rank, "checkpointing": True, "loss_chunk": args.loss_chunk, "warmup": warmup,
            "steps": steps, "cap_gb": cap_gb}
    specs = [{**base, "runner": r, "seq": s} for s in seqs for r in runners]
    with ThreadPoolExecutor(1 if cuda else 2 if args.quick else args.workers) as pool:
        results = list(pool.map(spawn, specs))
    report = [f"device {device}, geometry (layers, hidden, mlp, heads, vocab) {base['geometry']}, batch {args.batch}, "
              f"rank {args.rank}, {warmup} warm-up + {steps} timed steps, torch {torch.__version__}",
              "", table(results, runners, seqs)]
    longest_found = {}
    if not (args.quick or args.no_longest):
        step, start, limit = (1024, 8192, 1 << 17) if cuda else (256, 512, 1 << 14)
        for runner in runners:
            longest_found[runner] = longest({**base, "runner": runner}, int(cap_gb * 1024**3), start, step, limit)
        report += ["", f"longest sequence that trains under {cap_gb:g} GiB (multiples of {step}):", "",
                   "| runner | tokens | / baseline |", "|---|---|---|"]
        report += [f"| {r} | {n:,} | {n / max(longest_found[BASELINE], 1):.2f} |" for r, n in longest_found.items()]
    text = "\n".join(report)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"bench_train_{device}{'_quick' if args.quick else ''}"
    (out / f"{name}.json").write_text(json.dumps({"results": results, "longest": longest_found}, indent=1) + "\n")
    (out / f"{name}.md").write_text(text + "\n")
    plot(results, runners, out / f"{name}.png", f"training peak memory, {device}, rank {args.rank}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
