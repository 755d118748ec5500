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


def perturb(model, seed=1, size=0.05):
    """Stand-in for training: non-zero adapter weights, so comparisons see the adapters, not just the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * size)
