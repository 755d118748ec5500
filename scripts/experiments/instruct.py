"""Instruction following, the MoSLoRA paper's setting: LoRA against MoSLoRA (and any other --families) at matched
trainable parameters, on short natural-language instructions with one right answer each, scored on a held-out split
whose words and numbers never occur in training: held-out loss, exact match and character accuracy per kind.

    python scripts/experiments/instruct.py --model smollm2 --out runs/experiments/instruct-smollm2 \
        --plot docs/experiments_instruct_smollm2.png
    python scripts/experiments/instruct.py --quick --out runs/quick/instruct        # smoke run (tiny base)
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import common
import plots

from qmor.errors import QmorError


@dataclass
class Setup:
    train_examples: int = 480  # training instructions (the kinds in turn)
    test_examples: int = 96  # held-out instructions, on words and numbers training never uses
    steps: int = 30  # optimizer steps per run
    batch_size: int = 16  # sequences per step
    eval_every: int = 15  # score the held-out split every this many steps
    lrs: tuple[float, ...] = (2e-3, 5e-3)  # peak learning rates, each run for every family
    lora_rank: int = 8  # reference LoRA rank; the other families are matched to its parameter count
    mor_experts: int = 4  # MoR experts N
    sira_experts: int = 4  # SiRA experts E
    sira_top_k: int = 2  # SiRA experts per token
    hidden: int = 128  # tiny base width
    layers: int = 2  # tiny base depth
    seed: int = 0  # seed of the base (tiny), the instructions, the data order and the adapters' init
    model: str = "tiny"  # the base: tiny (random, built from hidden/layers/seed), smollm2, a folder or a Hub id
    targets: str = "all-linear"  # the linears that get adapters (qmor's --targets)
    system: str = ""  # system prompt of every record ("": the chat template's own)
    families: tuple[str, ...] = ("lora", "moslora")  # the families to compare


QUICK = Setup(train_examples=16, test_examples=8, steps=2, batch_size=4, eval_every=2, lrs=(5e-3,), lora_rank=4,
              hidden=64, layers=1)
# SmolLM2-135M on 2 CPU cores: the last 8 of its 30 decoder layers and a short system prompt (see
# uuid_memorization.py)
REAL = Setup(model="smollm2", targets=r"layers\.(2[2-9])\.", system="Follow the instruction.")
REAL_QUICK = Setup(train_examples=16, test_examples=8, steps=2, batch_size=4, eval_every=2, lrs=(5e-3,),
                   lora_rank=4, model="smollm2", targets=r"layers\.29\.self_attn\.(q|v)_proj",
                   system="Follow the instruction.")
PRESETS = {(False, False): Setup(), (True, False): QUICK, (False, True): REAL, (True, True): REAL_QUICK}

KINDS = {  # kind -> (phrasings, answer); a phrasing takes w (words) and n (numbers)
    "backwards": (("Write the word \"{w[0]}\" backwards.", "Spell \"{w[0]}\" in reverse order."),
                  lambda w, n: w[0][::-1]),
    "sum": (("What is {n[0]} plus {n[1]}?", "Add {n[0]} and {n[1]}."), lambda w, n: str(n[0] + n[1])),
    "alphabetical": (("Put these words in alphabetical order: {w[0]}, {w[1]}, {w[2]}.",
                      "Sort alphabetically: {w[0]}, {w[1]}, {w[2]}."), lambda w, n: ", ".join(sorted(w[:3]))),
    "length": (("How many letters does the word \"{w[0]}\" have?", "Count the letters in \"{w[0]}\"."),
               lambda w, n: str(len(w[0]))),
    "capitals": (("Write \"{w[0]} {w[1]}\" in capital letters.", "Convert to upper case: {w[0]} {w[1]}"),
                 lambda w, n: f"{w[0]} {w[1]}".upper()),
    "hyphens": (("Join these words with hyphens: {w[0]} {w[1]} {w[2]}", "Connect {w[0]}, {w[1]} and {w[2]} with "
                 "hyphens."), lambda w, n: "-".join(w[:3])),
    "initials": (("What are the first letters of: {w[0]} {w[1]} {w[2]} {w[3]}?", "Give the initials of the words "
                  "{w[0]} {w[1]} {w[2]} {w[3]}."), lambda w, n: "".join(x[0] for x in w[:4])),
    "last": (("Which word comes last in: {w[0]} {w[1]} {w[2]}?", "Name the final word of \"{w[0]} {w[1]} {w[2]}\"."),
             lambda w, n: w[2]),
}


def vocabulary() -> list[str]:
    """The 600 most frequent lower-case words of 4-8 letters in Python's documentation (`pydoc_data`, shipped with
    every Python): real words the tokenizer splits in many ways, the same list on every machine."""
    from pydoc_data.topics import topics

    counts = Counter(w for text in topics.values() for w in re.findall(r"\b[a-z]{4,8}\b", text))
    return sorted(w for w, _ in counts.most_common(600))


def instructions(n: int, split: str, seed: int) -> list[dict]:
    """n prompt/completion records, the kinds in turn. The splits draw words (every third word is held out) and
    numbers (10-59 train, 60-99 held out) from disjoint pools, so held-out answers cannot be memorised."""
    words = vocabulary()
    pool = [w for i, w in enumerate(words) if (i % 3 == 0) == (split == "test")]
    numbers = range(60, 100) if split == "test" else range(10, 60)
    rng = random.Random(f"{split}-{seed}")
    out = []
    for i in range(n):
        kind = list(KINDS)[i % len(KINDS)]
        phrasings, answer = KINDS[kind]
        w, nums = rng.sample(pool, 4), [rng.choice(numbers) for _ in range(2)]
        out.append({"prompt": rng.choice(phrasings).format(w=w, n=nums), "completion": answer(w, nums),
                    "task": kind})
    return out


def parser():
    return common.experiment_parser(__doc__, Setup(), "runs/experiments/instruct", "instruct.png",
                                    "a few instructions and steps on one layer")


def jobs(setup: Setup, out: Path) -> tuple[list, list[dict], dict]:
    from qmor.data.pipeline import DataConfig

    train = common.with_system(instructions(setup.train_examples, "train", setup.seed), setup.system)
    test = instructions(setup.test_examples, "test", setup.seed)
    data = DataConfig(source=common.records_file(out / "data" / "instruct-train.jsonl", train), max_len=64,
                      seed=setup.seed)
    held_out = common.records_file(out / "data" / "instruct-test.jsonl", common.with_system(test, setup.system))
    todo, params, info = common.family_runs(setup, out, "mix", test, data, batch_size=setup.batch_size,
                                            log_steps=5)
    todo = [(*job, held_out) for job in todo]  # scored runs also measure the held-out loss
    return todo, params, {**info, "n_test": len(test), "kinds": list(KINDS)}


def table(runs: list[dict], params: list[dict]) -> str:
    n = {r["family"]: r["params"] for r in params}
    rows = [{"family": r["family"], "lr": f"{r['lr']:g}", "params": n[r["family"]],
             "loss": r["final"]["eval_loss"], "em": r["final"]["exact_match"], "ca": r["final"]["char_accuracy"],
             **{k: f"{r['final'][f'exact_match/{k}']:.2f}" for k in KINDS}, "wall": r["wall_s"]} for r in runs]
    return common.markdown_table(rows, {"family": "family", "lr": "lr", "params": "trainable params",
                                        "loss": "held-out loss", "em": "exact match", "ca": "char acc",
                                        **{k: f"{k} EM" for k in KINDS}, "wall": "wall s"})


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup = common.setup_from(args, PRESETS)
    if min(setup.train_examples, setup.test_examples, setup.steps, setup.eval_every) < 1 or not setup.lrs:
        raise QmorError("train-examples, test-examples, steps and eval-every must be at least 1, with one --lrs")
    out, runs, results = common.compare(args, setup, jobs)
    path = Path(args.plot) if args.plot else out / "instruct.png"
    plots.curves(runs, "eval_loss", "held-out loss", path,
                 f"instruction following, {setup.model} 4-bit base (seed {setup.seed})", ylim=None)
    common.save_outputs(out, "instruct", results, table(runs, results["params"]))
    print(f"wrote {path}; total {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(common.guarded(main)())
