"""Data sources: where training records come from, opened as one split of a `datasets.Dataset`.

- a built-in task name (qmor/data/tasks.py), split train or test;
- a .jsonl / .json file, read by qmor's own reader, so that a bad line is named by file and line;
- a .parquet / .csv file, a folder of data files, or a Hub dataset id, through `datasets.load_dataset` (a Hub id
  is read from the local cache when offline: the datasets cache of an earlier load, or the files of
  `hf download ID --repo-type dataset`);
- a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from qmor.data import tasks
from qmor.errors import QmorError

JSON_FILES = (".jsonl", ".json")  # read by qmor itself, for the file-and-line error messages
LOADERS = {".parquet": "parquet", ".csv": "csv"}  # data files datasets reads, by suffix
FILE_TYPES = (*JSON_FILES, *LOADERS)  # every file type a source can be
RECORD, LOC = "__record__", "__loc__"  # the columns of a source qmor read itself: a record's JSON and its place
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # what datasets would look up on the Hub
FIX_SOURCE = ("a built-in task (" + ", ".join(tasks.NAMES) + "), a .jsonl/.json/.parquet/.csv file, a datasets "
              "folder or a Hub dataset id (org/name)")


@dataclass
class Source:
    """One split of a data source: rows that are records, or (sources read by qmor) RECORD/LOC pairs."""

    rows: object  # datasets.Dataset
    name: str  # the source as given, for messages
    split: str
    skipped: int = 0  # records the JSON reader could not read and skipped (skip_bad)
    columns: tuple[str, ...] = ()  # the records' fields (for JSON files: every field any record has)

    def record(self, row: dict, index: int) -> tuple[dict, str]:
        """A row as a record, and where it came from ("FILE line N", "ID row N")."""
        if RECORD in row:
            return json.loads(row[RECORD]), row[LOC]
        where = "" if self.split == "train" else f" [{self.split}]"
        return row, f"{self.name}{where} row {index + 1}"

    def head(self, n: int) -> list[tuple[dict, str]]:
        return [self.record(self.rows[i], i) for i in range(min(n, len(self.rows)))]

    @property
    def key(self) -> str:
        """Identifies the rows' content: datasets' fingerprint (of the data for records read here, of the files and
        revision for loaded ones)."""
        return self.rows._fingerprint


def open_source(source: str, split: str = "train", subset: str = "", skip_bad: bool = False, num_examples: int = 0,
                seed: int = 0) -> Source:
    """Open `split` of a data source; a one-line QmorError naming the fix for anything that cannot be opened."""
    if tasks.is_task(source):
        if split not in ("train", "test"):
            raise QmorError(f"built-in task {source} has the splits train and test, not {split!r}; pass --split train")
        records = tasks.records(source, split, num_examples, seed)
        return _own(records, [f"task {source} record {i + 1}" for i in range(len(records))], source, split, 0)
    path = Path(source).expanduser()
    if path.is_dir():
        return _folder(path, source, split, subset)
    if path.is_file():
        if path.suffix in JSON_FILES:
            records, locs, skipped = read_json(path, source, skip_bad)
            keep = file_slice(len(records), source, split)
            return _own([records[i] for i in keep], [locs[i] for i in keep], source, split, skipped)
        if path.suffix in LOADERS:
            return _loaded(source, split, lambda s: _load(LOADERS[path.suffix], s, data_files=str(path)))
        raise QmorError(f"{source}: unsupported file type {path.suffix!r}; use .jsonl, .json, .parquet, .csv, a "
                        "datasets folder or a Hub dataset id")
    if is_hub_id(source):
        return _loaded(source, split, lambda s: _hub(source, s, subset))
    raise QmorError(f"data source {source} does not exist; check the path, or use {FIX_SOURCE}")


def is_hub_id(source: str) -> bool:
    """Looks like org/name or name, is no path that exists here, and names no file type qmor reads."""
    suffix = Path(source).suffix
    return bool(HUB_ID.fullmatch(source)) and suffix not in (*JSON_FILES, *LOADERS) and not Path(source).exists()


# ---- sources read by qmor: built-in tasks and JSON files --------------------------------------------------------

def file_slice(n: int, source: str, split: str) -> list[int]:
    """The rows of a one-split file that `split` names: train, or a slice in datasets' syntax (train[:100],
    train[10%:], train[:50]+train[-50:]), so a JSON file takes --split as CSV and Parquet files do."""
    import datasets

    try:
        parts = datasets.ReadInstruction.from_spec(split).to_absolute({"train": n})
    except ValueError:
        raise QmorError(f"{source} is a single file, which holds one split (train), not {split!r}; pass --split "
                        "train or a slice of it such as train[:100]") from None
    return [i for part in parts for i in range(part.from_, part.to)]


def _own(records: list[dict], locs: list[str], name: str, split: str, skipped: int) -> Source:
    import datasets

    rows = datasets.Dataset.from_dict({RECORD: [json.dumps(r, ensure_ascii=False) for r in records], LOC: locs})
    fields = list(dict.fromkeys(k for r in records for k in r))
    return Source(rows, name, split, skipped, tuple(fields))


def read_json(path: Path, name: str, skip_bad: bool) -> tuple[list[dict], list[str], int]:
    """Records of a .jsonl or .json file, where each came from ("FILE line N"), and how many unreadable ones were
    skipped."""
    text = _read_text(path)
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" means one object per line: read it as JSONL below
                raise QmorError(f"{name} line {e.lineno}: not valid JSON ({e.msg}); fix the file "
                                f"(a .json file holds one list of records)") from None
        else:
            if not isinstance(data, list):
                return _keep_dicts([data], [f"{name} line 1"], skip_bad)
            return _keep_dicts(data, [f"{name} line {n}" for n in _list_lines(text)], skip_bad)
    records, locs, skipped = [], [], 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
            locs.append(f"{name} line {n}")
        except json.JSONDecodeError as e:
            if not skip_bad:
                raise QmorError(f"{name} line {n}: not valid JSON ({e.msg}); fix the line, or pass skip_bad "
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


# ---- sources read by datasets: data files, folders, the Hub ------------------------------------------------------

def _folder(path: Path, name: str, split: str, subset: str) -> Source:
    """A save_to_disk folder, or a folder of data files (such as a downloaded Hub dataset)."""
    import datasets

    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise QmorError(f"{name} is not a datasets folder ({e}); save one with Dataset.save_to_disk, or give a "
                            ".jsonl file") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise QmorError(f"{name} has no split {split!r}; its splits: {', '.join(ds)}; pass one with --split")
            ds = ds[split]
        elif split != "train":
            raise QmorError(f"{name} holds a single split, not {split!r}; drop --split")
        return Source(ds, name, split, columns=tuple(ds.column_names))
    return _loaded(name, split, lambda s: _load(str(path), s, name=subset or None),
                   unreadable=f"{name} is not a datasets folder and holds no data files datasets can read; save one "
                   "with Dataset.save_to_disk, put .parquet/.csv/.jsonl files in it, or give a .jsonl file")


def _load(path: str, split: str, **kw):
    import datasets

    return datasets.load_dataset(path, split=split, **kw)


def _hub(source: str, split: str, subset: str):
    """A Hub dataset: online, or from the datasets cache of an earlier load, or from the Hugging Face cache's files
    (hf download)."""
    import datasets

    try:
        return datasets.load_dataset(source, subset or None, split=split)
    except Exception as e:  # offline, no network, not found, gated: try the downloaded files before giving up
        if _choice_error(source, split, e) is not None:
            raise
        first = _first_line(e)
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(source, repo_type="dataset", local_files_only=True)
    except Exception:  # any failure means there is no local copy
        offline = datasets.config.HF_HUB_OFFLINE
        why = "the Hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if offline else f"it could not be loaded " \
              f"({first})"
        raise QmorError(f"Hub dataset {source!r} is not in the local cache and {why}; load it once while online "
                        f"(datasets.load_dataset or hf download {source} --repo-type dataset), or pass a local file; "
                        f"for a built-in task use one of {', '.join(tasks.NAMES)}") from None
    return datasets.load_dataset(folder, subset or None, split=split)


def _loaded(name: str, split: str, load, unreadable: str = "") -> Source:
    """`load(split)` as a Source; datasets' errors become one line: for an unknown split or subset the ones that
    exist, else `unreadable` (or datasets' reason)."""
    try:
        ds = load(split)
    except QmorError:
        raise
    except Exception as e:  # datasets raises many types for unreadable files: each means the same to the user
        raise _choice_error(name, split, e) or QmorError(unreadable or f"could not read {name} ({_first_line(e)}); "
                                                         "check the files, --split and --subset") from None
    return Source(ds, name, split, columns=tuple(ds.column_names))


def _choice_error(name: str, split: str, e: Exception) -> QmorError | None:
    """One line for datasets' refusal of a split or subset that does not exist, listing those that do."""
    if not isinstance(e, ValueError):
        return None
    text = str(e)
    found = re.search(r"Unknown split \"?[^\"]*\"?\. Should be one of \[(.*)\]", text)
    if found:
        return QmorError(f"{name} has no split {split!r}; its splits: {_names(found.group(1))}; pass one with --split")
    found = re.search(r"BuilderConfig '?([^' ]*)'? not found\. Available: \[(.*)\]", text)
    if found:
        return QmorError(f"{name} has no subset {found.group(1)!r}; its subsets: {_names(found.group(2))}; pass one "
                         "with --subset")
    found = re.search(r"Config name is missing.*available configs: \[(.*?)\]", text, re.S)
    if found:
        return QmorError(f"{name} has several subsets ({_names(found.group(1))}); pick one with --subset")
    return None


def _names(listed: str) -> str:
    return listed.replace("'", "")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0].rstrip(".") if lines else type(e).__name__
