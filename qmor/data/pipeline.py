"""Datasets: open a source, map its columns, tokenise the records with loss masks, truncate, pack, split.

Sources are opened by qmor/data/sources.py (built-in tasks, JSON files, data files, datasets folders, Hub ids); records
become conversations in qmor/data/records.py (the formats); every format but text goes through the chat template
(qmor/data/template.py). Tokenising runs as one `Dataset.map` whose result is cached under qmor's cache folder, keyed
by the data, the tokenizer and every setting that changes the tokens, so a restarted run reads it back instead of
tokenising again.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from qmor.data.records import (
    FORMATS,
    apply_columns,
    check_columns,
    check_fields,
    conversation,
    detect_format,
    empty_response,
    field_text,
    parse_columns,
    renames,
    to_messages,
    tools_of,
)
from qmor.data.sources import FILE_TYPES, Source, open_source
from qmor.data.template import NoAssistantTokens, encode_chat, render, template_name, with_chat_template
from qmor.errors import QmorError, check_range
from qmor.model.files import cache_root
from qmor.version import __version__

__all__ = ["FILE_TYPES", "FORMATS", "DataConfig", "DataStats", "Examples", "build_datasets", "collate", "data_notes",
           "detect_format", "empty_warning", "load_records", "pack", "prepare", "preview", "prompt_text",
           "read_examples", "to_messages"]

TOKENISER_VERSION = 1  # part of the cache key: raise it when a change here would change the tokens of a record
QUIET_BELOW = 5000  # records; smaller sets are tokenised without a progress bar
NAMED = 5  # examples named where a warning points at some of them
REPLY_FIELDS = {"alpaca": "output", "prompt_completion": "completion", "text": "text"}  # conversations: their turns


@dataclass
class DataConfig:
    source: str = "uuid"  # built-in task (uuid, reverse, sort, add, upper, mix), a .jsonl/.json/.parquet/.csv file,
    # a datasets folder, or a Hub dataset id (read from the local cache when offline)
    format: str = "auto"  # auto | alpaca | messages | sharegpt | prompt_completion | text
    split: str = "train"  # split to train on (files and Hub ids take slices too, e.g. train[:1000]); tasks: train, test
    subset: str = ""  # a Hub dataset's configuration (load_dataset's name), e.g. main for openai/gsm8k
    columns: str = ""  # the dataset's columns mapped onto qmor's fields, "prompt=question,completion=answer" (a
    # config file may give a mapping, {prompt: question, completion: answer}, kept in this written form)
    max_len: int | None = 128  # tokens per training sequence; longer examples are truncated (and counted), but a
    # data set whose every example is longer is refused: that max_len is almost certainly a mistake. None: the
    # longest example (training caps it: qmor/training/resolve.py)
    train_on_prompt: bool = False  # also train on system/user/prompt tokens (default: responses only)
    packing: bool = False  # concatenate training examples into sequences of up to max_len tokens
    val_size: float = 0.0  # fraction (<1) or count (>=1) of examples held out for eval loss
    skip_bad: bool = False  # skip and count bad records instead of stopping at the first
    num_examples: int = 0  # built-in tasks: how many records (0 = the task's default)
    seed: int = 0  # seed of built-in tasks and of the validation split

    def __post_init__(self) -> None:
        mapping = parse_columns(self.columns)
        renames(mapping)  # two fields mapped onto one are refused here, before anything loads
        self.columns = ",".join(f"{k}={v}" for k, v in mapping.items())
        if not isinstance(self.split, str) or not self.split.strip():
            raise QmorError(f"split must be a split name such as train, got {self.split!r}; pass e.g. --split train")
        if self.format != "auto" and self.format not in FORMATS:
            raise QmorError(f"unknown data format {self.format!r}; use auto or one of {', '.join(FORMATS)}")
        if self.max_len is not None:
            check_range("max_len", self.max_len, "an integer of at least 8 tokens", 8, None, "--max-len 512",
                        integer=True)
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
    n_empty: int = 0  # examples kept whose trained replies (output, completion, assistant turns, text) are all empty:
    # their labels are the template's end-of-turn tokens alone (with train_on_prompt, those and the prompt)
    empty_at: list[str] = dataclasses.field(default_factory=list)  # where the first NAMED of them came from
    cache_file: str = ""  # the tokenised records, cached (Dataset.map's file)
    from_cache: bool = False  # whether they were read back from it instead of tokenised

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- reading -----------------------------------------------------------------------------------------------------

def load_records(source: str, skip_bad: bool = False, split: str = "train", subset: str = "") -> tuple[list[dict], int]:
    """The records of a data source, and how many unreadable ones were skipped."""
    src = open_source(source, split, subset, skip_bad)
    return [record for record, _ in src.head(len(src.rows))], src.skipped


def _open(cfg: DataConfig) -> tuple[Source, dict[str, str]]:
    """The source's split and the column renames, checked against its columns."""
    src = open_source(cfg.source, cfg.split, cfg.subset, cfg.skip_bad, cfg.num_examples, cfg.seed)
    mapping = parse_columns(cfg.columns)
    check_columns(mapping, src.columns, cfg.source)
    return src, renames(mapping)


