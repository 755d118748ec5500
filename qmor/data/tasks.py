"""Built-in synthetic datasets, selected by name instead of a path: no files, no downloads, fixed seeds.

- `uuid`: the MoRA paper's memorisation task. N random UUID pairs; prompt = key, completion = value. Memorisation
  is the point, so the test split is the training split.
- `reverse`, `sort`, `add`, `upper`: small skills with held-out test sets. An input belongs to train or test by a
  stable hash of its prompt, so the two splits are disjoint whatever `n` and `seed` are.
- `mix`: all four skills, interleaved.

Every record is `{"prompt": str, "completion": str, "task": name}`; `score` compares predictions to completions.
"""

from __future__ import annotations

import random
import string
import uuid as _uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from qmor.errors import QmorError

SPLITS = ("train", "test")
TEST_BUCKETS = 5  # one input in this many is held out for test (by hash), so train and test never share a prompt


def _uuid_pair(rng: random.Random) -> tuple[str, str]:
    key, value = (str(_uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(2))
    return key, value


def _reverse(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 10)))
    return f"reverse {s}", s[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choices(string.digits, k=rng.randint(3, 10)))
    return f"sort {s}", "".join(sorted(s))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"add {a}+{b}", str(a + b)


def _upper(rng: random.Random) -> tuple[str, str]:
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 6))) for _ in range(rng.randint(1, 3))]
    s = " ".join(words)
    return f"upper {s}", s.upper()


@dataclass(frozen=True)
class Task:
    name: str  # what `--data NAME` selects
    make: Callable[[random.Random], tuple[str, str]]  # one random (prompt, completion) pair
    default_n: int  # records per split when n = 0
    held_out: bool  # True: test prompts never appear in train; False: test is train (memorisation)


TASKS = {
    "uuid": Task("uuid", _uuid_pair, 100, held_out=False),
    "reverse": Task("reverse", _reverse, 1000, held_out=True),
    "sort": Task("sort", _sort, 1000, held_out=True),
    "add": Task("add", _add, 1000, held_out=True),
    "upper": Task("upper", _upper, 1000, held_out=True),
}
MIX = ("reverse", "sort", "add", "upper")
NAMES = (*TASKS, "mix")


def is_task(source: str) -> bool:
    return source in NAMES


def _check(name: str, split: str) -> None:
    if name not in NAMES:
        raise QmorError(f"unknown built-in task {name!r}; choose one of {', '.join(NAMES)} or give a data file path")
    if split not in SPLITS:
        raise QmorError(f"unknown split {split!r}; use 'train' or 'test'")


def _in_split(prompt: str, split: str) -> bool:
    is_test = zlib.crc32(prompt.encode()) % TEST_BUCKETS == 0
    return is_test == (split == "test")


def _one(task: Task, split: str, n: int, seed: int) -> list[dict]:
    n = n or task.default_n
    if not task.held_out:
        split = "train"  # memorisation: the test set is the training set
    rng = random.Random(f"{task.name}:{seed}")  # string seed: stable across runs and Python versions
    seen: set[str] = set()
    out = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise QmorError(f"task {task.name!r} has too few distinct inputs for n={n}; ask for fewer records")
        prompt, completion = task.make(rng)
        if prompt in seen or (task.held_out and not _in_split(prompt, split)):
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "completion": completion, "task": task.name})
    return out


def records(name: str, split: str = "train", n: int = 0, seed: int = 0) -> list[dict]:
    """`n` records (0 = the task's default) of task `name`; the same list for the same (name, split, n, seed)."""
    _check(name, split)
    if name != "mix":
        return _one(TASKS[name], split, n, seed)
    n = n or sum(TASKS[t].default_n for t in MIX)
    per = [n // len(MIX) + (i < n % len(MIX)) for i in range(len(MIX))]
    out = [r for t, k in zip(MIX, per, strict=True) if k for r in _one(TASKS[t], split, k, seed)]
    random.Random(f"mix:{seed}").shuffle(out)
    return out


def char_accuracy(pred: str, ref: str) -> float:
    """Characters equal at the same position, over the longer string: extra or missing characters both count."""
    longest = max(len(pred), len(ref))
    if longest == 0:
        return 1.0
    return sum(p == r for p, r in zip(pred, ref, strict=False)) / longest


def score(task_name: str, predictions: list[str], references: list[str], tasks: list[str] | None = None) -> dict:
    """Exact match and character accuracy (means over examples, in [0, 1]) after stripping outer whitespace.

    `task_name` only validates the name (every task is scored the same way). With `tasks` (each record's "task"
    field, as in `mix`), the result also holds `exact_match/NAME` and `char_accuracy/NAME` per task.
    """
    if task_name not in NAMES:
        raise QmorError(f"unknown built-in task {task_name!r}; choose one of {', '.join(NAMES)}")
    if len(predictions) != len(references):
        raise QmorError(f"{len(predictions)} predictions for {len(references)} references; pass one per reference")
    if not references:
        raise QmorError("nothing to score: the reference list is empty")
    if tasks is not None and len(tasks) != len(references):
        raise QmorError(f"{len(tasks)} task names for {len(references)} references; pass one per reference")
    preds = [p.strip() for p in predictions]
    refs = [r.strip() for r in references]
    em = [float(p == r) for p, r in zip(preds, refs, strict=True)]
    ca = [char_accuracy(p, r) for p, r in zip(preds, refs, strict=True)]
    out = {"exact_match": sum(em) / len(em), "char_accuracy": sum(ca) / len(ca), "n": len(em)}
    for t in sorted(set(tasks or [])):
        idx = [i for i, name in enumerate(tasks) if name == t]
        out[f"exact_match/{t}"] = sum(em[i] for i in idx) / len(idx)
        out[f"char_accuracy/{t}"] = sum(ca[i] for i in idx) / len(idx)
    return out
