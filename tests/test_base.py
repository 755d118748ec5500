"""Base and TrainedAdapter: a base resolved once from whichever name it was given, an adapter's metadata read once,
and a base that is not the one the adapter was trained on refused before anything loads."""

import json

import pytest

from qmor import AdapterConfig, QmorError, save_adapter
from qmor.adapters.attach import CONFIG, WEIGHTS, AdapterMeta
from qmor.export.exporter import export_merged
from qmor.model import base as base_module
from qmor.model.base import Base, TrainedAdapter
from qmor.model.fingerprint import base_fingerprint
from qmor.model.load import load_4bit, load_for_training, load_trained
from qmor.model.tiny import make_tiny
from qmor.training.run_dir import open_adapter


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory):
    """A run folder holding only its final adapter, trained (untrained: the init adds zero) on tiny_dir."""
    folder = tmp_path_factory.mktemp("runs") / "run"
    model, meta, _ = load_for_training(str(tiny_dir), AdapterConfig(family="lora", r=4, alpha=8.0))
    save_adapter(model, folder / "adapter", meta)
    return folder


@pytest.fixture
def reads(monkeypatch):
    """Every read of an adapter's metadata, counted."""
    count = []
    real = AdapterMeta.from_json.__func__
    monkeypatch.setattr(AdapterMeta, "from_json", classmethod(lambda cls, data: count.append(1) or real(cls, data)))
    return count


def test_a_builtin_name_is_its_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("QMOR_CACHE", str(tmp_path))
    base = Base.resolve("tiny")
    assert (base.name, base.path, str(base)) == ("tiny", str(tmp_path / "tiny-0"), str(tmp_path / "tiny-0"))
    assert base.folder == (tmp_path / "tiny-0").resolve() and base.source == str(base.folder)
    assert "lm_head.weight" in base.weight_files
    assert Base.resolve(base) is base  # an object passes through, with what it has read
    assert Base.resolve(base, trust_remote_code=True).trust_remote_code


def test_a_folder_and_a_hub_id(tiny_dir):
    base = Base.resolve(str(tiny_dir))
    assert base.path == str(tiny_dir) and base.folder == tiny_dir.resolve() and not base.missing
    assert base.fingerprint == base_fingerprint(str(tiny_dir))
    assert base.config().model_type == "llama" and base.tokenizer().pad_token_id is not None
    hub = Base.resolve("no-such-org/no-such-model-qmor")
    assert hub.path == hub.source == "no-such-org/no-such-model-qmor" and not hub.missing
    with pytest.raises(QmorError, match="neither a local folder nor in the Hugging Face cache"):
        hub.folder  # noqa: B018 (reading it is the test)


def test_a_missing_folder_is_the_same_one_line_error(tmp_path):
    gone = tmp_path / "gone"
    base = Base.resolve(str(gone))  # resolving reads nothing: each use says what is wrong
    assert base.missing
    says = rf"^model folder {gone} does not exist; pass a local folder or a hub id such as meta-llama/Llama-2-7b-hf$"
    with pytest.raises(QmorError, match=says):
        base.folder  # noqa: B018 (reading it is the test)
    with pytest.raises(QmorError, match=says):
        load_4bit(base)


def test_the_weight_headers_are_read_once(tiny_dir, monkeypatch):
    calls = []
    real = base_module.weight_files
    monkeypatch.setattr(base_module, "weight_files", lambda folder: calls.append(folder) or real(folder))
    base = Base.resolve(str(tiny_dir))
    assert base.fingerprint and base.weight_files and base.local().weight_files
    assert calls == [tiny_dir.resolve()]


def test_an_adapter_reads_its_metadata_once(run, tiny_dir, reads, tmp_path):
    adapter = open_adapter(run)
    assert adapter.folder == run / "adapter" and adapter.source == run and len(reads) == 1
    assert adapter.base.path == str(tiny_dir.resolve()) and not adapter.base_given
    load_trained(adapter, device="cpu")
    assert len(reads) == 1
    reads.clear()
    export_merged(run, tmp_path / "merged", device="cpu")  # a path: resolved once at the top, then passed down
    assert len(reads) == 1


def test_another_base_is_refused_unless_allowed(run, tmp_path, capsys):
    other = make_tiny(tmp_path / "other", seed=0, hidden=32, layers=2)
    adapter = open_adapter(run, str(other))
    assert adapter.base_given and adapter.base.path == str(other)
    with pytest.raises(QmorError, match=rf"^{other} is not the base this adapter was trained on .*differ in names"):
        adapter.check_base()
    assert adapter.check_base(allow_other_base=True).path == str(other)
    assert "using it anyway (--allow-other-base)" in capsys.readouterr().err
    assert open_adapter(adapter, str(other)) is adapter  # already on that base: nothing read again


def test_a_recorded_base_that_is_gone_or_not_recorded(run, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    meta = json.loads((run / "adapter" / CONFIG).read_text())
    (folder / WEIGHTS).write_bytes((run / "adapter" / WEIGHTS).read_bytes())
    (folder / CONFIG).write_text(json.dumps({**meta, "base_model": str(tmp_path / "gone")}))
    with pytest.raises(QmorError, match=rf"^the base model folder {tmp_path / 'gone'} \(recorded in the adapter\) "
                                        "does not exist; pass the folder where it is now with --base-model"):
        TrainedAdapter.open(folder).check_base()
    (folder / CONFIG).write_text(json.dumps({**meta, "base_model": ""}))
    with pytest.raises(QmorError, match=rf"^adapter {folder} does not record its base model; pass the base with "
                                        "--base-model$"):
        load_trained(folder)
