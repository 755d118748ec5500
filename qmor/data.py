"""Datasets: read records, turn them into conversations, tokenise with loss masks, truncate, pack, split.

Formats (auto-detected from the first record's keys, or forced):
  alpaca             {"instruction", "input"?, "output", "system"?}
  messages           {"messages": [{"role", "content"}, ...]}
  sharegpt           {"conversations": [{"from": human|gpt|system, "value"}, ...]}
  prompt_completion  {"prompt", "completion"}
  text               {"text"}   (no template; every token trained)
Sources: a .jsonl file, a .json file holding one list, a `datasets.save_to_disk` folder, or a built-in task name
(qmor/tasks.py). Every format but text goes through the chat template (qmor/template.py).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from qmor import tasks
from qmor.config import check_range
from qmor.errors import QmorError
from qmor.template import NoAssistantTokens, encode_chat, render, template_name, with_chat_template

FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "text")
FILE_TYPES = (".jsonl", ".json")  # the files _read takes (besides a datasets folder)
REQUIRED = {"alpaca": ["instruction", "output"], "messages": ["messages"], "sharegpt": ["conversations"],
            "prompt_completion": ["prompt", "completion"], "text": ["text"]}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")


@dataclass
class DataConfig:
    source: str = "uuid"  # built-in task (uuid, reverse, sort, add, upper, mix), a .json/.jsonl file or datasets folder
    format: str = "auto"  # auto | alpaca | messages | sharegpt | prompt_completion | text
    max_len: int = 128  # tokens per training sequence; longer examples are truncated (and counted), but a data set
    # whose every example is longer is refused: that max_len is almost certainly a mistake
    train_on_prompt: bool = False  # also train on system/user/prompt tokens (default: responses only)
    packing: bool = False  # concatenate training examples into sequences of up to max_len tokens
    val_size: float = 0.0  # fraction (<1) or count (>=1) of examples held out for eval loss
    skip_bad: bool = False  # skip and count bad records instead of stopping at the first
    num_examples: int = 0  # built-in tasks: how many records (0 = the task's default)
    seed: int = 0  # seed of built-in tasks and of the validation split

    def __post_init__(self) -> None:
        if self.format != "auto" and self.format not in FORMATS:
            raise QmorError(f"unknown data format {self.format!r}; use auto or one of {', '.join(FORMATS)}")
        check_range("max_len", self.max_len, "an integer of at least 8 tokens", 8, None, "--max-len 512", integer=True)
        check_range("val_size", self.val_size, ">= 0 (a fraction like 0.1 or a count like 200)", 0.0, None,
                    "--val-size 0.1")
        check_range("num_examples", self.num_examples, "an integer >= 0 (0: the task's default)", 0, None,
                    "--num-examples 0", integer=True)
        if self.val_size >= 1 and self.val_size != int(self.val_size):
            raise QmorError(f"val_size {self.val_size} is neither a fraction below 1 nor a whole count")


@dataclass
class DataStats:
    format: str  # the format the records were read as
    template: str  # "tokenizer", "chatml-fallback", or "none" (plain text)
    n_records: int  # records turned into examples (bad ones not counted)
    n_skipped: int  # bad records skipped (skip_bad=True)
    n_truncated: int  # examples cut to max_len
    n_dropped: int  # examples with no response token left after truncation, left out
    n_train: int  # training sequences (packed rows when packing)
    n_train_examples: int  # training examples before packing
    n_val: int  # validation examples
    n_tokens: int  # training tokens (no padding)
    n_label_tokens: int  # training tokens that carry a label
    packed: bool  # whether training examples were packed
    n_empty: int = 0  # examples kept whose response (output, completion, assistant turns, text) is empty
    first_empty: str = ""  # where the first of them came from ("FILE line N")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- reading -----------------------------------------------------------------------------------------------------

def _read(source: str, skip_bad: bool) -> tuple[list[dict], list[str], int]:
    """Records, where each came from ("FILE line N"), and how many unreadable ones were skipped."""
    path = Path(source)
    if not path.exists():
        raise QmorError(f"data source {source} does not exist; check the path, or use a built-in task: "
                        f"{', '.join(tasks.NAMES)}")
    if path.is_dir():
        return _read_folder(path)
    if path.suffix not in FILE_TYPES:
        raise QmorError(f"{source}: unsupported file type {path.suffix!r}; use .jsonl, .json or a datasets folder")
    text = _read_text(path)
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" means one object per line: read it as JSONL below
                raise QmorError(f"{source} line {e.lineno}: not valid JSON ({e.msg}); fix the file "
                                f"(a .json file holds one list of records)") from None
        else:
            if not isinstance(data, list):
                return _keep_dicts([data], [f"{source} line 1"], skip_bad)
            return _keep_dicts(data, [f"{source} line {n}" for n in _list_lines(text)], skip_bad)
    records, locs, skipped = [], [], 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
            locs.append(f"{source} line {n}")
        except json.JSONDecodeError as e:
            if not skip_bad:
                raise QmorError(f"{source} line {n}: not valid JSON ({e.msg}); fix the line, or pass skip_bad "
                                f"(--skip-bad) to skip bad records") from None
            skipped += 1
    records, locs, bad = _keep_dicts(records, locs, skip_bad)
    return records, locs, skipped + bad


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise QmorError(f"{path} line {line}: byte {raw[e.start]:#04x} is not UTF-8 text; save the file as UTF-8 "
                        f"(e.g. iconv -f latin1 -t utf-8) or fix that line") from None


def _list_lines(text: str) -> list[int]:
    """The line on which each item of a valid top-level JSON list starts, for error messages."""
    dec, lines = json.JSONDecoder(), []
    i = text.index("[") + 1
    while True:
        while text[i] in " \t\r\n,":
            i += 1
        if text[i] == "]":
            return lines
        lines.append(text.count("\n", 0, i) + 1)
        i = dec.raw_decode(text, i)[1]


def _keep_dicts(records: list, locs: list[str], skip_bad: bool) -> tuple[list[dict], list[str], int]:
    keep = [i for i, r in enumerate(records) if isinstance(r, dict)]
    if len(keep) < len(records) and not skip_bad:
        i = next(i for i, r in enumerate(records) if not isinstance(r, dict))
        raise QmorError(f"{locs[i]}: a record must be a JSON object, got {type(records[i]).__name__}; fix it, or "
                        f"pass skip_bad (--skip-bad)")
    return [records[i] for i in keep], [locs[i] for i in keep], len(records) - len(keep)


def _read_folder(path: Path) -> tuple[list[dict], list[str], int]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise QmorError(f"{path} is not a datasets folder ({e}); save one with Dataset.save_to_disk, "
                        f"or give a .jsonl file") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    rows = ds.to_list()
    return rows, [f"{path} row {i + 1}" for i in range(len(rows))], 0


def load_records(source: str, skip_bad: bool = False) -> tuple[list[dict], int]:
    """The records of a file or datasets folder, and how many unreadable ones were skipped."""
    records, _, skipped = _read(source, skip_bad)
    return records, skipped


def detect_format(records: list[dict], source: str) -> str:
    """The format named by the first record's keys; a QmorError listing its keys when none matches."""
    if not records:
        raise QmorError(f"{source} holds no records; add at least one JSON object (one per line for .jsonl)")
    keys = set(records[0])
    for fmt in ("messages", "sharegpt", "alpaca", "prompt_completion", "text"):
        if set(REQUIRED[fmt]) <= keys:
            return fmt
    raise QmorError(f"{source}: cannot tell the format from the first record's fields {sorted(keys)}; expected "
                    f"one of {REQUIRED} (or pass format explicitly)")


