"""load_for_training / load_trained: default-init path and the errors a wrong base gives."""

from pathlib import Path

import pytest
import torch

from qmor import AdapterConfig, QmorError, save_adapter
from qmor.adapters.attach import adapted_layers
from qmor.model.load import load_for_training, load_trained
from qmor.model.tiny import make_tiny


def ids():
    return torch.randint(8, 100, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["lora", "sira"])
def test_default_init_round_trip(tiny_dir, tmp_path, family):
    cfg = AdapterConfig.from_dict({"family": family, "r": 4, "experts": 2})
    model, meta, report = load_for_training(str(tiny_dir), cfg)
    assert report is None and meta.init == "default" and meta.base_weights is None
    assert Path(meta.base_model).is_absolute() and Path(meta.base_model) == Path(tiny_dir).resolve()
    assert len(adapted_layers(model)) == 14
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02)
    model.eval()
    save_adapter(model, tmp_path / "adapter", meta)
    loaded, loaded_meta = load_trained(tmp_path / "adapter")
    assert loaded_meta.adapter == meta.adapter
    assert torch.equal(model(input_ids=ids()).logits, loaded.eval()(input_ids=ids()).logits)


def test_wrong_or_missing_base_is_a_clear_error(tiny_dir, tmp_path):
    model, meta, _ = load_for_training(str(tiny_dir), AdapterConfig(r=4))
    save_adapter(model, tmp_path / "adapter", meta)
    other = make_tiny(tmp_path / "other", seed=0, hidden=32, layers=2)
    with pytest.raises(QmorError, match="is not the base this adapter was trained on .*differ in names or shapes"):
        load_trained(tmp_path / "adapter", base_model=str(other))  # the recorded fingerprint catches it first
    with pytest.raises(QmorError, match="does not fit this model"):
        load_trained(tmp_path / "adapter", base_model=str(other), allow_other_base=True)
    with pytest.raises(QmorError, match="does not exist"):
        load_trained(tmp_path / "adapter", base_model=str(tmp_path / "missing"))
    with pytest.raises(QmorError, match="qmor_adapter.json"):
        load_trained(tmp_path)
