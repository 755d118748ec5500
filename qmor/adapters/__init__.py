"""The adapter contract, and the package's public names.

Every family is a plain `nn.Module` built as `Module(d_in, d_out, hyperparams)` (`Hyperparams`: rank, alpha and the
family's options) that provides:
- `forward(x)`: the contribution Δy (..., d_out) for x (..., d_in), without building the dense ΔW;
- `delta_weight()`: the exact dense ΔW (d_out, d_in) with forward(x) == x @ ΔW.T, or `NotMergeable`;
- `fit(residual)`: set the parameters to the family's best approximation of a dense (d_out, d_in) residual
  (what LoftQ calls); routed families fit so that the output does not depend on routing;
- `num_params(d_in, d_out, hyperparams)` (static): the trainable parameter count.
A family's default init adds zero. Its file declares the rest in one `Family(...)` (qmor.adapters.family): options,
whether it merges or goes to PEFT, what its backward keeps, which shapes it takes, which parameters `fit` sets.
Its options may define `check_trainable()`: refuse, in one line, settings that an adapter saved with them still
loads and serves with but that cannot train (SiRA's top_k 1). Adding a family is its file and one line in
`registry.ADAPTERS`.

The package sits at the bottom of qmor: it imports nothing but `qmor.errors`, `qmor.config`, `qmor.files` and
`qmor.version`, so the model, training and export code read the families' declarations, never the reverse.
"""

from qmor.adapters.config import AdapterConfig
from qmor.adapters.family import Family, Hyperparams
from qmor.adapters.layer import build_adapter
from qmor.adapters.registry import (
    ADAPTERS,
    check_family,
    merge_refusal,
    mergeable,
    option_defaults,
    option_fields,
    peft_families,
)
from qmor.errors import NotMergeable

__all__ = ["ADAPTERS", "AdapterConfig", "Family", "Hyperparams", "NotMergeable", "build_adapter", "check_family",
           "merge_refusal", "mergeable", "option_defaults", "option_fields", "peft_families"]
