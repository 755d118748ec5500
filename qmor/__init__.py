"""qmor: fine-tune large language models on one consumer GPU with 4-bit NF4 bases and small adapters."""

from qmor.adapters import ADAPTERS, build_adapter, mergeable
from qmor.adapters.attach import (
    AdapterMeta,
    attach,
    count_parameters,
    detach,
    load_adapter,
    save_adapter,
    set_enabled,
)
from qmor.config import AdapterConfig, QuantConfig
from qmor.errors import NotMergeable, QmorError
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
