"""qmor: fine-tune large language models on one consumer GPU with 4-bit NF4 bases and small adapters."""

__version__ = "0.1.0"

from qmor.adapters import ADAPTERS, build_adapter, mergeable  # noqa: E402
from qmor.attach import (  # noqa: E402
    AdapterMeta,
    attach,
    count_parameters,
    detach,
    load_adapter,
    save_adapter,
    set_enabled,
)
from qmor.config import AdapterConfig, QuantConfig  # noqa: E402
from qmor.errors import NotMergeable, QmorError  # noqa: E402

__all__ = [
    "ADAPTERS", "AdapterConfig", "AdapterMeta", "NotMergeable", "QmorError", "QuantConfig",
    "attach", "build_adapter", "count_parameters", "detach", "load_adapter", "mergeable", "save_adapter",
    "set_enabled",
]
