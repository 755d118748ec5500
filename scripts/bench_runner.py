"""One runner of the training benchmark, in its own process: build the random NF4 model once, then time each
sequence length and search for the longest one that trains under the memory cap.

A runner is `peft-lora` (the baseline: `prepare_model_for_kbit_training` + `get_peft_model`, the model's own
loss), a qmor family (`lora`, `moslora`, `mora`, `mor`, `sira`: chunked loss through the head), or a family with
`+offload` (checkpointed layer inputs kept in CPU RAM). On CUDA both sides run under bf16 autocast, as the
Trainer's `bf16=True` and qmor's own training do; on the CPU in fp32.

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

BASELINE = "peft-lora"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def qmor_step(model: nn.Module, runner: str, rank: int, checkpointing: bool, loss_chunk: int):
    from qmor.adapters.attach import attach
    from qmor.config import AdapterConfig
    from qmor.training.loss import ChunkedLoss, enable_checkpointing

    family, _, extra = runner.partition("+")
    attach(model, AdapterConfig(family=family, r=rank, alpha=2 * rank, targets=TARGETS))
    if checkpointing:
        enable_checkpointing(model)
    loss_fn = ChunkedLoss(model, loss_chunk, offload=extra == "offload")

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
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def preload() -> None:
    """Import everything a run uses before the baseline size is read, so the peak counts no module code."""
    import peft.tuners.lora  # noqa: F401
    import transformers.integrations.bitsandbytes  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    import qmor.adapters.attach  # noqa: F401
    import qmor.model.quant  # noqa: F401
    import qmor.training.loss  # noqa: F401


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


class Runner:
    """A built model and optimizer that trains steps of any length and reports their peak memory and speed."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.device = spec["device"]
        self.cuda = self.device == "cuda"
        dtype = torch.bfloat16 if self.cuda else torch.float32
        torch.manual_seed(0)
        preload()
        if spec["runner"] != BASELINE:  # what scripts/finetune_4bit.py sets; read when CUDA starts, just below
            os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        if self.cuda:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gb"] * 1024**3 / total))
        self.base_rss = rss_bytes()
        model = build_random_4bit(llama_config(*spec["geometry"]), self.device, dtype)
        if spec["runner"] == BASELINE:
            model, self.step_fn = peft_step(model, spec["rank"], spec["checkpointing"])
        else:
            model, self.step_fn = qmor_step(model, spec["runner"], spec["rank"], spec["checkpointing"],
                                            spec["loss_chunk"])
        model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.train(64)  # AdamW makes its states on the first step: the settled size includes them
        self.settled = torch.cuda.memory_allocated() if self.cuda else rss_bytes() - self.base_rss

    def train(self, seq: int) -> None:
        ids = torch.randint(0, self.spec["geometry"][4], (self.spec["batch"], seq), device=self.device)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.cuda):
            loss = self.step_fn(ids)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.synchronize()

    def _reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_rss_peak()

    def _peak(self) -> dict:
        if not self.cuda:
            return {"peak": rss_bytes("VmHWM") - self.base_rss}
        reserved = torch.cuda.max_memory_reserved()
        return {"peak": reserved, "peak_reserved": reserved, "peak_allocated": torch.cuda.max_memory_allocated()}

    def measure(self, seq: int, warmup: int, steps: int) -> dict:
        """Peak memory over `warmup + steps` steps and the median tokens/s of the last `steps`."""
        self._reset_peak()
        times = []
        try:
            for i in range(warmup + steps):
                start = time.perf_counter()
                self.train(seq)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
        except torch.OutOfMemoryError:
            self.opt.zero_grad(set_to_none=True)  # the failed step's partial gradients
            return {"seq": seq, "oom": True}
        return {"seq": seq, "oom": False, **self._peak(),
                "tokens_per_s": self.spec["batch"] * seq / statistics.median(times)}

    def fits(self, seq: int, cap_bytes: int) -> bool:
        result = self.measure(seq, 0, 1)
        return not result["oom"] and result["peak"] <= cap_bytes


def planned_longest(spec: dict, step: int, limit: int) -> int:
    """The planner's longest sequence for this runner: where the search starts probing."""
    from qmor.config import AdapterConfig
    from qmor.plan import longest_sequence

    family, _, extra = spec["runner"].partition("+")
    baseline = spec["runner"] == BASELINE  # not modelled; plain LoRA with whole-sequence logits is near it
    cfg = AdapterConfig(family="lora" if baseline else family, r=spec["rank"], alpha=2 * spec["rank"],
                        targets=TARGETS)
    return longest_sequence(llama_config(*spec["geometry"]).to_dict(), spec["cap_gb"], spec["batch"], cfg,
                            step=step, limit=limit, offload=extra == "offload",
                            loss_chunk=0 if baseline else spec["loss_chunk"],
                            param_dtype_bytes=2 if spec["device"] == "cuda" else 4, device=spec["device"])


def run(spec: dict) -> dict:
    runner = Runner(spec)
    results = [{**runner.measure(seq, spec["warmup"], spec["steps"]), "runner": spec["runner"]}
               for seq in spec["seqs"]]
    out = {"runner": spec["runner"], "trainable": sum(p.numel() for p in runner.params), "settled": runner.settled,
           "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default"), "results": results}
    if spec.get("longest"):
        step, limit = spec["longest"]["step"], spec["longest"]["limit"]
        guess = planned_longest(spec, step, limit)
        probes = {}

        def fits(seq: int) -> bool:
            probes[seq] = runner.fits(seq, int(spec["cap_gb"] * 1024**3))
            return probes[seq]

        out["longest"] = search(fits, guess, step, limit)
        out["longest_guess"], out["probes"] = guess, probes
    return out


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
