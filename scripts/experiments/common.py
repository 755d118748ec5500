"""Shared pieces of the experiment scripts: the tiny base, matched-parameter configs, a scored training run,
tables, plots and the one-line error convention.

Every run goes through `qmor.training.loop.train`; the periodic greedy-decoding scores come from its `on_step` hook.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm import tqdm

from qmor.adapters import ADAPTERS
from qmor.errors import QmorError
from qmor.training.run_dir import RunDir

FAMILIES = tuple(ADAPTERS)  # every registered family takes part


def single_thread() -> None:
    """bitsandbytes' CPU 4-bit kernels run 20-40x slower with two OpenMP threads than with one on a busy 2-core
    machine (measured: 30 ms vs 0.7 ms per 128x352 layer call), so every run is single-threaded and runs are
    spread over processes instead."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def hardware() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


# ---------------------------------------------------------------------------------------------------- the base


def tiny_base(folder: Path, seed: int, hidden: int, layers: int) -> Path:
    from qmor.model.tiny import make_tiny

    return make_tiny(folder / f"tiny-h{hidden}-l{layers}-s{seed}", seed, hidden=hidden, layers=layers)


def base_model(setup, out: Path) -> Path:
    """The comparison's frozen base: the seeded tiny random model, or `setup.model` (a built-in such as smollm2, a
    local folder or a Hub id from the cache), whose own weights the seed does not touch."""
    from qmor.model.base import Base

    if setup.model == "tiny":
        return tiny_base(out / "models", setup.seed, setup.hidden, setup.layers)
    return Path(Base.resolve(setup.model).path)