# ---- records -> conversations ------------------------------------------------------------------------------------

def _str(record: dict, key: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _turns(items, role_key: str, text_key: str, roles: dict) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise ValueError("the conversation must be a non-empty list of turns")
    out = []
    for t in items:
        if not isinstance(t, dict) or role_key not in t or text_key not in t:
            raise ValueError(f"every turn needs {role_key!r} and {text_key!r}")
        role = roles.get(t[role_key])
        if role is None:
            raise ValueError(f"unknown role {t[role_key]!r}; use one of {sorted(roles)}")
        out.append({"role": role, "content": _str(t, text_key)})
    return out


def to_messages(record: dict, fmt: str) -> list[dict]:
    """The record as chat messages (role/content). Raises ValueError on a malformed record."""
    if fmt == "messages":
        return _turns(record["messages"], "role", "content", {r: r for r in ROLES})
    if fmt == "sharegpt":
        return _turns(record["conversations"], "from", "value", SHAREGPT_ROLES)
    system = _str(record, "system")
    if fmt == "alpaca":
        user, answer = _str(record, "instruction"), _str(record, "output")
        if _str(record, "input"):
            user += "\n\n" + _str(record, "input")
    else:  # prompt_completion
        user, answer = _str(record, "prompt"), _str(record, "completion")
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _example(tokenizer, record: dict, fmt: str, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    missing = [k for k in REQUIRED[fmt] if k not in record]
    if missing:
        raise ValueError(f"record has fields {sorted(record)} but format {fmt!r} needs {REQUIRED[fmt]}")
    if fmt == "text":
        ids = tokenizer(_str(record, "text"), add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]  # the end of a document is something to learn
        return ids, list(ids)
    messages = to_messages(record, fmt)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant turn to learn from")
    return encode_chat(tokenizer, messages, train_on_prompt)


def _empty_response(record: dict, fmt: str) -> bool:
    if fmt == "text":
        return not _str(record, "text").strip()
    return not any(m["content"].strip() for m in to_messages(record, fmt) if m["role"] == "assistant")


def data_notes(stats: DataStats, source: str) -> list[str]:
    """One line per thing the user should know about the examples that were kept, cut or left out."""
    notes = []
    if stats.n_skipped:
        notes.append(f"{source}: {stats.n_skipped} bad record(s) skipped (--skip-bad)")
    if stats.n_truncated:
        notes.append(f"{source}: {stats.n_truncated} example(s) longer than max_len were truncated; raise --max-len "
                     "to keep them whole")
    if stats.n_dropped:
        notes.append(f"{source}: {stats.n_dropped} example(s) had no response token left after truncation and were "
                     "left out; raise --max-len")
    if stats.n_empty:
        notes.append(f"{source}: {stats.n_empty} example(s) have an empty or null response (first: "
                     f"{stats.first_empty}); they teach the model to say nothing, so fill them in or remove them")
    return notes


# ---- tokenise, truncate, split, pack -----------------------------------------------------------------------------

def _source_records(cfg: DataConfig) -> tuple[list[dict], list[str], int]:
    if tasks.is_task(cfg.source):
        recs = tasks.records(cfg.source, "train", cfg.num_examples, cfg.seed)
        return recs, [f"task {cfg.source} record {i + 1}" for i in range(len(recs))], 0
    return _read(cfg.source, cfg.skip_bad)


def _val_count(val_size: float, n: int, source: str) -> int:
    k = round(val_size * n) if val_size < 1 else int(val_size)
    k = max(k, 1) if val_size > 0 else 0
    if k >= n:
        raise QmorError(f"{source}: val_size {val_size} leaves no training examples out of {n}; use a smaller "
                        f"fraction or count")
    return k


def pack(examples: list[dict], max_len: int) -> list[dict]:
    """Concatenate whole examples into rows of at most `max_len` tokens (best fit, longest first).

    Each row gets `position_ids` that restart at 0 for every document: given those and no attention mask,
    transformers keeps attention inside each document (its packed-sequence path: a block-diagonal causal mask for
    eager and SDPA attention, variable-length kernels for flash attention), so a packed document is computed as it
    would be alone. Labels travel with their tokens; a document's first label is cleared, since alone it is never
    predicted (packed, it would be, from the previous document's last token).
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[dict] = []
    room: list[tuple[int, int]] = []  # (free tokens, row index), sorted: the tightest row that fits comes first
    for i in order:
        n = len(examples[i]["input_ids"])
        j = bisect.bisect_left(room, (n, -1))
        if j == len(room):
            rows.append({"input_ids": [], "labels": [], "position_ids": []})
            free, r = max_len, len(rows) - 1
        else:
            free, r = room.pop(j)
        rows[r]["input_ids"] += examples[i]["input_ids"]
        rows[r]["labels"] += [-100] + examples[i]["labels"][1:]  # a first token is never predicted on its own
        rows[r]["position_ids"] += list(range(n))
        bisect.insort(room, (free - n, r))
    return rows


def build_datasets(tokenizer, cfg: DataConfig) -> tuple[list[dict], list[dict], DataStats]:
    """Train and validation examples `{"input_ids", "labels"}` (labels -100 where no loss), and their stats.

    Examples longer than `max_len` are truncated (counted); those left without any label are dropped (counted).
    The validation split is drawn from the examples with `random.Random(seed)`; only training examples are packed.
    """
    records, locs, skipped = _source_records(cfg)
    if not records:
        raise QmorError(f"{cfg.source} holds no usable records ({skipped} skipped); add records or fix the bad ones")
    fmt = detect_format(records, cfg.source) if cfg.format == "auto" else cfg.format
    tok = tokenizer if fmt == "text" else with_chat_template(tokenizer)
    examples, kept_locs, empty = [], [], []
    for record, loc in tqdm(list(zip(records, locs, strict=True)), desc="tokenising", unit="rec",
                            disable=len(records) < 5000):
        try:
            ids, labels = _example(tok, record, fmt, cfg.train_on_prompt)
        except NoAssistantTokens as e:  # the template's doing, not the record's: skipping would skip them all
            raise QmorError(f"{loc}: {e}") from None
        except (ValueError, KeyError, TypeError) as e:
            if not cfg.skip_bad:
                raise QmorError(f"{loc}: {e}; fix the record, force another format, or pass skip_bad "
                                f"(--skip-bad)") from None
            skipped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
        kept_locs.append(loc)
        if _empty_response(record, fmt):  # kept (it teaches an empty reply) but counted, so the user hears of it
            empty.append(loc)
    if not examples:
        raise QmorError(f"every record of {cfg.source} was bad ({skipped} skipped); check the format ({fmt})")
    lengths = [len(e["input_ids"]) for e in examples]
    if min(lengths) > cfg.max_len:
        i = lengths.index(min(lengths))
        raise QmorError(f"every example of {cfg.source} is longer than max_len={cfg.max_len} tokens (shortest: "
                        f"{lengths[i]} tokens, {kept_locs[i]}); raise max_len to at least {lengths[i]}")
    n_truncated = sum(n > cfg.max_len for n in lengths)
    cut = [{"input_ids": e["input_ids"][: cfg.max_len], "labels": e["labels"][: cfg.max_len]} for e in examples]
    kept = [e for e in cut if any(t != -100 for t in e["labels"])]
    if not kept:
        raise QmorError(f"{cfg.source}: no example keeps a response token within max_len={cfg.max_len}; raise "
                        f"max_len or shorten the prompts")
    idx = list(range(len(kept)))
    random.Random(cfg.seed).shuffle(idx)
    n_val = _val_count(cfg.val_size, len(kept), cfg.source)
    val_idx = set(idx[:n_val])
    train = [e for i, e in enumerate(kept) if i not in val_idx]
    val = [kept[i] for i in sorted(val_idx)]
    rows = pack(train, cfg.max_len) if cfg.packing else train
    stats = DataStats(
        format=fmt, template="none" if fmt == "text" else template_name(tokenizer), n_records=len(examples),
        n_skipped=skipped, n_truncated=n_truncated, n_dropped=len(cut) - len(kept), n_train=len(rows),
        n_train_examples=len(train), n_val=len(val), n_tokens=sum(len(e["input_ids"]) for e in train),
        n_label_tokens=sum(t != -100 for e in train for t in e["labels"]), packed=cfg.packing,
        n_empty=len(empty), first_empty=empty[0] if empty else "")
    return rows, val, stats


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example: input_ids, labels (-100 on padding), each (B, T), and either an
    attention_mask (B, T) or, for packed rows, position_ids (B, T) restarting at every document.

    Packed rows get no attention mask: transformers builds the per-document mask from the position ids only when
    there is none. Their padding is a document of its own (positions from 0 again), after every real token, so a
    causal mask already hides it from them.
    """
    width = max(len(e["input_ids"]) for e in examples)
    packed = "position_ids" in examples[0]
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    positions = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[b, :n] = torch.tensor(e["input_ids"])
        labels[b, :n] = torch.tensor(e["labels"])
        mask[b, :n] = 1
        if packed:
            positions[b, :n] = torch.tensor(e["position_ids"])
            positions[b, n:] = torch.arange(width - n)
    if packed:
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ---- for the app and for evaluation ------------------------------------------------------------------------------

def preview(source: str, n: int = 5, format: str = "auto") -> tuple[str, list[dict]]:
    """The detected (or forced) format and the first `n` records; a QmorError on unreadable or malformed data."""
    if tasks.is_task(source):
        return "prompt_completion", tasks.records(source, "train", 0, 0)[:n]
    records, locs, _ = _read(source, skip_bad=False)
    fmt = detect_format(records, source) if format == "auto" else format
    if fmt not in FORMATS:
        raise QmorError(f"unknown data format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
    for record, loc in zip(records[:n], locs[:n], strict=True):
        missing = [k for k in REQUIRED[fmt] if k not in record]
        try:
            if missing:
                raise ValueError(f"record has fields {sorted(record)} but format {fmt!r} needs {REQUIRED[fmt]}")
            if fmt != "text":
                to_messages(record, fmt)
        except ValueError as e:
            raise QmorError(f"{loc}: {e}; fix the record or choose another format") from None
    return fmt, records[:n]


def prompt_text(tokenizer, record_or_messages) -> str:
    """The text a model continues to answer: the chat template up to the last user turn, plus the generation prompt.

    Takes messages or a record of any format; a final assistant turn (the reference answer) is left out. Plain
    text records are returned as they are.
    """
    if isinstance(record_or_messages, list):
        messages = record_or_messages
    else:
        record = dict(record_or_messages)
        keys = set(record)
        if "text" in keys and not keys & {"messages", "conversations", "instruction", "prompt"}:
            return record["text"]
        record.setdefault("output", "")  # a prompt-only record is fine here
        record.setdefault("completion", "")
        fmt = detect_format([record], "record")
        messages = to_messages(record, fmt)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return render(with_chat_template(tokenizer), messages, add_generation_prompt=True)
