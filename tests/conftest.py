import pytest
import torch

from qmor.tiny import make_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama + tokenizer on disk, built in code (no network)."""
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny", seed=0, hidden=64, layers=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
