"""UUID memorisation (MoRA paper, section 3, scaled down): every adapter family at matched trainable parameters
learns N random UUID key -> value pairs over a frozen 4-bit NF4 base; character accuracy of the greedily decoded
values is plotted against training steps, for each learning rate.

    python scripts/experiments/uuid_memorization.py --out runs/experiments/uuid --plot docs/experiments_uuid.png
    python scripts/experiments/uuid_memorization.py --quick --out runs/quick/uuid     # smoke run, well under a minute
    python scripts/experiments/uuid_memorization.py --model smollm2 --out runs/experiments/uuid-smollm2 \
        --plot docs/experiments_uuid_smollm2.png                                        # a real pretrained base
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import common
import plots

from qmor.errors import QmorError


@dataclass
class Setup:
    pairs: int = 32  # UUID key -> value pairs to memorise (the paper: 10,000)
    steps: int = 120  # optimizer steps per run
    batch_size: int = 16  # sequences per step
    eval_every: int = 10  # score greedy answers every this many steps
    lrs: tuple[float, ...] = (2e-3, 5e-3)  # peak learning rates, each run for every family
    lora_rank: int = 10  # reference LoRA rank; the other families are matched to its parameter count
    mor_experts: int = 4  # MoR experts N
    sira_experts: int = 4  # SiRA experts E
    sira_top_k: int = 2  # SiRA experts per token
    hidden: int = 128  # tiny base width
    layers: int = 2  # tiny base depth
    seed: int = 0  # seed of the base, the pairs, the data order and the adapters' init
    model: str = "tiny"  # the base: tiny (random, built from hidden/layers/seed), smollm2, a folder or a Hub id
    targets: str = "all-linear"  # the linears that get adapters (qmor's --targets)
    system: str = ""  # system prompt of every record ("": the chat template's own)
    families: tuple[str, ...] = common.FAMILIES  # the families to compare


QUICK = Setup(pairs=4, steps=3, batch_size=4, eval_every=3, lrs=(5e-3,), lora_rank=8, hidden=64, layers=1)
# SmolLM2-135M on 2 CPU cores: adapters on the last 8 of 30 decoder layers (backward stops there: 1.8x faster per
# step than all layers), a short system prompt, and 8 pairs seen 16 times, so that ten runs fit 20 minutes; below
# 5e-3 no family memorises in this budget
REAL = Setup(pairs=8, steps=32, batch_size=4, eval_every=8, lrs=(5e-3, 1e-2), lora_rank=8, model="smollm2",
             targets=r"layers\.(2[2-9])\.", system="Recall the value.")
REAL_QUICK = Setup(pairs=2, steps=2, batch_size=2, eval_every=2, lrs=(5e-3,), lora_rank=4, model="smollm2",
                   targets=r"layers\.29\.self_attn\.(q|v)_proj", system="Recall the value.")
PRESETS = {(False, False): Setup(), (True, False): QUICK, (False, True): REAL, (True, True): REAL_QUICK}


def parser():
    return common.experiment_parser(__doc__, Setup(), "runs/experiments/uuid", "uuid_memorization.png",
                                    "a few pairs and steps (with --model: on one layer of it)")


def jobs(setup: Setup, out: Path) -> tuple[list, list[dict], dict]:
    from qmor.data import tasks

    records = tasks.records("uuid", "train", setup.pairs, setup.seed)
    data = common.task_data(setup, out, "uuid", records, max_len=96 if setup.model == "tiny" else 128)
    return common.family_runs(setup, out, "uuid", records, data, batch_size=min(setup.batch_size, setup.pairs),
                              log_steps=max(1, setup.eval_every // 2))


def steps_to(curve: list[dict], level: float) -> int | None:
    return next((p["step"] for p in curve if p["char_accuracy"] >= level), None)


def table(runs: list[dict], params: list[dict]) -> str:
    n = {r["family"]: r["params"] for r in params}
    rows = [{"family": r["family"], "lr": f"{r['lr']:g}", "params": n[r["family"]],
             "mid": next((p["char_accuracy"] for p in r["curve"] if p["step"] >= r["curve"][-1]["step"] // 2),
                         0.0),
             "final": r["final"]["char_accuracy"], "em": r["final"]["exact_match"],
             "to50": steps_to(r["curve"], 0.5) or "-", "loss": r["train_loss"], "wall": r["wall_s"]}
            for r in runs]
    half = runs[0]["curve"][-1]["step"] // 2
    return common.markdown_table(rows, {"family": "family", "lr": "lr", "params": "trainable params",
                                        "mid": f"char acc @ step {half}", "final": "char acc (final)",
                                        "em": "exact match (final)", "to50": "steps to 50% char acc",
                                        "loss": "train loss (last window)", "wall": "wall s"})


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup = common.setup_from(args, PRESETS)
    if setup.pairs < 1 or setup.steps < 1 or setup.eval_every < 1 or not setup.lrs:
        raise QmorError("pairs, steps and eval-every must be at least 1 and at least one --lrs value given")
    out, runs, results = common.compare(args, setup, jobs)
    plot = Path(args.plot) if args.plot else out / "uuid_memorization.png"
    plots.curves(runs, "char_accuracy", "character accuracy (greedy)", plot,
                 f"UUID memorisation, {setup.pairs} pairs, {setup.model} 4-bit base (seed {setup.seed})")
    common.save_outputs(out, "uuid_memorization", results, table(runs, results["params"]))
    print(f"wrote {plot}; total {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(common.guarded(main)())
