"""Where a model's files are: names (built-in, local, hub id), the recorded source, weight files and tensor keys."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qmor.errors import QmorError
from qmor.model.files import (
    expand_builtin,
    is_builtin,
    is_hub_id,
    is_local,
    local_folder,
    missing_folder,
    model_source,
    read_tensor,
    tensor_key,
    weight_files,
)


def test_a_name_is_a_builtin_a_path_or_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    assert is_builtin("tiny") and is_builtin("smollm2") and not is_builtin("org/tiny")
    assert is_local("folder") and is_local("./gone") and is_local("~/models/x") and is_local("/abs")
    assert not is_local("org/name") and is_hub_id("org/name") and not is_hub_id("./org/name")
    assert missing_folder("./gone") and not missing_folder("folder") and not missing_folder("org/name")
    assert model_source("folder") == str(tmp_path / "folder") and model_source("org/name") == "org/name"
    assert expand_builtin("org/name") == "org/name" and expand_builtin("folder") == "folder"


def test_local_folder_says_what_is_wrong(tmp_path):
    (tmp_path / "file.bin").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QmorError, match="is a file; pass the model's folder"):
        local_folder(str(tmp_path / "file.bin"))
    with pytest.raises(QmorError, match="does not exist"):
        local_folder(str(tmp_path / "gone"))
    with pytest.raises(QmorError, match="has no config.json"):
        local_folder(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert local_folder(str(tmp_path / "empty")) == (tmp_path / "empty").resolve()


def test_shards_and_tensor_keys(tmp_path):
    a, b = torch.randn(3, 2), torch.randn(2, 2)
    save_file({"layers.0.q.weight": a}, str(tmp_path / "model-1.safetensors"))
    save_file({"lm_head.weight": b}, str(tmp_path / "model-2.safetensors"))
    index = {"weight_map": {"layers.0.q.weight": "model-1.safetensors", "lm_head.weight": "model-2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    names = weight_files(tmp_path)
    assert names == {"layers.0.q.weight": tmp_path / "model-1.safetensors",
                     "lm_head.weight": tmp_path / "model-2.safetensors"}
    # a checkpoint saved from the bare base model lacks the task model's prefix
    assert tensor_key("model.layers.0.q", names, "model") == "layers.0.q.weight"
    assert tensor_key("lm_head", names, "model") == "lm_head.weight"
    assert tensor_key("model.layers.1.q", names, "model") is None
    assert torch.equal(read_tensor(names, "lm_head.weight"), b)
    with pytest.raises(QmorError, match="no safetensors weights"):
        weight_files(Path(tmp_path / "nowhere"))