def _first_records(src: Source, renamed: dict[str, str], n: int) -> list[tuple[dict, str]]:
    return [(apply_columns(record, renamed), loc) for record, loc in src.head(n)]


# ---- records -> tokens -------------------------------------------------------------------------------------------

def _example(tokenizer, record: dict, fmt: str, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    check_fields(record, fmt)
    if fmt == "text":
        ids = tokenizer(field_text(record, "text"), add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]  # the end of a document is something to learn
        return ids, list(ids)
    messages, first = conversation(record, fmt)
    if not any(m["role"] == "assistant" for m in messages[first:]):
        raise ValueError("the conversation has no assistant turn to learn from")
    return encode_chat(tokenizer, messages, train_on_prompt, first, tools_of(record))


def tokenizer_key(tokenizer) -> str:
    """Identifies what a tokenizer does to text: its vocabulary and rules, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__, getattr(tokenizer, "chat_template", None), tokenizer.all_special_tokens,
             tokenizer.bos_token_id, tokenizer.eos_token_id, getattr(tokenizer, "add_bos_token", None),
             getattr(tokenizer, "add_eos_token", None)]
    return hashlib.sha256((rules + json.dumps(extra, default=str)).encode()).hexdigest()


def cache_dir() -> Path:
    return cache_root() / "tokenised"


@contextlib.contextmanager
def _progress(shown: bool):
    import datasets

    was = datasets.is_progress_bar_enabled()
    if not shown:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was and not shown:
            datasets.enable_progress_bars()


def tokenise(tokenizer, src: Source, renamed: dict[str, str], fmt: str, train_on_prompt: bool):
    """Every record as {"input_ids", "labels", "loc", "error", "fatal", "empty"}, through Dataset.map with its cache
    file under qmor's cache folder: the same data, tokenizer and settings read the file back. Bad records are kept
    with their error, so the caller decides (and a cached run reports the same errors)."""
    import datasets

    key = hashlib.sha256(json.dumps({
        "data": src.key, "split": src.split, "skipped": src.skipped, "columns": renamed, "format": fmt,
        "train_on_prompt": train_on_prompt, "tokenizer": tokenizer_key(tokenizer), "qmor": __version__,
        "version": TOKENISER_VERSION}, sort_keys=True).encode()).hexdigest()[:32]
    path = cache_dir() / f"{key}.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")), "labels": datasets.Sequence(datasets.Value("int32")),
        "loc": datasets.Value("string"), "error": datasets.Value("string"), "fatal": datasets.Value("bool"),
        "empty": datasets.Value("bool")})

    def one(row: dict, index: int) -> dict:
        record, loc = src.record(row, index)
        record = apply_columns(record, renamed)
        out = {"input_ids": [], "labels": [], "loc": loc, "error": "", "fatal": False, "empty": False}
        try:
            ids, labels = _example(tokenizer, record, fmt, train_on_prompt)
            out.update(input_ids=ids, labels=labels, empty=empty_response(record, fmt))
        except NoAssistantTokens as e:  # the template's doing, not the record's: skipping would skip them all
            out.update(error=str(e), fatal=True)
        except (ValueError, KeyError, TypeError) as e:
            out["error"] = str(e)
        return out

    cached = path.is_file()
    with _progress(len(src.rows) >= QUIET_BELOW):
        done = src.rows.map(one, with_indices=True, remove_columns=src.rows.column_names, features=features,
                            new_fingerprint=key, cache_file_name=str(path), load_from_cache_file=True,
                            desc="tokenising")
    return done, str(path), cached


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
    return notes


def empty_reply(fmt: str) -> str:
    """What an example without a reply lacks, in the words of its format."""
    field = REPLY_FIELDS.get(fmt)
    return f"an empty or null {field}" if field else "only empty assistant turns"


def places(locs: list[str]) -> str:
    """"data.jsonl lines 2, 5" for locations that differ in their number alone, else the locations as they are."""
    heads = {loc.rpartition(" ")[0] for loc in locs}
    if len(locs) < 2 or len(heads) > 1:
        return ", ".join(locs)
    return f"{heads.pop()}s " + ", ".join(loc.rpartition(" ")[2] for loc in locs)


def empty_warning(stats: DataStats, source: str) -> str | None:
    """One line for the examples that have no reply to learn, when others do (all of them are refused)."""
    if not stats.n_empty:
        return None
    more = ", ..." if stats.n_empty > len(stats.empty_at) else ""
    return (f"{source}: {stats.n_empty} of {stats.n_train_examples + stats.n_val} examples have "
            f"{empty_reply(stats.format)} ({places(stats.empty_at)}{more}), so they teach the model to answer "
            "nothing; fill them in or remove them")


def no_replies(source: str, fmt: str, n: int, columns) -> QmorError:
    """Every example without a reply: a column mapped wrong, most likely. With train_on_prompt the prompts are
    learnt too, but a data set without a single reply is no less a mistake, so it is refused the same."""
    field = REPLY_FIELDS.get(fmt)
    lesson = "the end-of-text token" if fmt == "text" else "to end every reply at once"
    if field is None:
        fix = "check that the assistant turns hold the replies (their content, or ShareGPT's value)"
    else:
        listed = f" (its columns: {', '.join(columns)})" if columns else ""
        noun = "text" if fmt == "text" else "replies"
        fix = f"map the column that holds the {noun} with --columns {field}=COLUMN{listed}, or fill the {noun} in"
    return QmorError(f"all {n} examples of {source} have {empty_reply(fmt)}, so the model would learn nothing but "
                     f"{lesson}; {fix}")


# ---- tokenise, truncate, split, pack -----------------------------------------------------------------------------

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


@dataclass
class Examples:
    """A data set tokenised, before any length is chosen: the examples kept, where each came from, whether its
    replies are empty, and what reading it found."""

    examples: list[dict]  # {"input_ids", "labels"}, whole
    locs: list[str]  # where each came from ("data.jsonl line 3")
    empty: list[bool]  # whether its trained replies are all empty
    format: str  # the format the records were read as
    template: str  # "tokenizer", "chatml-fallback", or "none" (plain text)
    skipped: int  # bad records skipped
    columns: list[str]  # the source's columns, for the messages that suggest a mapping
    cache_file: str  # the tokenised records, cached (Dataset.map's file)
    from_cache: bool  # whether they were read back from it

    @property
    def longest(self) -> int:
        return max(len(e["input_ids"]) for e in self.examples)


def read_examples(tokenizer, cfg: DataConfig) -> Examples:
    """Every usable record of the source tokenised with its loss mask; a bad record stops here (with skip_bad, it is
    counted instead)."""
    src, renamed = _open(cfg)
    first = _first_records(src, renamed, 1)
    if not first:
        raise QmorError(f"{cfg.source} holds no usable records ({src.skipped} skipped); add records or fix the bad "
                        "ones")
    fmt = detect_format([first[0][0]], cfg.source) if cfg.format == "auto" else cfg.format
    tok = tokenizer if fmt == "text" else with_chat_template(tokenizer)
    done, cache_file, from_cache = tokenise(tok, src, renamed, fmt, cfg.train_on_prompt)
    table = done.data
    errors = table.column("error").to_pylist()
    bad = [i for i, e in enumerate(errors) if e]
    locs = table.column("loc").to_pylist()
    fatal = table.column("fatal").to_pylist()
    for i in bad:
        if fatal[i]:
            raise QmorError(f"{locs[i]}: {errors[i]}")
        if not cfg.skip_bad:
            raise QmorError(f"{locs[i]}: {errors[i]}; fix the record, force another format, or pass skip_bad "
                            f"(--skip-bad)")
    skipped = src.skipped + len(bad)
    keep = [i for i, e in enumerate(errors) if not e]
    if not keep:
        raise QmorError(f"every record of {cfg.source} was bad ({skipped} skipped); check the format ({fmt})")
    ids, labels, empty = (table.column(c).to_pylist() for c in ("input_ids", "labels", "empty"))
    return Examples(examples=[{"input_ids": ids[i], "labels": labels[i]} for i in keep], locs=[locs[i] for i in keep],
                    empty=[empty[i] for i in keep], format=fmt,
                    template="none" if fmt == "text" else template_name(tokenizer), skipped=skipped,
                    columns=src.columns, cache_file=cache_file, from_cache=from_cache)


def prepare(data: Examples, cfg: DataConfig) -> tuple[list[dict], list[dict], DataStats]:
    """Train and validation examples `{"input_ids", "labels"}` (labels -100 where no loss), and their stats.

    Examples longer than `max_len` (None: the longest) are truncated (counted); those left without any label are
    dropped (counted). The validation split is drawn with `random.Random(seed)`; only training examples are packed.
    """
    max_len = cfg.max_len or data.longest
    lengths = [len(e["input_ids"]) for e in data.examples]
    if min(lengths) > max_len:
        i = lengths.index(min(lengths))
        raise QmorError(f"every example of {cfg.source} is longer than max_len={max_len} tokens (shortest: "
                        f"{lengths[i]} tokens, {data.locs[i]}); raise max_len to at least {lengths[i]}")
    n_truncated = sum(n > max_len for n in lengths)
    cut = [{"input_ids": e["input_ids"][:max_len], "labels": e["labels"][:max_len]} for e in data.examples]
    trained = [j for j, e in enumerate(cut) if any(t != -100 for t in e["labels"])]
    if not trained:
        raise QmorError(f"{cfg.source}: no example keeps a response token within max_len={max_len}; raise "
                        f"max_len or shorten the prompts")
    kept = [cut[j] for j in trained]
    empty = [data.locs[j] for j in trained if data.empty[j]]  # kept when others have replies, but counted
    if len(empty) == len(kept):
        raise no_replies(cfg.source, data.format, len(kept), data.columns)
    idx = list(range(len(kept)))
    random.Random(cfg.seed).shuffle(idx)
    n_val = _val_count(cfg.val_size, len(kept), cfg.source)
    val_idx = set(idx[:n_val])
    train = [e for i, e in enumerate(kept) if i not in val_idx]
    val = [kept[i] for i in sorted(val_idx)]
    rows = pack(train, max_len) if cfg.packing else train
    stats = DataStats(
        format=data.format, template=data.template, n_records=len(data.examples), n_skipped=data.skipped,
        n_truncated=n_truncated, n_dropped=len(cut) - len(kept), n_train=len(rows), n_train_examples=len(train),
        n_val=len(val), n_tokens=sum(len(e["input_ids"]) for e in train),
        n_label_tokens=sum(t != -100 for e in train for t in e["labels"]), packed=cfg.packing, n_empty=len(empty),
        empty_at=empty[:NAMED], cache_file=data.cache_file, from_cache=data.from_cache)
    return rows, val, stats


def build_datasets(tokenizer, cfg: DataConfig) -> tuple[list[dict], list[dict], DataStats]:
    """`read_examples`, then `prepare`: the train and validation examples and their stats."""
    return prepare(read_examples(tokenizer, cfg), cfg)


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

def preview(source: str, n: int = 5, format: str = "auto", split: str = "train", subset: str = "",
            columns: dict[str, str] | str | None = None) -> tuple[str, list[dict]]:
    """The detected (or forced) format and the first `n` records (under qmor's field names when `columns` maps
    them); a QmorError on unreadable or malformed data."""
    cfg = DataConfig(source=source, format=format, split=split, subset=subset, columns=columns or "")
    src, renamed = _open(cfg)
    first = _first_records(src, renamed, n)
    fmt = detect_format([r for r, _ in first[:1]], source) if format == "auto" else format
    for record, loc in first:
        try:
            check_fields(record, fmt)
            if fmt != "text":
                to_messages(record, fmt)
        except ValueError as e:
            raise QmorError(f"{loc}: {e}; fix the record or choose another format") from None
    return fmt, [r for r, _ in first]


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
