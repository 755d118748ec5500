"""LoftQ on a pretrained model (`loftq_init.py --model ...`): for every family and init (plain NF4 = T0, LoftQ at
each T in iters, the calibrated init at each T in calibrated_iters: C1, ..., and its ablations: Czero, calibrated
rounding with the adapter left at zero, and Cplain<T>, LoftQ's plain fit on calibrated rounding), the mean
per-layer NF4 weight error, the loss on held-out prose at init, and the loss after the same short fine-tune.
The calibrated init reads the first training sequences, as `qmor train` does.

The prose is Python's own documentation (`pydoc_data.topics`, shipped with every Python): a quarter of its topics
are held out for the loss, the others feed the fine-tune, so the two never share a paragraph.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import common
import plots
import torch


def paragraphs(topics: list[str]) -> list[str]:
    """Prose paragraphs of 100-300 characters (about 25-75 tokens) from the given documentation topics."""
    from pydoc_data.topics import topics as docs

    out = []
    for name in topics:
        for block in re.split(r"\n\s*\n", docs[name]):
            text = " ".join(block.split())
            if 100 <= len(text) <= 300 and text[0].isalpha():
                out.append(text)
    return out


def prose(setup, out: Path) -> tuple[str, str]:
    """JSONL files (text format) of training and held-out paragraphs, from disjoint topics."""
    from pydoc_data.topics import topics as docs

    names = sorted(docs)
    kept = paragraphs(names[::4])[: setup.eval_texts]
    train = paragraphs([n for i, n in enumerate(names) if i % 4])[: setup.train_texts]
    return (common.records_file(out / "data" / "docs-train.jsonl", [{"text": t} for t in train]),
            common.records_file(out / "data" / "docs-heldout.jsonl", [{"text": t} for t in kept]))


def held_out(model_path: str, path: str, setup) -> tuple[list[dict], int]:
    """The held-out paragraphs tokenised once (text format) and the pad id."""
    from qmor.data.pipeline import DataConfig, build_datasets
    from qmor.model.load import load_tokenizer

    tokenizer = load_tokenizer(model_path, False)
    examples, _, _ = build_datasets(tokenizer, DataConfig(source=path, format="text", max_len=64, seed=setup.seed))
    return examples, tokenizer.pad_token_id


def loss_on(model, examples: list[dict], pad_id: int) -> float:
    from qmor.training.evaluate import eval_loss
    from qmor.training.loss import ChunkedLoss

    return eval_loss(ChunkedLoss(model), examples, 16, pad_id, "cpu")


def variants(setup) -> list[tuple[str, int, str, dict]]:
    """(label, T, init, recipe fields) of every init compared."""
    out = [("T0", 0, "default", {})] + [(f"T{t}", t, "loftq", {}) for t in setup.iters]
    out += [(f"C{t}", t, "calibrated", {}) for t in setup.calibrated_iters]
    if "zero" in setup.ablations:
        out.append(("Czero", 1, "calibrated", {"fit": "zero"}))
    if "plain" in setup.ablations:
        out += [(f"Cplain{t}", t, "calibrated", {"fit": "plain"}) for t in setup.calibrated_iters]
    return out


def calibration(cfg) -> list:
    """The calibration sequences `qmor train` reads for this config (so the fine-tune's load hits the cache)."""
    from qmor.data.pipeline import build_datasets
    from qmor.model.load import load_tokenizer
    from qmor.training.calibration import calibration_ids

    tokenizer = load_tokenizer(cfg.model, False)
    return calibration_ids(cfg, build_datasets(tokenizer, cfg.data)[0], tokenizer)


def run(job: tuple) -> dict:
    """One (family, init) cell: load with the init, measure; fine-tune through qmor.training.loop; measure again.
    The init is cached, so the fine-tune's own load reuses the first one's."""
    from qmor.model import calibrated
    from qmor.model.load import load_for_training
    from qmor.training.loop import train

    cfg, label, recipe, held_out_file, setup = job
    common.single_thread()
    calibrated.RECIPE = calibrated.Recipe(**recipe)  # this worker's cells only; the cache key holds the recipe
    start = time.time()
    examples, pad = held_out(cfg.model, held_out_file, setup)
    ids = calibration(cfg) if cfg.adapter.init == "calibrated" else None
    model, _, report = load_for_training(cfg.model, cfg.adapter, device="cpu", calibration=ids)
    init_s = time.time() - start
    row = {"family": cfg.adapter.family, "T": label, "loss_init": loss_on(model, examples, pad), "init_s": init_s,
           "err_nf4": report["mean_nf4"] if report else None, "err": report["mean_loftq"] if report else None,
           "act_nf4": report.get("mean_act_nf4") if report else None,
           "act": report.get("mean_act") if report else None,
           "init_wall_s": report.get("wall_s") if report else None}
    del model
    after = {}

    def measure(step: int, model) -> None:
        if step == cfg.max_steps:
            after["loss"] = loss_on(model, examples, pad)

    result = train(cfg, on_step=measure)
    return {**row, "loss_after": after["loss"], "train_loss": result["loss"], "wall_s": time.time() - start}


def rows(setup, out: Path, workers: int) -> tuple[list[dict], dict]:
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from qmor.data.pipeline import DataConfig
    from qmor.training.config import TrainConfig

    base = common.base_model(setup, out)
    train_path, held_out_file = prose(setup, out)
    full = loss_on(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                   *held_out(str(base), held_out_file, setup))
    shapes = common.target_shapes(base, setup.targets)
    configs = common.matched_configs(shapes, setup.lora_rank, setup.mor_experts, setup.sira_experts,
                                     setup.sira_top_k, targets=setup.targets)
    jobs = []
    for family, (adapter, _) in configs.items():
        if family not in setup.families:
            continue
        for label, T, kind, recipe in variants(setup):
            init = adapter if kind == "default" else replace(adapter, init=kind, loftq_iters=T,
                                                              calibration_samples=setup.calibration_samples)
            cfg = TrainConfig(model=str(base), output=str(out / "runs" / f"{family}-{label}"), adapter=init,
                              data=DataConfig(source=train_path, format="text", max_len=64, seed=setup.seed),
                              lr=setup.finetune_lr, max_steps=setup.finetune_steps, batch_size=setup.batch_size,
                              grad_accum=1, warmup_ratio=0.05, save_steps=0, eval_generate=0, log_steps=1,
                              seed=setup.seed, gradient_checkpointing=False, device="cpu")
            jobs.append((cfg, label, recipe, held_out_file, setup))
    cells = common.run_all(run, jobs, workers)
    out_rows = []
    for family, (adapter, n) in configs.items():
        mine = {c["T"]: c for c in cells if c["family"] == family}
        if not mine:
            continue
        known = [c for c in mine.values() if c["err_nf4"] is not None]
        row = {"family": family, "config": common.describe(adapter, shapes), "params": n,
               "err_nf4": known[0]["err_nf4"] if known else None}
        for label, c in mine.items():
            row[f"err_{label}"] = row["err_nf4"] if label == "T0" else c["err"]
            row[f"loss_{label}"], row[f"after_{label}"] = c["loss_init"], c["loss_after"]
            row[f"wall_{label}"], row[f"act_{label}"] = c["wall_s"], c["act"]
            row[f"init_{label}"] = c["init_wall_s"]
        out_rows.append(row)
    return out_rows, {"full_loss": full, "shapes": shapes, "cells": cells, "train_file": train_path,
                      "held_out_file": held_out_file}


def table(setup, rows: list[dict], info: dict) -> str:
    labels = [v[0] for v in variants(setup)]
    for r in rows:
        gap = r["loss_T0"] - info["full_loss"]
        for t in labels[1:]:
            r[f"closed_{t}"] = (r["loss_T0"] - r[f"loss_{t}"]) / gap if abs(gap) > 1e-12 else 0.0
    columns = {"family": "family", "config": "config", "params": "params",
               **{f"err_{t}": f"weight err {t}" for t in labels}, **{f"loss_{t}": f"loss at init {t}" for t in labels},
               **{f"closed_{t}": f"NF4 gap closed {t}" for t in labels[1:]},
               **{f"after_{t}": f"loss after fine-tune {t}" for t in labels}}
    return (f"{setup.model}: held-out loss of the unquantised model {info['full_loss']:.4f}; T0 is plain NF4, T<n> "
            "LoftQ, C<n> calibrated, Czero calibrated rounding with a zero adapter, Cplain<n> LoftQ's fit on "
            f"calibrated rounding. Fine-tune: {setup.finetune_steps} steps of {setup.batch_size} at lr "
            f"{setup.finetune_lr:g}, seed {setup.seed}.\n\n"
            + common.markdown_table(rows, columns, signed=tuple(f"closed_{t}" for t in labels[1:])))


def plot(setup, rows: list[dict], info: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    Ts = [v[0] for v in variants(setup)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    families = [r["family"] for r in rows]
    width = 0.8 / len(Ts)
    for ax, (title, key) in zip(axes, [("mean per-layer weight error", "err_"), ("held-out loss at init", "loss_"),
                                       ("held-out loss after the fine-tune", "after_")], strict=True):
        for i, t in enumerate(Ts):
            xs = [f + (i - len(Ts) / 2 + 0.5) * width for f in range(len(families))]
            ax.bar(xs, [r[f"{key}{t}"] for r in rows], width, label="plain NF4" if t == "T0" else t)
        values = [r[f"{key}{t}"] for r in rows for t in Ts]
        if key != "err_":
            ax.axhline(info["full_loss"], color="black", linestyle="--", label="unquantised model")
            values.append(info["full_loss"])
        spread = max(values) - min(values)
        ax.set_ylim(min(values) - spread * 0.3, max(values) + spread * 0.3)
        ax.set_xticks(range(len(families)), families)
        ax.set_title(title, fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize="small")
    fig.suptitle(f"LoftQ and the calibrated init on {setup.model}, {len(info['shapes'])} adapted linears, "
                 f"seed {setup.seed}")
    plots.save(fig, path)
