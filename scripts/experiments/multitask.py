"""Multi-task learning, the setting MoR and SiRA claim to help: every adapter family at matched trainable parameters
learns the `mix` of the synthetic tasks (reverse, sort, add, upper) over a frozen 4-bit NF4 base, and is scored by
greedy decoding on each task's held-out test prompts (exact match and character accuracy per task).

    python scripts/experiments/multitask.py --out runs/experiments/multitask --plot docs/experiments_multitask.png
    python scripts/experiments/multitask.py --quick --out runs/quick/multitask      # smoke run
    python scripts/experiments/multitask.py --model smollm2 --out runs/experiments/multitask-smollm2 \
        --plot docs/experiments_multitask_smollm2.png                                   # a real pretrained base

With --alone-lr, one more run per task trains `alone_family` on that task alone (the same steps and batch), the
reference for what the mix costs each task.
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
    model: str = "tiny"  # the base: tiny (random, built from hidden/layers/seed), smollm2, a folder or a Hub id
    targets: str = "all-linear"  # the linears that get adapters (qmor's --targets)
    system: str = ""  # system prompt of every record ("": the chat template's own)
    families: tuple[str, ...] = common.FAMILIES  # the families to compare
    alone_family: str = "lora"  # the family trained on each task alone, for reference
    alone_lr: float = 0.0  # its learning rate (0: no single-task runs)


QUICK = Setup(train_examples=64, test_examples=16, steps=3, batch_size=8, eval_every=3, lora_rank=8, hidden=64,
              layers=1, lrs=(5e-3,))
# SmolLM2-135M on 2 CPU cores: adapters on the last 8 of 30 decoder layers and a short system prompt (see
# uuid_memorization.py), one pass of 30 steps of 12 and one scoring at the end, so that ten mixed and four
# single-task runs fit 20 minutes
REAL = Setup(train_examples=360, test_examples=80, steps=30, batch_size=12, eval_every=30, lora_rank=8,
             lrs=(5e-3, 1e-2), model="smollm2", targets=r"layers\.(2[2-9])\.", system="Do the task.",
             alone_lr=5e-3)
REAL_QUICK = Setup(train_examples=8, test_examples=4, steps=2, batch_size=4, eval_every=2, lora_rank=4,
                   lrs=(5e-3,), model="smollm2", targets=r"layers\.29\.self_attn\.(q|v)_proj",
                   system="Do the task.", families=("lora",), alone_lr=5e-3)
PRESETS = {(False, False): Setup(), (True, False): QUICK, (False, True): REAL, (True, True): REAL_QUICK}


def parser():
    return common.experiment_parser(__doc__, Setup(), "runs/experiments/multitask", "multitask.png",
                                    "a few steps on a smaller base")


def jobs(setup: Setup, out: Path) -> tuple[list, list[dict], dict]:
    from dataclasses import replace

    from qmor.data import tasks

    test = tasks.records("mix", "test", setup.test_examples, setup.seed)
    train = tasks.records("mix", "train", setup.train_examples, setup.seed)
    data = common.task_data(setup, out, "mix", train, max_len=64)
    todo, params, info = common.family_runs(setup, out, "mix", test, data, batch_size=setup.batch_size,
                                            log_steps=10)
    if setup.alone_lr:
        base = next(job[0] for job in todo if job[0].adapter.family == setup.alone_family)
        for task in MIX:
            alone = tasks.records(task, "train", setup.train_examples, setup.seed)
            cfg = replace(base, output=str(out / "runs" / f"{setup.alone_family}-{task}-alone"), lr=setup.alone_lr,
                          data=common.task_data(setup, out, task, alone, max_len=64))
            todo.append((cfg, common.with_system([r for r in test if r["task"] == task], setup.system),
                         setup.eval_every, task))
    return todo, params, {**info, "n_test": len(test)}


def mixed(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r["task"] == "mix"]


def table(runs: list[dict], params: list[dict]) -> str:
    n = {r["family"]: r["params"] for r in params}
    rows = []
    for r in mixed(runs):
        f = r["final"]
        row = {"family": r["family"], "lr": f"{r['lr']:g}", "params": n[r["family"]]}
        for t in MIX:
            row[t] = f"{f[f'exact_match/{t}']:.2f} / {f[f'char_accuracy/{t}']:.2f}"
        row.update(em=f["exact_match"], ca=f["char_accuracy"], wall=r["wall_s"])
        rows.append(row)
    alone = {r["task"]: r for r in runs if r["task"] != "mix"}
    if alone:  # the single-task reference runs: one row, each task's own run
        r = next(iter(alone.values()))
        row = {"family": f"{r['family']}, each task alone", "lr": f"{r['lr']:g}", "params": n.get(r["family"], "-")}
        for t in MIX:
            row[t] = f"{alone[t]['final']['exact_match']:.2f} / {alone[t]['final']['char_accuracy']:.2f}"
        row.update(em=sum(a["final"]["exact_match"] for a in alone.values()) / len(alone),
                   ca=sum(a["final"]["char_accuracy"] for a in alone.values()) / len(alone),
                   wall=sum(a["wall_s"] for a in alone.values()))
        rows.append(row)
    return common.markdown_table(rows, {"family": "family", "lr": "lr", "params": "trainable params",
                                        **{t: f"{t} EM / char" for t in MIX}, "em": "mean EM",
                                        "ca": "mean char acc", "wall": "wall s"})


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup = common.setup_from(args, PRESETS)
    if min(setup.train_examples, setup.test_examples, setup.steps, setup.eval_every) < 1 or not setup.lrs:
        raise QmorError("train-examples, test-examples, steps and eval-every must be at least 1, with one --lrs")
    if setup.alone_lr and setup.alone_family not in setup.families:
        raise QmorError(f"--alone-family {setup.alone_family} is not among --families; add it or pass --alone-lr 0")
    out, runs, results = common.compare(args, setup, jobs)
    path = Path(args.plot) if args.plot else out / "multitask.png"
    best = {}
    for r in mixed(runs):  # the plot shows each family at its best learning rate (by mean character accuracy)
        if r["family"] not in best or r["final"]["char_accuracy"] > best[r["family"]]["final"]["char_accuracy"]:
            best[r["family"]] = r
    series = {f: [r["final"][f"char_accuracy/{t}"] for t in MIX] for f, r in best.items()}
    alone = {r["task"]: r for r in runs if r["task"] != "mix"}
    if alone:
        series[f"{setup.alone_family}, each task alone"] = [alone[t]["final"]["char_accuracy"] for t in MIX]
    plots.bars(list(MIX), series, "character accuracy (held-out, greedy)", path,
               f"mix of {len(MIX)} tasks, {setup.steps} steps, {setup.model} 4-bit base (seed {setup.seed})")
    common.save_outputs(out, "multitask", results, table(runs, results["params"]))
    print(f"wrote {path}; total {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(common.guarded(main)())