def target_shapes(model_path: str | Path, targets: str = "all-linear") -> list[tuple[int, int]]:
    """(d_in, d_out) of every linear the adapter wraps for `targets`, read without loading any weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qmor.adapters.attach import find_targets

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return [(m.in_features, m.out_features) for m in (model.get_submodule(n) for n in find_targets(model, targets))]


def with_system(records: list[dict], system: str) -> list[dict]:
    """The records with a system prompt: a short one replaces a chat template's default (SmolLM2's costs 20 tokens
    of every sequence)."""
    return [{**r, "system": system} for r in records] if system else records


def records_file(path: Path, records: list[dict]) -> str:
    """`records` as a JSONL training file (what a task's records become once they carry a system prompt)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ---------------------------------------------------------------------------------------------------- matching


def count(cfg, shapes: list[tuple[int, int]]) -> int:
    from qmor.adapters import check_family

    return sum(check_family(cfg.family).module.num_params(d_in, d_out, cfg.hyperparams) for d_in, d_out in shapes)


def matched_configs(shapes: list[tuple[int, int]], lora_rank: int, mor_experts: int, sira_experts: int,
                    sira_top_k: int, **fields) -> dict[str, tuple]:
    """family -> (AdapterConfig, trainable parameters): for each family the rank whose total parameter count over
    `shapes` is closest to LoRA's at `lora_rank` (MoR and SiRA keep their expert counts fixed)."""
    from qmor.adapters.config import AdapterConfig

    target = count(AdapterConfig(family="lora", r=lora_rank), shapes)
    limit = min(min(s) for s in shapes)
    out = {}
    for family in FAMILIES:
        extra = {"mor": {"experts": mor_experts}, "sira": {"experts": sira_experts, "top_k": sira_top_k}}
        options = [AdapterConfig(family=family, r=r, options=extra.get(family), **fields) for r in range(1, limit + 1)]
        if family == "mora":
            options = [AdapterConfig(family="mora", r=lora_rank, **fields)]  # r_hat follows r by construction
        best = min(options, key=lambda c: abs(count(c, shapes) - target))
        out[family] = (best, count(best, shapes))
    return out


def describe(cfg, shapes: list[tuple[int, int]] | None = None) -> str:
    if cfg.family == "mora":
        from qmor.adapters.mora import mora_kind, mora_rank

        kind = mora_kind(cfg.hyperparams)
        hats = sorted({mora_rank(d_in, d_out, cfg.r, kind) for d_in, d_out in shapes or []})
        return f"r={cfg.r} ({kind}, r_hat {'/'.join(map(str, hats))})"
    if cfg.family == "mor":
        return f"r={cfg.r}, N={cfg.options.experts}"
    if cfg.family == "sira":
        return f"r={cfg.r}, E={cfg.options.experts}, k={cfg.options.top_k}"
    return f"r={cfg.r}"


def param_rows(configs: dict[str, tuple], shapes) -> list[dict]:
    lora = configs["lora"][1]
    return [{"family": f, "config": describe(c, shapes), "params": n, "vs_lora": n / lora - 1}
            for f, (c, n) in configs.items()]


# ---------------------------------------------------------------------------------------------------- scoring


class Scorer:
    """Greedy-decodes the answers to `records` and scores them with `qmor.data.tasks.score`; called from train's
    on_step hook every `every` steps (and at `last`), keeping the curve."""

    def __init__(self, tokenizer, records: list[dict], every: int, last: int, task: str, loss_file: str | None = None):
        from qmor.data.pipeline import DataConfig, build_datasets, prompt_text
        from qmor.data.template import encode

        self.tokenizer, self.records, self.every, self.last, self.task = tokenizer, records, every, last, task
        self.prompts = [prompt_text(tokenizer, r) for r in records]
        self.refs = [r["completion"] for r in records]
        self.max_new = max(len(encode(tokenizer, r)) for r in self.refs) + 4
        self.curve: list[dict] = []
        self.seconds = 0.0  # time spent scoring, left out of the training time
        self.loss_examples = (build_datasets(tokenizer, DataConfig(source=loss_file, max_len=128))[0]
                              if loss_file else None)  # held-out records whose loss is measured too

    def score(self, model) -> dict:
        from qmor.data import tasks
        from qmor.training.evaluate import generate

        start = time.time()
        preds = generate(model, self.tokenizer, self.prompts, self.max_new, batch_size=64)
        result = tasks.score(self.task, preds, self.refs, [r["task"] for r in self.records])
        if self.loss_examples:
            from qmor.training.evaluate import eval_loss
            from qmor.training.loss import ChunkedLoss

            result["eval_loss"] = eval_loss(ChunkedLoss(model), self.loss_examples, 32, self.tokenizer.pad_token_id,
                                            "cpu")
        self.seconds += time.time() - start
        result["sample"] = {"prompt": self.records[0]["prompt"], "reference": self.refs[0], "prediction": preds[0]}
        return result

    def __call__(self, step: int, model) -> None:
        if step % self.every == 0 or step == self.last:
            self.curve.append({"step": step, **self.score(model)})
            tqdm.write(f"step {step}: character accuracy {self.curve[-1]['char_accuracy']:.3f}, exact match "
                       f"{self.curve[-1]['exact_match']:.3f} ({self.task}, {len(self.refs)} examples)")


def scored_run(job: tuple) -> dict:
    """Train job = (cfg, scorer_records, every, task[, loss_file]) through qmor.training.loop, scoring greedy answers
    on `scorer_records` (and the loss of the records in `loss_file`) every `every` steps (one picklable argument,
    for the process pool)."""
    from qmor.model.load import load_tokenizer
    from qmor.training.loop import train

    cfg, scorer_records, every, task, *loss_file = job
    single_thread()
    tokenizer = load_tokenizer(cfg.model, False)
    scorer = Scorer(tokenizer, scorer_records, every, cfg.max_steps, task, *loss_file)
    start = time.time()
    result = train(cfg, on_step=scorer)
    wall = time.time() - start
    losses = [e for e in RunDir(cfg.output).read_events() if e.get("event") == "train"]
    return {"family": cfg.adapter.family, "lr": cfg.lr, "task": task, "curve": scorer.curve, "final": scorer.curve[-1],
            "losses": [{"step": e["step"], "loss": e["loss"]} for e in losses], "train_loss": result["loss"],
            "wall_s": wall, "score_s": scorer.seconds}


def run_all(fn: Callable, jobs: list, workers: int) -> list:
    """fn(job) for every job, over `workers` spawned processes (1: in this process), results in job order."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(fn, jobs))


# ---------------------------------------------------------------------------------------------------- output


def fmt(value, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:+.1%}" if digits < 0 else f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown_table(rows: list[dict], columns: dict[str, str], signed: tuple[str, ...] = ()) -> str:
    """A markdown table of `rows`; `columns` maps row keys to headers, `signed` keys print as +x.x%."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row[k], -1 if k in signed else 3) for k in columns) + " |")
    return "\n".join(lines)


def save_outputs(out: Path, name: str, results: dict, table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    (out / f"{name}.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out / (name + '.json')} and {out / (name + '.md')}")


def new_output(path: str) -> Path:
    out = Path(path)
    if out.exists() and any(out.iterdir()):
        raise QmorError(f"output folder {out} is not empty; choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def guarded(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Bad input becomes one `error: ...` line and exit status 2."""

    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except QmorError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapped


def experiment_parser(doc: str, setup, out: str, plot: str, quick: str, workers: bool = True):
    """The flags every comparison script shares; one --name per field of its Setup dataclass overrides it."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=out, help="folder for runs, JSON and table (must be empty)")
    p.add_argument("--plot", help=f"where to write the plot (default: OUT/{plot})")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {quick}")
    if workers:
        p.add_argument("--workers", type=int, default=2, help="runs in parallel, one process each (default 2)")
    for name, default in vars(setup).items():
        many = isinstance(default, tuple)
        kind = type(default[0]) if many else type(default)
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, nargs="+" if many else None,
                       default=argparse.SUPPRESS, help=f"default {default}")
    return p


def matched_base(setup, out: Path) -> tuple[Path, list[tuple[int, int]], dict[str, tuple]]:
    """The base of a comparison, its adapted shapes, and each of `setup.families` sized to the reference LoRA's
    parameter count on `setup.targets`."""
    base = base_model(setup, out)
    shapes = target_shapes(base, setup.targets)
    configs = matched_configs(shapes, setup.lora_rank, setup.mor_experts, setup.sira_experts, setup.sira_top_k,
                              targets=setup.targets)
    return base, shapes, {f: c for f, c in configs.items() if f in setup.families}


def setup_from(args, presets: dict[tuple[bool, bool], object]):
    """The Setup to run: the preset for (--quick, a real model given by --model), with every field given on the
    command line on top. A real base needs other defaults (a short system prompt, fewer target layers and steps)
    for the runs to fit a laptop CPU."""
    default = presets[(False, False)]
    given = {k: tuple(v) if isinstance(getattr(default, k), tuple) else v
             for k, v in vars(args).items() if k in vars(default)}
    preset = presets[(bool(args.quick), given.get("model", "tiny") != "tiny")]
    setup = type(default)(**{**vars(preset), **given})
    unknown = sorted(set(setup.families) - set(FAMILIES))
    if unknown or not setup.families:
        raise QmorError(f"unknown --families {' '.join(unknown) or '(none)'}; choose from {' '.join(FAMILIES)}")
    return setup


def task_data(setup, out: Path, task: str, records: list[dict], max_len: int):
    """The DataConfig that trains on `records` (made by `qmor.data.tasks.records(task, "train", n, setup.seed)`):
    the built-in task itself, or a JSONL of the records once they carry `setup.system`."""
    from qmor.data.pipeline import DataConfig

    if not setup.system:
        return DataConfig(source=task, num_examples=len(records), max_len=max_len, seed=setup.seed)
    path = records_file(out / "data" / f"{task}-train.jsonl", with_system(records, setup.system))
    return DataConfig(source=path, max_len=max_len, seed=setup.seed)


def family_runs(setup, out: Path, task: str, records: list[dict], data, **train) -> tuple[list, list[dict], dict]:
    """One scored run per (learning rate, family) on the matched tiny base: the jobs, the parameter table rows and
    the shapes. `train` holds the TrainConfig fields that differ between experiments."""
    from qmor.training.config import TrainConfig

    base, shapes, configs = matched_base(setup, out)
    todo = [(TrainConfig(model=str(base), output=str(out / "runs" / f"{family}-lr{lr:g}"), adapter=adapter,
                         data=data, lr=lr, max_steps=setup.steps, grad_accum=1, warmup_ratio=0.05, save_steps=0,
                         eval_generate=0, seed=setup.seed, gradient_checkpointing=False, device="cpu", **train),
             with_system(records, setup.system), setup.eval_every, task)
            for lr in setup.lrs for family, (adapter, _) in configs.items()]
    params = param_rows(configs, shapes)
    print(markdown_table(params, {"family": "family", "config": "config", "params": "trainable params",
                                  "vs_lora": "vs LoRA"}, signed=("vs_lora",)))
    return todo, params, {"shapes": shapes}


def compare(args, setup, jobs: Callable) -> tuple[Path, list[dict], dict]:
    """The body every family comparison shares: make the jobs in a fresh output folder, run them over the worker
    processes, and gather the results; returns the folder, the runs and the results to save."""
    single_thread()
    out = new_output(args.out)
    start = time.time()
    todo, params, info = jobs(setup, out)
    runs = run_all(scored_run, todo, args.workers)
    return out, runs, {"setup": vars(setup), "params": params, "runs": runs, "hardware": hardware(),
                       "workers": args.workers, "wall_s": time.time() - start, **info}
