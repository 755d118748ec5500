"""A base model resolved once, and a trained adapter with the base it goes on.

A base is named many ways: a built-in name (tiny, smollm2), a local folder or a hub id. Each entry point (a `qmor`
command, a Python API function, the app's job) turns what the user passed into a `Base` once, and loading, LoftQ,
export, chat and eval take the object: a built-in is built into its cache folder once, a hub id's snapshot is looked
up once, the weight files' headers are read once and the fingerprint (which reads weights) only when asked for.

A `TrainedAdapter` is an adapter folder with its metadata, read once, and its base: the one it records, or the one
the user gave instead (another copy, or a folder the base moved to), which `check_base` compares with the recorded
fingerprint before minutes of loading.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from qmor.adapters.attach import AdapterMeta, read_meta
from qmor.errors import QmorError
from qmor.model import fingerprint, support
from qmor.model.files import (
    LOAD_ERRORS,
    DamagedWeights,
    check_model_source,
    expand_builtin,
    load_failed,
    load_path,
    local_folder,
    missing_folder,
    model_source,
    recorded_base,
    weight_files,
)


@dataclass(frozen=True)
class Base:
    """A base model: `name` as the user (or an adapter's record) gave it, `path` where transformers loads it from
    (a built-in's cache folder, the folder, or the hub id). Messages name `path`, as `str(base)`."""

    name: str
    path: str
    trust_remote_code: bool = False  # run the model repository's own code

    @classmethod
    def resolve(cls, name: str | os.PathLike | Base, seed: int = 0, trust_remote_code: bool = False,
                cache: Path | None = None) -> Base:
        """A built-in name (built into `cache`, else qmor's cache), a local folder or a hub id (a `Base` passes
        through, keeping what it has read)."""
        if isinstance(name, Base):
            return replace(name, trust_remote_code=True) if trust_remote_code and not name.trust_remote_code else name
        return cls(str(name), expand_builtin(str(name), seed, cache), trust_remote_code)

    @classmethod
    def recorded(cls, recorded: str, trust_remote_code: bool = False) -> Base:
        """The base an adapter records (a built-in's cache folder is built again when it is gone)."""
        return cls(recorded, recorded_base(recorded), trust_remote_code)

    def __str__(self) -> str:
        return self.path

    @property
    def missing(self) -> bool:
        """A folder (not a hub id) with nothing there: moved or deleted."""
        return missing_folder(self.path)

    @property
    def source(self) -> str:
        """What an adapter records as its base: an absolute folder, or the hub id."""
        return model_source(self.path)

    def check(self) -> None:
        """One line, before anything loads, for a path that does not hold a model."""
        check_model_source(self.path)

    @cached_property
    def folder(self) -> Path:
        """The folder holding its files (a hub id's snapshot in the Hugging Face cache, never downloaded)."""
        return local_folder(self.path)

    @cached_property
    def weight_files(self) -> dict[str, Path]:
        """Tensor name -> safetensors file; every file's header is read here, once."""
        return weight_files(self.folder)

    @cached_property
    def fingerprint(self) -> dict:
        return fingerprint.fingerprint_of(self.folder, self.weight_files)

    def fingerprint_to_record(self) -> dict | None:
        """The fingerprint to store in an adapter, or None (with a note) when the weights cannot be read."""
        try:
            return self.fingerprint
        except QmorError as e:
            print(f"note: the base {self} cannot be fingerprinted ({e}); loading this adapter onto another base "
                  "will not be detected", file=sys.stderr)
            return None

    def local(self) -> Base:
        """The same base loaded from its folder: for a hub id, the very snapshot whose files are read."""
        here = Base(self.name, str(self.folder), self.trust_remote_code)
        here.__dict__.update({k: v for k, v in self.__dict__.items() if k in ("folder", "weight_files")})
        return here

    def config(self):
        """Its config, read as loading reads it; an architecture qmor cannot train is refused here."""
        try:
            config = AutoConfig.from_pretrained(load_path(self.path), trust_remote_code=self.trust_remote_code)
        except LOAD_ERRORS as e:
            raise load_failed(self.path, e) from None
        support.refuse_transposed(config, self.trust_remote_code)
        return config

    def tokenizer(self):
        """Its tokenizer (with its chat template), with a pad token (the end-of-sequence one when it has none)."""
        self.check()
        try:
            tok = AutoTokenizer.from_pretrained(load_path(self.path), trust_remote_code=self.trust_remote_code)
        except LOAD_ERRORS as e:
            raise load_failed(self.path, e, "tokenizer") from None
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token  # padding is masked out of attention and loss, so any id will do
        return tok


def moved_base(base: Base, given: bool) -> QmorError:
    where = "given with --base-model" if given else "recorded in the adapter"
    return QmorError(f"the base model folder {base} ({where}) does not exist; pass the folder where it is now with "
                     "--base-model (it is checked to be the same model)")


@dataclass(frozen=True)
class TrainedAdapter:
    """An adapter folder, its metadata and its base. `source` is what the user named (a run folder or this folder):
    hints and an export's record name it."""

    folder: Path
    meta: AdapterMeta
    base: Base | None  # None: the adapter records no base and none was given
    base_given: bool = False  # the user named the base: another copy may stand where the recorded one was
    source: str | os.PathLike | None = None

    @classmethod
    def open(cls, folder: str | os.PathLike, base: str | Base | None = None, trust_remote_code: bool = False,
             source: str | os.PathLike | None = None) -> TrainedAdapter:
        """The adapter in `folder` on `base` when given (a built-in name, folder or hub id), else on the base it
        records."""
        meta = read_meta(folder)
        if base:
            resolved = Base.resolve(base, trust_remote_code=trust_remote_code)
        else:
            resolved = Base.recorded(meta.base_model, trust_remote_code) if meta.base_model else None
        return cls(Path(folder), meta, resolved, bool(base), folder if source is None else source)

    @classmethod
    def of(cls, adapter: str | os.PathLike | TrainedAdapter, base: str | Base | None = None,
           trust_remote_code: bool = False) -> TrainedAdapter:
        """`adapter` (an adapter folder, or one already opened), on `base` when given."""
        if not isinstance(adapter, TrainedAdapter):
            return cls.open(adapter, base, trust_remote_code)
        if base:
            return adapter.on(Base.resolve(base, trust_remote_code=trust_remote_code))
        if trust_remote_code and adapter.base is not None:
            return replace(adapter, base=Base.resolve(adapter.base, trust_remote_code=True))
        return adapter

    def on(self, base: Base) -> TrainedAdapter:
        """The same adapter (its metadata not read again) on another base, which `check_base` will compare."""
        return self if base == self.base else replace(self, base=base, base_given=True)

    def located_base(self) -> Base:
        """Its base, refused in one line when none is recorded or the recorded folder is gone (a base the user gave
        is left to loading, which names what is wrong with it)."""
        if self.base is None:
            raise QmorError(f"adapter {self.folder} does not record its base model; pass the base with --base-model")
        if not self.base_given and self.base.missing:
            raise moved_base(self.base, given=False)
        return self.base

    def check_base(self, allow_other_base: bool = False) -> Base:
        """Its base, refused when its fingerprint differs from the recorded one (unless `allow_other_base`)."""
        base = self.located_base()
        check_fingerprint(self.meta.base_fingerprint, self.meta.base_model, base, allow_other_base)
        return base



def check_fingerprint(recorded: dict | None, trained_on: str, base: Base, allow_other_base: bool = False) -> None:
    """Refuse `base` when its fingerprint differs from the one recorded at training time (nothing recorded: old
    adapters, or weights that could not be read, pass unchecked)."""
    if recorded is None or base.missing:
        return  # nothing to compare with, or a folder that is not there (loading it says so in its own words)
    try:
        found = base.fingerprint
    except DamagedWeights:
        raise  # loading that base would fail on the same file, only later
    except QmorError as e:
        print(f"warning: cannot check that {base} is the base this adapter was trained on ({e})", file=sys.stderr)
        return
    if found == recorded:
        return
    if found["architecture"] != recorded["architecture"]:
        why = f"it is a {found['architecture']}, the adapter was trained on a {recorded['architecture']}"
    elif (found["matrices"], found["shapes"]) != (recorded["matrices"], recorded["shapes"]):
        why = "its layers differ in names or shapes"
    else:
        why = "same architecture and shapes, other weights: another model"
    if allow_other_base:
        print(f"warning: {base} is not the base this adapter was trained on: {why}; using it anyway "
              "(--allow-other-base)", file=sys.stderr)
        return
    raise QmorError(f"{base} is not the base this adapter was trained on ({trained_on}): {why}; pass that base, or "
                    "--allow-other-base to use this one anyway")


__all__ = ["Base", "TrainedAdapter", "check_fingerprint", "moved_base"]
