"""The training benchmarks' runners: one 4-bit model trained step by step by peft LoRA (the baseline) or by a qmor
family, with each step's peak memory and speed.

A runner is `peft-lora` (`prepare_model_for_kbit_training` + `get_peft_model`, the model's own loss), a qmor family
(`lora`, `moslora`, `mora`, `mor`, `sira`: chunked loss through the head) or a family with `+offload` (checkpointed
layer inputs kept in CPU RAM). The model is a random NF4 Llama of a given geometry, built layer by layer straight
into NF4 so that a whole 16-bit copy never exists, or a real model (a built-in name or a folder) loaded in NF4 by
qmor. Both sides get the same rank, targets (every linear), batch, non-reentrant activation checkpointing and
optimizer. On CUDA both run under bf16 autocast, as the Trainer's `bf16=True` and qmor's own training do; on the
CPU in fp32.

Peak memory needs the runner alone (a process of its own on the CPU, where the peak is the resident set size).
Speed ratios need the opposite: runners resident together whose steps are taken in turn, so that whatever else
the machine does hits every runner alike.

    python scripts/bench_runner.py '<json spec>'    # prints one JSON line; scripts/bench_train.py drives it
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run from a checkout: its own qmor comes first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BASELINE = "peft-lora"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GEOMETRIES = {  # (layers, hidden, intermediate, heads, kv heads, vocab)
    "llama31-8b": (32, 4096, 14336, 32, 8, 128256),
    "llama2-7b": (32, 4096, 11008, 32, 32, 32000),
    "small": (2, 256, 688, 4, 4, 32000),
    "tiny": (2, 128, 344, 4, 4, 2048),
}


def llama_config(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=1 << 20, use_cache=False, tie_word_embeddings=False)


def build_random_4bit(config, device: str, dtype: torch.dtype) -> nn.Module:
    """A causal LM whose linears are NF4 from the start: each decoder layer is made dense on `device`,
    quantised and its dense weights dropped before the next, so a full 16-bit copy never exists."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    from qmor.model.quant import quantize, set_packed

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


def build_model(spec: dict) -> nn.Module:
    """The spec's 4-bit model: random of `geometry`, or the real `model` loaded by qmor."""
    torch.manual_seed(0)
    if spec.get("geometry"):
        dtype = torch.bfloat16 if spec["device"] == "cuda" else torch.float32
        return build_random_4bit(llama_config(*spec["geometry"]), spec["device"], dtype)
    from qmor.model.load import load_4bit

    return load_4bit(spec["model"], device=spec["device"])  # a built-in name, a folder or a hub id


def model_config(spec: dict):
    """The config the planner reads for the spec's model."""
    if spec.get("geometry"):
        return llama_config(*spec["geometry"])
    from qmor.plan import load_config

    return load_config(spec["model"])


def adapter_config(runner: str, rank: int):
    """qmor's adapter for a runner; the baseline is compared with LoRA of the same rank and targets."""
    from qmor.adapters.config import AdapterConfig

    family = "lora" if runner == BASELINE else runner.partition("+")[0]
    return AdapterConfig(family=family, r=rank, alpha=2 * rank, targets=TARGETS)


def qmor_side(model: nn.Module, runner: str, rank: int, checkpointing: bool, loss_chunk: int, tile: int = 0):
    from qmor.adapters.attach import attach
    from qmor.model.tile import tile as tile_layers
    from qmor.training.loss import ChunkedLoss, enable_checkpointing

    attach(model, adapter_config(runner, rank))
    if checkpointing:
        enable_checkpointing(model)
    if tile:  # each layer's MLP and attention projections in tiles of this many tokens, as training runs them
        tile_layers(model, tile)
    loss_fn = ChunkedLoss(model, loss_chunk, offload=runner.endswith("+offload"))

    def step(ids: torch.Tensor) -> torch.Tensor:
        total, n = loss_fn(ids, ids)
        return total / n

    return model, step


