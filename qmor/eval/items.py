"""The examples an evaluation scores: tokenised exactly as training tokenised them (qmor.data.pipeline), from the
run's validation split, from its training data when it holds none out (what a memorisation run is judged on), or
from another dataset.

Answers come from the same tokens: the prompt is everything before an example's last labelled span, the reference
is that span, so a record of any format with a reply is scored without re-reading it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qmor.data.pipeline import DataConfig, build_datasets
from qmor.data.template import render
from qmor.errors import QmorError
from qmor.training.run_dir import RunDir

DEFAULT_MAX_LEN = 1024  # tokens per example for a dataset evaluated without a run config to take it from


@dataclass
class Answer:
    prompt: list[int]  # token ids up to the reply, as training rendered them
    reference: str  # the reply the record holds, decoded (special tokens dropped)
    reference_tokens: int  # its length in tokens, to bound the generated reply


@dataclass
class EvalSet:
    source: str  # the data evaluated (a file, a Hub id or a built-in task)
    split: str  # "validation", "training data" or "dataset"
    examples: list[dict]  # {"input_ids", "labels"}, for the loss
    answers: list[Answer]  # the examples that have a prompt and a reply


@dataclass
class DataChoice:
    dataset: str | None = None  # evaluate on this instead of the run's own data
    split: str = "train"  # the dataset's split (a slice works: test[:200])
    subset: str = ""  # a Hub dataset's configuration
    columns: str = ""  # its columns mapped onto qmor's fields, prompt=question,completion=answer
    format: str = "auto"  # its record format
    limit: int = 100  # examples scored (the first ones)


def data_config(run: RunDir, choice: DataChoice) -> tuple[DataConfig, str] | None:
    """What to read and which part of it: the dataset given, else the run's own data; None when there is neither."""
    saved = run.read_config() if run.config.is_file() else None
    if choice.dataset:
        max_len = saved.data.max_len if saved else DEFAULT_MAX_LEN
        return DataConfig(source=choice.dataset, format=choice.format, split=choice.split, subset=choice.subset,
                          columns=choice.columns, max_len=max_len), "dataset"
    if saved is None:
        return None
    data = dataclasses.replace(saved.data, packing=False)  # one example per row: each is scored on its own
    return data, ("validation" if data.val_size > 0 else "training data")


def load(run: RunDir, choice: DataChoice, tokenizer) -> EvalSet | None:
    found = data_config(run, choice)
    if found is None:
        return None
    cfg, split = found
    train, val, _ = build_datasets(tokenizer, cfg)
    examples = (val if split == "validation" else train)[:choice.limit]
    if not examples:
        raise QmorError(f"{cfg.source} gives no example to evaluate; check the dataset and --split")
    return EvalSet(cfg.source, split, examples, [a for e in examples if (a := answer(tokenizer, e))])


def answer(tokenizer, example: dict) -> Answer | None:
    """The prompt and reference reply of a tokenised example; None when it has no prompt (plain text, or training
    on every token) or no reply."""
    labels = example["labels"]
    end = max((i + 1 for i, t in enumerate(labels) if t != -100), default=0)
    start = end
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    if start == 0:
        return None
    reference = tokenizer.decode(labels[start:end], skip_special_tokens=True).strip()
    if not reference:
        return None
    return Answer(list(example["input_ids"][:start]), reference, end - start)


def question(tokenizer, template: str, prompt: list[int]) -> str:
    """The user's words in a rendered prompt, for showing it; the whole prompt when the template has more around them
    (a system prompt of the record's own, several turns)."""
    marker = "\u2063QMOR\u2063"
    around = render(tokenizer, [{"role": "user", "content": marker}], add_generation_prompt=True,
                    chat_template=template)
    head, _, tail = around.partition(marker)
    text = tokenizer.decode(prompt)
    if text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail):
        return text[len(head):len(text) - len(tail)]
    return tokenizer.decode(prompt, skip_special_tokens=True).strip()
