"""Multi-task learning, the setting MoR and SiRA claim to help: every adapter family at matched trainable parameters
learns the `mix` of the synthetic tasks (reverse, sort, add, upper) over a frozen 4-bit NF4 base, and is scored by
greedy decoding on each task's held-out test prompts (exact match and character accuracy per task).

    python scripts/experiments/multitask.py --out runs/experiments/multitask --plot docs/experiments_multitask.png
    python scripts/experiments/multitask.py --quick --out runs/quick/multitask      # smoke run
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import common
import plots

from qmor.data.tasks import MIX
from qmor.errors import QmorError


@dataclass
class Setup:
    train_examples: int = 2000  # `mix` training records (a quarter per task)
    test_examples: int = 200  # held-out `mix` test records (a quarter per task), never trained on
    steps: int = 250  # optimizer steps per run
    batch_size: int = 16  # sequences per step
    eval_every: int = 50  # score the test set every this many steps
    lrs: tuple[float, ...] = (2e-3, 5e-3)  # peak learning rates, each run for every family
    lora_rank: int = 10  # reference LoRA rank; the other families are matched to its parameter count
    mor_experts: int = 4  # MoR experts N
    sira_experts: int = 4  # SiRA experts E
    sira_top_k: int = 2  # SiRA experts per token
    hidden: int = 128  # tiny base width
    layers: int = 2  # tiny base depth
    seed: int = 0  # seed of the base, the records, the data order and the adapters' init


QUICK = Setup(train_examples=64, test_examples=16, steps=3, batch_size=8, eval_every=3, lora_rank=8, hidden=64,
              layers=1, lrs=(5e-3,))


def parser():
    return common.experiment_parser(__doc__, Setup(), "runs/experiments/multitask", "multitask.png",
                                    "a few steps on a smaller base")


def jobs(setup: Setup, out: Path) -> tuple[list, list[dict], dict]:
    from qmor.data import tasks
    from qmor.data.pipeline import DataConfig

    test = tasks.records("mix", "test", setup.test_examples, setup.seed)
    data = DataConfig(source="mix", num_examples=setup.train_examples, max_len=64, seed=setup.seed)
    todo, params, info = common.family_runs(setup, out, "mix", test, data, batch_size=setup.batch_size,
                                            log_steps=10)
    return todo, params, {**info, "n_test": len(test)}


def table(runs: list[dict], params: list[dict]) -> str:
    n = {r["family"]: r["params"] for r in params}
    rows = []
    for r in runs:
        f = r["final"]
        row = {"family": r["family"], "lr": f"{r['lr']:g}", "params": n[r["family"]]}
        for t in MIX:
            row[t] = f"{f[f'exact_match/{t}']:.2f} / {f[f'char_accuracy/{t}']:.2f}"
        row.update(em=f["exact_match"], ca=f["char_accuracy"], wall=r["wall_s"])
        rows.append(row)
    return common.markdown_table(rows, {"family": "family", "lr": "lr", "params": "trainable params",
                                        **{t: f"{t} EM / char" for t in MIX}, "em": "mean EM",
                                        "ca": "mean char acc", "wall": "wall s"})


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup = common.setup_from(args, Setup(), QUICK)
    if min(setup.train_examples, setup.test_examples, setup.steps, setup.eval_every) < 1 or not setup.lrs:
        raise QmorError("train-examples, test-examples, steps and eval-every must be at least 1, with one --lrs")
    out, runs, results = common.compare(args, setup, jobs)
    path = Path(args.plot) if args.plot else out / "multitask.png"
    best = {}
    for r in runs:  # the plot shows each family at its best learning rate (by mean character accuracy)
        if r["family"] not in best or r["final"]["char_accuracy"] > best[r["family"]]["final"]["char_accuracy"]:
            best[r["family"]] = r
    plots.bars(list(MIX), {f: [r["final"][f"char_accuracy/{t}"] for t in MIX] for f, r in best.items()},
               "character accuracy (held-out, greedy)", path,
               f"mix of {len(MIX)} tasks, {setup.steps} steps, tiny 4-bit base (seed {setup.seed})")
    common.save_outputs(out, "multitask", results, table(runs, results["params"]))
    print(f"wrote {path}; total {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(common.guarded(main)())
