"""LoftQ initialisation against plain NF4, for every adapter family at matched trainable parameters.

Two settings, both on weights with structure:
- matrices: synthetic weights with i.i.d. Gaussian entries, a decaying (power-law) spectrum, and that spectrum
  plus a few outlier input columns (as in LLM activations / weights). Relative error ||W - deq(Q) - ΔW|| / ||W||.
- model: a tiny Llama briefly trained in full precision on the `mix` task, then loaded in 4-bit with each init.
  Per-layer weight error (mean) and the initial loss on held-out `mix` data, against the fp32 model's loss.
- with --model (e.g. smollm2): that pretrained model instead, every family at T = 0 (plain NF4), 1 and 5. Per-layer
  weight error, the loss on held-out English prose (Python's own documentation, `pydoc_data.topics`, which ships
  with every Python) at init against the unquantised model's, and again after the same short fine-tune on other
  documentation topics.

    python scripts/experiments/loftq_init.py --out runs/experiments/loftq --plot docs/experiments_loftq.png
    python scripts/experiments/loftq_init.py --quick --out runs/quick/loftq      # smoke run
    python scripts/experiments/loftq_init.py --model smollm2 --out runs/experiments/loftq-smollm2 \
        --plot docs/experiments_loftq_smollm2.png
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import common
import loftq_real
import plots
import torch
from tqdm import tqdm

from qmor.errors import QmorError


@dataclass
class Setup:
    iters: tuple[int, ...] = (1, 5)  # LoftQ alternations T to compare with plain NF4 (T = 0)
    lora_rank: int = 10  # reference LoRA rank; the other families are matched to its parameter count
    mor_experts: int = 4  # MoR experts N
    sira_experts: int = 4  # SiRA experts E
    sira_top_k: int = 2  # SiRA experts per token
    matrix: tuple[int, int] = (512, 1376)  # (d_out, d_in) of the synthetic matrices
    matrix_rank: int = 16  # reference LoRA rank for the synthetic matrices
    hidden: int = 128  # tiny base width
    layers: int = 2  # tiny base depth
    pretrain_steps: int = 400  # full-precision training of the tiny base before quantising it
    pretrain_lr: float = 3e-3  # its AdamW learning rate
    test_examples: int = 400  # held-out `mix` examples for the loss
    seed: int = 0  # seed of the matrices, the base, its training and the data
    model: str = "tiny"  # tiny: the fp32-trained tiny base above; else a pretrained model (smollm2, a folder, a Hub id)
    targets: str = "all-linear"  # the linears that get adapters, on a pretrained model
    train_texts: int = 256  # documentation paragraphs the pretrained model is fine-tuned on
    eval_texts: int = 64  # held-out paragraphs (other topics) the loss is measured on
    finetune_steps: int = 12  # optimizer steps of the short fine-tune after each init
    finetune_lr: float = 1e-3  # its peak learning rate
    batch_size: int = 8  # its sequences per step
    families: tuple[str, ...] = common.FAMILIES  # the families to compare
    calibrated_iters: tuple[int, ...] = (1,)  # with --model: the calibrated init's alternations T to compare too
    ablations: tuple[str, ...] = ("zero", "plain")  # with --model: "zero" (calibrated rounding, zero adapter),
    # "plain" (LoftQ's fit on calibrated rounding); "none": neither
    calibration_samples: int = 128  # training sequences the calibrated init reads


QUICK = Setup(iters=(1, 2), lora_rank=8, matrix=(128, 256), matrix_rank=8, hidden=64, layers=1, pretrain_steps=20,
              test_examples=32)
# SmolLM2-135M: every linear of the model adapted (the whole NF4 error is what LoftQ works on), 15 short
# fine-tunes (5 families x 3 inits) of 6 steps, each measured on 40 held-out paragraphs, over two worker processes:
# 16 minutes with an empty cache, the ten LoftQ inits computed first (8 steps and 48 paragraphs took 21)
REAL = Setup(lora_rank=8, model="smollm2", eval_texts=40, finetune_steps=6)
REAL_QUICK = Setup(iters=(1,), lora_rank=4, matrix=(128, 256), matrix_rank=8, model="smollm2",
                   targets=r"layers\.29\.self_attn\.(q|v)_proj", train_texts=8, eval_texts=4, finetune_steps=2,
                   batch_size=4, families=("lora",))
PRESETS = {(False, False): Setup(), (True, False): QUICK, (False, True): REAL, (True, True): REAL_QUICK}
KINDS = ("gaussian", "power-law spectrum", "power-law + outlier columns")


def parser() -> argparse.ArgumentParser:
    return common.experiment_parser(__doc__, Setup(), "runs/experiments/loftq", "loftq_init.png",
                                    "small matrices, a barely trained small base (with --model: one layer of it)")


# ---------------------------------------------------------------------------------------------------- matrices


def synthetic(kind: str, d_out: int, d_in: int, seed: int) -> torch.Tensor:
    """A (d_out, d_in) weight with entries of scale d_in^-1/2: i.i.d., or with singular values s_i ∝ i^-0.7
    (trained LLM layers decay more slowly than a low-rank matrix, far faster than noise), optionally with 1% of
    input columns scaled up 8x (the outlier features that make per-block absmax quantisation lossy)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        W = torch.randn(d_out, d_in, generator=g)
    else:
        k = min(d_out, d_in)
        U, _ = torch.linalg.qr(torch.randn(d_out, k, generator=g))
        V, _ = torch.linalg.qr(torch.randn(d_in, k, generator=g))
        W = U @ torch.diag(torch.arange(1, k + 1, dtype=torch.float32) ** -0.7) @ V.T
        if kind.endswith("outlier columns"):
            cols = torch.randperm(d_in, generator=g)[: max(1, d_in // 100)]
            W[:, cols] *= 8.0
    return W * (d_in**-0.5 / W.std())


def matrix_rows(setup: Setup) -> list[dict]:
    from qmor.adapters import build_adapter
    from qmor.model.loftq import loftq_layer

    d_out, d_in = setup.matrix
    configs = common.matched_configs([(d_in, d_out)], setup.matrix_rank, setup.mor_experts, setup.sira_experts,
                                     setup.sira_top_k)
    rows = []
    for kind in tqdm(KINDS, desc="matrices"):
        W = synthetic(kind, d_out, d_in, setup.seed)
        for family, (cfg, n) in configs.items():
            row = {"kind": kind, "family": family, "config": common.describe(cfg, [(d_in, d_out)]), "params": n}
            for T in setup.iters:
                torch.manual_seed(setup.seed)  # svd_lowrank draws random vectors
                _, plain, err = loftq_layer(W, build_adapter(cfg, d_in, d_out), _quant(), T)
                row["nf4"], row[f"T{T}"] = plain, err
            rows.append(row)
    return rows


def _quant():
    from qmor.config import QuantConfig

    return QuantConfig()


# ---------------------------------------------------------------------------------------------------- model


def pretrain(setup: Setup, out: Path) -> tuple[Path, list[dict]]:
    """The tiny base, trained in fp32 on `mix` for a few hundred steps (a plain full fine-tune, no adapters), so
    its weights carry some learnt structure; returns the saved folder and the loss curve."""
    from transformers import AutoModelForCausalLM

    from qmor.data.pipeline import DataConfig, build_datasets, collate
    from qmor.model.load import load_tokenizer

    base = common.tiny_base(out / "models", setup.seed, setup.hidden, setup.layers)
    tokenizer = load_tokenizer(str(base), False)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    train_set, _, _ = build_datasets(tokenizer, DataConfig(source="mix", num_examples=4000, max_len=64,
                                                           seed=setup.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=setup.pretrain_lr)
    g = torch.Generator().manual_seed(setup.seed)
    curve = []
    model.train()
    for step in tqdm(range(1, setup.pretrain_steps + 1), desc="fp32 pretraining", unit="step"):
        idx = torch.randint(len(train_set), (32,), generator=g).tolist()
        batch = collate([train_set[i] for i in idx], tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == setup.pretrain_steps:
            curve.append({"step": step, "loss": loss.item()})
    folder = out / "models" / "pretrained"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, curve


def test_examples(tokenizer, setup: Setup, out: Path) -> list[dict]:
    """Held-out `mix` examples (test split), tokenised by the project's own pipeline via a JSONL file."""
    from qmor.data import tasks
    from qmor.data.pipeline import DataConfig, build_datasets

    path = out / "mix_test.jsonl"
    recs = tasks.records("mix", "test", setup.test_examples, setup.seed)
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n" for r in recs))
    examples, _, _ = build_datasets(tokenizer, DataConfig(source=str(path), max_len=64, seed=setup.seed))
    return examples


def loss_of(model, examples: list[dict], pad_id: int) -> float:
    from qmor.training.evaluate import eval_loss
    from qmor.training.loss import ChunkedLoss

    return eval_loss(ChunkedLoss(model), examples, 64, pad_id, "cpu")


def model_rows(setup: Setup, out: Path) -> tuple[list[dict], dict]:
    from transformers import AutoModelForCausalLM

    from qmor.adapters.config import AdapterConfig
    from qmor.model.load import load_for_training, load_tokenizer

    folder, curve = pretrain(setup, out)
    tokenizer = load_tokenizer(str(folder), False)
    examples = test_examples(tokenizer, setup, out)
    pad = tokenizer.pad_token_id
    fp32 = loss_of(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32), examples, pad)
    shapes = common.target_shapes(folder)
    configs = common.matched_configs(shapes, setup.lora_rank, setup.mor_experts, setup.sira_experts,
                                     setup.sira_top_k)
    model, _, _ = load_for_training(str(folder), AdapterConfig(family="lora", r=setup.lora_rank), device="cpu")
    nf4 = loss_of(model, examples, pad)  # default init adds zero: this is plain NF4 for every family
    rows = []
    for family, (cfg, n) in tqdm(configs.items(), desc="LoftQ per family"):
        row = {"family": family, "config": common.describe(cfg, shapes), "params": n, "loss_nf4": nf4}
        for T in setup.iters:
            adapter = AdapterConfig(**{**vars(cfg), "init": "loftq", "loftq_iters": T})
            model, _, report = load_for_training(str(folder), adapter, device="cpu", cache_dir=out / "cache")
            row["err_nf4"] = report["mean_nf4"]
            row[f"err_T{T}"] = report["mean_loftq"]
            row[f"loss_T{T}"] = loss_of(model, examples, pad)
        rows.append(row)
    return rows, {"fp32_loss": fp32, "nf4_loss": nf4, "pretrain_curve": curve, "n_test": len(examples),
                  "shapes": shapes}


# ---------------------------------------------------------------------------------------------------- report


def tables(setup: Setup, mats: list[dict], rows: list[dict], info: dict) -> str:
    T = setup.iters
    mat = common.markdown_table(mats, {"kind": "matrix", "family": "family", "config": "config", "params": "params",
                                       "nf4": "plain NF4", **{f"T{t}": f"LoftQ T={t}" for t in T}})
    for r in rows:
        for t in T:
            gap = r["loss_nf4"] - info["fp32_loss"]
            r[f"closed_T{t}"] = (r["loss_nf4"] - r[f"loss_T{t}"]) / gap if abs(gap) > 1e-12 else 0.0
    model = common.markdown_table(rows, {
        "family": "family", "config": "config", "params": "params", "err_nf4": "weight err NF4",
        **{f"err_T{t}": f"weight err T={t}" for t in T}, "loss_nf4": "loss NF4",
        **{f"loss_T{t}": f"loss T={t}" for t in T}, **{f"closed_T{t}": f"gap closed T={t}" for t in T}},
        signed=tuple(f"closed_T{t}" for t in T))
    return (f"Synthetic {setup.matrix[0]}x{setup.matrix[1]} matrices, relative weight error "
            f"(matched to LoRA r={setup.matrix_rank}):\n\n{mat}\n\nTiny model trained in fp32 on mix, held-out "
            f"loss (fp32 model: {info['fp32_loss']:.4f}; plain NF4: {info['nf4_loss']:.4f}):\n\n{model}")


def plot(setup: Setup, mats: list[dict], rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    families = [r["family"] for r in rows]
    width = 0.8 / (1 + len(setup.iters))
    for ax, (title, keys, data) in zip(axes, [
        ("synthetic power-law + outlier matrix: weight error",
         ["nf4", *[f"T{t}" for t in setup.iters]], [m for m in mats if m["kind"] == KINDS[-1]]),
        ("tiny model: held-out loss at init", ["loss_nf4", *[f"loss_T{t}" for t in setup.iters]], rows),
    ], strict=True):
        for i, key in enumerate(keys):
            xs = [f + (i - len(keys) / 2 + 0.5) * width for f in range(len(families))]
            label = "plain NF4" if i == 0 else f"LoftQ T={key.rsplit('T', 1)[-1]}"
            ax.bar(xs, [d[key] for d in data], width, label=label)
        ax.set_xticks(range(len(families)), families)
        ax.set_title(title, fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
    axes[1].axhline(rows[0]["fp32"], color="black", linestyle="--", label="fp32 model")
    bottom = min(rows[0]["fp32"], *(r[f"loss_T{t}"] for r in rows for t in setup.iters))
    axes[1].set_ylim(bottom * 0.98, rows[0]["loss_nf4"] * 1.01)
    axes[1].legend(fontsize="small")
    plots.save(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup = common.setup_from(args, PRESETS)
    if not setup.iters or min(setup.iters) < 1:
        raise QmorError("--iters takes LoftQ alternation counts of at least 1, e.g. --iters 1 5")
    common.single_thread()
    out = common.new_output(args.out)
    start = time.time()
    path = Path(args.plot) if args.plot else out / "loftq_init.png"
    if setup.model != "tiny":  # the synthetic matrices do not depend on the model: the tiny run has them
        rows, info = loftq_real.rows(setup, out, args.workers)
        results = {"setup": vars(setup), "model": rows, **info, "hardware": common.hardware(),
                   "workers": args.workers, "wall_s": time.time() - start}
        loftq_real.plot(setup, rows, info, path)
        common.save_outputs(out, "loftq_init", results, loftq_real.table(setup, rows, info))
        print(f"wrote {path}; total {results['wall_s']:.0f} s")
        return 0
    mats = matrix_rows(setup)
    rows, info = model_rows(setup, out)
    for r in rows:
        r["fp32"] = info["fp32_loss"]
    text = tables(setup, mats, rows, info)
    results = {"setup": vars(setup), "matrices": mats, "model": rows, **info, "hardware": common.hardware(),
               "wall_s": time.time() - start}
    plot(setup, mats, rows, path)
    common.save_outputs(out, "loftq_init", results, text)
    print(f"wrote {path}; total {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(common.guarded(main)())