def peft_side(model: nn.Module, rank: int, checkpointing: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    return model, lambda ids: model(input_ids=ids, labels=ids).loss


def make_optimizer(name: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The same optimizer for both sides: AdamW, or the paged 8-bit AdamW qmor trains with on CUDA."""
    if name == "paged-adamw-8bit":
        from qmor.model.quant import paged_adamw_8bit

        return paged_adamw_8bit(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4)


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def preload() -> None:
    """Import everything a run uses before the baseline size is read, so the peak counts no module code."""
    import qmor.model.quant  # noqa: F401, I001  (first: it quiets a notice bitsandbytes logs when imported)
    import peft.tuners.lora  # noqa: F401
    import transformers.integrations.bitsandbytes  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    import qmor.adapters.attach  # noqa: F401
    import qmor.training.loss  # noqa: F401


class Memory:
    """Peak memory of one device since the last reset: on CUDA the allocator's allocated and reserved peaks, on the
    CPU the resident set's high-water mark above the size when this object was made (before the model)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.baseline = 0 if self.cuda else rss_bytes()

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return
        with contextlib.suppress(OSError):  # give freed heap pages back (glibc) before the mark restarts
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current RSS

    def now(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else rss_bytes() - self.baseline

    def peak(self) -> dict:
        if not self.cuda:
            return {"peak": rss_bytes("VmHWM") - self.baseline}
        reserved = torch.cuda.max_memory_reserved()
        return {"peak": reserved, "peak_reserved": reserved, "peak_allocated": torch.cuda.max_memory_allocated()}


class Runner:
    """One side of the comparison on a built model: trains steps of any length and reports their memory and speed.
    `close` gives the model back without adapters (qmor's side), so the next qmor runner can use it."""

    def __init__(self, spec: dict, model: nn.Module, memory: Memory):
        self.spec, self.name, self.memory = spec, spec["runner"], memory
        self.device = spec["device"]
        self.cuda = self.device == "cuda"
        self.vocab = model.config.vocab_size
        if self.name == BASELINE:
            model, self.step_fn = peft_side(model, spec["rank"], spec["checkpointing"])
        else:
            model, self.step_fn = qmor_side(model, self.name, spec["rank"], spec["checkpointing"], spec["loss_chunk"],
                                            spec.get("tile", 0))
        model.train()
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = make_optimizer(spec.get("optimizer", "adamw"), self.params)
        self.train(64)  # AdamW makes its states on the first step: the settled size includes them
        self.settled = memory.now()

    def train(self, seq: int) -> None:
        ids = torch.randint(0, self.vocab, (self.spec["batch"], seq), device=self.device)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.cuda):
            loss = self.step_fn(ids)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.synchronize()

    def measure(self, seq: int, warmup: int, steps: int) -> dict:
        """Peak memory over `warmup + steps` steps and the median tokens/s of the last `steps`."""
        self.memory.reset()
        times = []
        try:
            for i in range(warmup + steps):
                start = time.perf_counter()
                self.train(seq)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
        except torch.OutOfMemoryError:
            self.opt.zero_grad(set_to_none=True)  # the failed step's partial gradients
            return {"runner": self.name, "seq": seq, "oom": True}
        speed = {"tokens_per_s": self.spec["batch"] * seq / statistics.median(times)} if times else {}
        return {"runner": self.name, "seq": seq, "oom": False, **self.memory.peak(), **speed}

    def fits(self, seq: int, cap_bytes: int) -> bool:
        result = self.measure(seq, 0, 1)
        return not result["oom"] and result["peak"] <= cap_bytes

    def close(self) -> None:
        from qmor.adapters.attach import detach
        from qmor.model.tile import untile

        self.opt = self.params = None
        if self.name != BASELINE:
            untile(self.model)  # before the adapted linears go: a tiled projection applies the norm it reads
            detach(self.model)
        self.memory.reset()


def interleaved(runners: list[Runner], seq: int, warmup: int, steps: int) -> dict[str, dict]:
    """Speed of runners resident together, their steps taken in turn (who goes first rotates each round): median
    tokens/s of each, and the median over rounds of its step time over the first runner's in the same round."""
    for runner in runners:
        for _ in range(warmup):
            runner.train(seq)
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for i in range(steps):
        for runner in runners[i % len(runners):] + runners[:i % len(runners)]:
            start = time.perf_counter()
            runner.train(seq)
            times[runner.name].append(time.perf_counter() - start)
    first = times[runners[0].name]
    tokens = runners[0].spec["batch"] * seq
    return {name: {"tokens_per_s": tokens / statistics.median(t),
                   "time_ratio": statistics.median(a / b for a, b in zip(t, first, strict=True)),
                   "step_seconds": t}
            for name, t in times.items()}


def search(fits, guess: int, step: int, limit: int) -> int:
    """Largest multiple of `step` up to `limit` for which `fits` holds (0 if none), probing near `guess` first:
    gallop away from the guess until the boundary is bracketed, then bisect. A good guess (the planner's)
    brackets in two or three probes."""
    lo, hi = 0, limit // step + 1  # fits(lo * step) (0 trivially) and not fits(hi * step) (past the limit)
    n, d = min(max(guess // step, 1), hi - 1), 1
    if fits(n * step):
        lo = n
        while lo + d < hi and fits((lo + d) * step):
            lo, d = lo + d, d * 2
        hi = min(hi, lo + d)
    else:
        hi = n
        while hi - d > lo and not fits((hi - d) * step):
            hi, d = hi - d, d * 2
        lo = max(lo, hi - d)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid)
    return lo * step


def planned(spec: dict, seq: int):
    """The planner's prediction for this runner at `seq` tokens (the baseline as LoRA with whole-sequence logits:
    its fp32 embeddings and head, which `prepare_model_for_kbit_training` adds, are not modelled)."""
    from qmor.plan import estimate

    return estimate(model_config(spec).to_dict(), seq, spec["batch"], adapter_config(spec["runner"], spec["rank"]),
                    **plan_options(spec))


def plan_options(spec: dict) -> dict:
    cuda, runner = spec["device"] == "cuda", spec["runner"]
    return {"checkpointing": spec["checkpointing"], "offload": runner.endswith("+offload"),
            "loss_chunk": 0 if runner == BASELINE else spec["loss_chunk"],
            "optimizer": spec.get("optimizer", "adamw"), "param_dtype_bytes": 2 if cuda else 4,
            "device": spec["device"], "tile": 0 if runner == BASELINE else spec.get("tile", 0)}


def planned_longest(spec: dict, gib: float, step: int, limit: int) -> int:
    """The planner's longest sequence for this runner under `gib`: where the search starts probing."""
    from qmor.plan import longest_sequence

    return longest_sequence(model_config(spec).to_dict(), gib, spec["batch"],
                            adapter_config(spec["runner"], spec["rank"]), step=step, limit=limit, **plan_options(spec))


def set_threads(spec: dict) -> None:
    """CPU threads for every runner of this process: one is steadier than two when other work shares the cores."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])


def prepare(spec: dict) -> tuple[Memory, nn.Module]:
    """Libraries imported and the memory cap set before the baseline is read, then the model built."""
    set_threads(spec)
    preload()
    if spec["device"] == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gb"] * 1024**3 / total))
    memory = Memory(spec["device"])
    return memory, build_model(spec)


def run(spec: dict) -> dict:
    """One runner alone: each length's peak memory (and speed), then the longest length under the cap."""
    if spec["runner"] != BASELINE:  # what scripts/finetune_4bit.py sets; read when CUDA starts, in prepare
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    memory, model = prepare(spec)
    runner = Runner(spec, model, memory)
    out = {"runner": spec["runner"], "trainable": sum(p.numel() for p in runner.params), "settled": runner.settled,
           "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default"),
           "results": [runner.measure(seq, spec["warmup"], spec["steps"]) for seq in spec["seqs"]]}
    if spec.get("longest"):
        step, limit = spec["longest"]["step"], spec["longest"]["limit"]
        guess = planned_longest(spec, spec["cap_gb"], step, limit)
        probes = {}

        def fits(seq: int) -> bool:
            probes[seq] = runner.fits(seq, int(spec["cap_gb"] * 1024**3))
            return probes[seq]

        out["longest"] = search(fits, guess, step, limit)
        out["longest_guess"], out["probes"] = guess, probes
    return out


def run_interleaved(spec: dict) -> dict:
    """Every runner of `runners` on a model of its own in this process, their steps interleaved per length."""
    set_threads(spec)
    memory = Memory(spec["device"])
    preload()
    runners = [Runner({**spec, "runner": name}, build_model(spec), memory) for name in spec["runners"]]
    return {"speed": {seq: interleaved(runners, seq, spec["warmup"], spec["steps"]) for seq in spec["seqs"]}}


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    print(json.dumps(run_interleaved(spec) if "runners" in spec else run(spec)))
