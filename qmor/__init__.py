"""qmor: fine-tune large language models on one consumer GPU with 4-bit NF4 bases and small adapters."""

from qmor.adapters import ADAPTERS, build_adapter, mergeable
from qmor.adapters.attach import AdapterMeta, count_parameters, detach, save_adapter, set_enabled
from qmor.adapters.config import AdapterConfig
from qmor.config import QuantConfig
from qmor.errors import NotMergeable, QmorError
from qmor.model.load import attach, load_adapter
from qmor.version import __version__

__all__ = [
    "ADAPTERS", "__version__", "AdapterConfig", "AdapterMeta", "NotMergeable", "QmorError", "QuantConfig",
    "attach", "build_adapter", "count_parameters", "detach", "load_adapter", "mergeable", "save_adapter",
    "set_enabled",
]


def __getattr__(name: str):
    if name == "MERGEABLE":  # the earlier constant, computed from the registry so that it cannot go stale
        return mergeable()
    raise AttributeError(f"module 'qmor' has no attribute {name!r}")
