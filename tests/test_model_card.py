"""Model cards with the Hub's front matter, the base named by its Hub id, and PEFT exports that still load after
their folder is moved."""

import json
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from test_export import hf_logits, ids, make_adapter, reference_logits, tol

from qmor.export.exporter import export_merged, export_peft
from qmor.model.files import hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_hub_id_of_ids_cache_snapshots_and_other_folders(tmp_path):
    snapshot = tmp_path / "hub" / "models--qmor-tests--tiny-llama" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    assert hub_id("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert hub_id(str(snapshot)) == "qmor-tests/tiny-llama"
    assert hub_id(str(snapshot / "sub")) == "qmor-tests/tiny-llama"
    assert hub_id(str(tmp_path)) is None and hub_id("") is None and hub_id("./model") is None


@pytest.fixture(scope="module")
def hub_base(tiny_dir, tmp_path_factory):
    """The tiny model as `hf download qmor-tests/tiny` leaves it in the Hugging Face cache."""
    hub = tmp_path_factory.mktemp("hub")
    repo = hub / "models--qmor-tests--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(tiny_dir, repo / "snapshots" / COMMIT)
    return hub, repo / "snapshots" / COMMIT


def front_matter(folder):
    return ModelCard.load(folder / "README.md").data


def test_merged_card_names_the_hub_base_and_never_a_local_path(tiny_dir, hub_base, tmp_path):
    hub, snapshot = hub_base
    export_merged(make_adapter(snapshot, tmp_path / "a", "mora"), tmp_path / "merged")
    data = front_matter(tmp_path / "merged")
    assert data.base_model == "qmor-tests/tiny" and data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation" and {"qmor", "mora", "merged"} <= set(data.tags)
    assert str(hub) not in (tmp_path / "merged" / "README.md").read_text()
    export_merged(make_adapter(tiny_dir, tmp_path / "b", "lora"), tmp_path / "local")
    data = front_matter(tmp_path / "local")
    assert data.base_model is None and data.library_name == "transformers"  # no Hub id for a folder of our own
    assert str(tiny_dir) not in (tmp_path / "local" / "README.md").read_text()


@torch.no_grad()
def test_moved_peft_export_loads_its_hub_base(hub_base, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # the cache only, no network attempts

    hub, snapshot = hub_base
    adapter = make_adapter(snapshot, tmp_path / "adapter", "lora")
    export_peft(adapter, tmp_path / "peft")
    moved = tmp_path / "elsewhere" / "peft"
    shutil.move(tmp_path / "peft", moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "qmor-tests/tiny"
    data = front_matter(moved)
    assert data.base_model == "qmor-tests/tiny" and data.library_name == "peft" and "lora" in data.tags
    x = ids(5)
    ref = reference_logits(adapter, x)
    assert (ref - hf_logits(moved / "base", x, moved)).abs().max() < tol(ref)  # exact over the dequantized base
    # the base named in adapter_config.json, found in the Hugging Face cache wherever the export now is
    model = AutoPeftModelForCausalLM.from_pretrained(str(moved), cache_dir=str(hub), local_files_only=True,
                                                     dtype=torch.float32).eval()
    assert torch.equal(model(input_ids=x).logits, hf_logits(snapshot, x, moved))


@torch.no_grad()
def test_moved_adapter_only_export_names_the_local_base_folder(tiny_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM

    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "lora")
    export_peft(adapter, tmp_path / "alone", with_base=False)
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "alone", moved)
    assert json.loads((moved / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_dir)
    assert front_matter(moved).base_model is None
    x = ids(6)
    model = AutoPeftModelForCausalLM.from_pretrained(str(moved), dtype=torch.float32).eval()
    assert torch.equal(model(input_ids=x).logits, hf_logits(tiny_dir, x, moved))
