"""Wrap a model's target linears with adapters, freeze the rest, and save / load adapters as safetensors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from qmor.adapters.config import AdapterConfig
from qmor.adapters.experts import (
    TARGET,
    SharedAdapter,
    adapter_owner,
    check_expert_family,
    expert_layout,
    is_expert_map,
    shared_name,
)
from qmor.adapters.layer import AdaptedLinear, build_adapter
from qmor.config import QuantConfig, from_dict, to_dict
from qmor.errors import QmorError
from qmor.files import atomic_dir, load_json, save_json
from qmor.version import __version__

WEIGHTS = "adapter.safetensors"
OWN_BASE = ("loftq", "calibrated")  # inits that change the quantised base: the adapter fits that Q_T only
CONFIG = "qmor_adapter.json"  # a name of our own: PEFT and transformers read "adapter_config.json" as PEFT's layout
LEGACY_CONFIG = "adapter_config.json"  # what earlier versions wrote; still read


@dataclass
class AdapterMeta:
    """What travels with an adapter so that loading and merging can check they use the right base."""

    adapter: AdapterConfig
    base_model: str = ""  # hub id or local path of the base the adapter was trained on
    quant: QuantConfig = field(default_factory=QuantConfig)
    init: str = "default"  # "default", "loftq" or "calibrated": the last two change the quantised base, so the merge
    # base must be their Q_T
    base_weights: str | None = None  # folder with the initialised 4-bit base (Q_T), when `own_base`
    base_fingerprint: dict | None = None  # the base's fingerprint (qmor.model.fingerprint): another base is refused
    chat_template: str | None = None  # the Jinja chat template training rendered conversations with (None: none)

    @property
    def own_base(self) -> bool:
        """Whether the adapter was fitted to a base of its own (Q_T), not to plain NF4 of the original weights."""
        return self.init in OWN_BASE

    def to_json(self) -> dict:
        return {"adapter": to_dict(self.adapter), "base_model": self.base_model, "quant": to_dict(self.quant),
                "init": self.init, "base_weights": self.base_weights, "base_fingerprint": self.base_fingerprint,
                "chat_template": self.chat_template, "qmor_version": __version__}

    @classmethod
    def from_json(cls, data: dict) -> AdapterMeta:
        return cls(adapter=from_dict(AdapterConfig, data["adapter"]), base_model=data.get("base_model", ""),
                   quant=from_dict(QuantConfig, data.get("quant", {})), init=data.get("init", "default"),
                   base_weights=data.get("base_weights"), base_fingerprint=data.get("base_fingerprint"),
                   chat_template=data.get("chat_template"))  # keys it does not name (merge_base) are old: ignored


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if get else None


def find_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Names of the linears to adapt: every linear but the output head and MoE experts, name suffixes (`experts`:
    every expert's gate/up and down map), or a regex."""
    head = _output_head(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    experts = [n for n in linears if is_expert_map(n)]  # MoE experts' maps: only when named (one adapter each)
    if targets == "all-linear":
        found = [n for n in linears if not is_expert_map(n)]
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise QmorError(f"targets regex {targets!r} is invalid ({e}); fix the pattern") from None
        found = [n for n in linears if pattern.fullmatch(n) or pattern.search(n)]
    else:
        found = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]
        found += [n for n in experts if TARGET in targets and n not in found]
    if not found:
        sample = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise QmorError(f"targets {targets!r} match no linear layer; this model's linears end in {sample}")
    return found


def attach(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Freeze the model, wrap each target linear in an AdaptedLinear and return the wrapped names. Under
    `expert_adapters="shared"` the experts of a block's map all hold one SharedAdapter. (`qmor.attach`, for a 4-bit
    model loaded elsewhere, first keeps its layers in the plain NF4 layout: qmor.model.load.attach.)"""
    for p in model.parameters():
        p.requires_grad_(False)
    names = find_targets(model, cfg.targets)
    check_expert_family(cfg, names)
    shared: dict[str, SharedAdapter] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        device = next(base.parameters()).device
        owner = adapter_owner(name, cfg.expert_adapters)
        if owner == name:
            adapter = build_adapter(cfg, base.in_features, base.out_features, name).to(device)
        else:  # every expert of the map has the same shape: the first one builds the adapter they share
            if owner not in shared:
                shared[owner] = SharedAdapter(build_adapter(cfg, base.in_features, base.out_features, owner))
            adapter = shared[owner].to(device)
        setattr(parent, child, AdaptedLinear(base, adapter, cfg.dropout))
    return names


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    # a module may stand in for an adapted linear while it runs it differently (qmor.model.tile): it names it
    layers = {n: getattr(m, "stands_for", m) for n, m in model.named_modules()}
    return {n: m for n, m in layers.items() if isinstance(m, AdaptedLinear)}


def detach(model: nn.Module) -> None:
    """Put the plain base linears back, dropping the adapters."""
    for name, layer in adapted_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)


def set_enabled(model: nn.Module, enabled: bool) -> None:
    for layer in adapted_layers(model).values():
        layer.enabled = enabled


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the adapters' weighted auxiliary losses from the last forward (SiRA's load balancing); None when that
    forward ran in eval mode."""
    losses = [layer.adapter.aux_loss for layer in adapted_layers(model).values()
              if getattr(layer.adapter, "aux_loss", None) is not None]
    return torch.stack(losses).sum() if losses else None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as their logical size, not their packed bytes, and a
    weight shared by two modules (tied embeddings and output head) counts once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total, seen = 0, set()
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            packed = p is getattr(m, "weight", None) and hasattr(p, "quant_state")
            total += m.in_features * m.out_features if packed else p.numel()
    return trainable, total


def saved_adapters(model: nn.Module) -> dict[str, nn.Module]:
    """name -> family module, as adapter files name them: each linear's own adapter under the linear's name, a
    shared expert adapter once, under `<block>.<map>.shared`."""
    out = {}
    for name, layer in adapted_layers(model).items():
        if isinstance(layer.adapter, SharedAdapter):
            out[shared_name(name)] = layer.adapter.adapter
        else:
            out[name] = layer.adapter
    return out


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().contiguous().cpu()
            for name, adapter in saved_adapters(model).items() for k, v in adapter.state_dict().items()}


def save_adapter(model: nn.Module, path: str | Path, meta: AdapterMeta, state: dict | None = None) -> Path:
    """adapter.safetensors + qmor_adapter.json, written under a temporary name and renamed when complete (`state`:
    the adapter's tensors when gathered already, from FSDP shards)."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(adapter_state(model) if state is None else state, str(tmp / WEIGHTS), metadata={"format": "qmor"})
        save_json(meta.to_json(), tmp / CONFIG)
    return path


def meta_file(path: str | Path) -> Path | None:
    """The adapter's metadata file in folder `path`: qmor_adapter.json, or adapter_config.json as earlier versions
    wrote it; None when there is neither. A PEFT adapter's adapter_config.json is refused in one line."""
    path = Path(path)
    if (path / CONFIG).is_file():
        return path / CONFIG
    legacy = path / LEGACY_CONFIG
    if not legacy.is_file():
        return None
    data = load_json(legacy)
    if "peft_type" in data or "adapter" not in data:
        raise QmorError(f"{path} holds a PEFT adapter (its {LEGACY_CONFIG} has peft_type), not a qmor adapter; load "
                        "it with peft.PeftModel.from_pretrained, or pass the qmor run folder it was exported from")
    return legacy


def read_meta(path: str | Path) -> AdapterMeta:
    path = Path(path)
    file = meta_file(path)
    if file is None:
        raise QmorError(f"{path} holds no {CONFIG}; pass the adapter folder of a qmor run (e.g. runs/NAME/adapter)")
    return AdapterMeta.from_json(load_json(file))


class BadAdapterFile(QmorError):
    """An adapter.safetensors that cannot be used; `problem` says why, without the file's name or the fix."""

    def __init__(self, file: Path, problem: str):
        super().__init__(f"{file} {problem}; use an intact copy or a checkpoint of its run "
                         "(runs/NAME/checkpoints/step-N/adapter), or train it again")
        self.problem = problem


def _nonfinite(value: torch.Tensor) -> str:
    nan, inf = bool(value.isnan().any()), bool(value.isinf().any())
    return "nan and inf" if nan and inf else "nan" if nan else "inf"


def read_adapter_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of adapter folder `path`. Every load of an adapter (chat, export, resume, the app) reads it here,
    so a file cut short or garbled, or one holding nan or inf (training never saves such values: a damaged or
    foreign file), is refused in one line here instead of ending chat in a sampling error or failing an export's
    logit check."""
    file = Path(path) / WEIGHTS
    if not file.is_file():
        raise BadAdapterFile(file, "is missing")
    try:
        state = load_file(str(file))
    except SafetensorError as e:
        raise BadAdapterFile(file, f"cannot be read ({str(e).strip()}): it is cut short or garbled") from None
    for key, value in state.items():
        if value.is_floating_point() and not bool(value.isfinite().all()):
            raise BadAdapterFile(file, f"holds {_nonfinite(value)} values in {key}")
    return state


def load_adapter_weights(model: nn.Module, path: str | Path) -> None:
    """Copy saved adapter weights into an already attached model, checking every name and shape first."""
    path = Path(path)
    state = read_adapter_state(path)
    expected = adapter_state(model)
    got, want = expert_layout(state), expert_layout(expected)
    if got and want and got != want:
        raise QmorError(f"adapter {path} holds {got} expert adapters but {want} ones are attached here; attach it "
                        f"with expert_adapters={got!r} (load_adapter reads the layout from its {CONFIG})")
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise QmorError(f"adapter {path} does not fit this model: {len(missing)} tensors missing (e.g. "
                        f"{missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]}); load it onto the base model "
                        "it was trained on")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise QmorError(f"adapter {path} does not fit this model: {key} has shape {tuple(value.shape)} in the "
                            f"file but {tuple(expected[key].shape)} here; load it onto the base it was trained on")
    for name, adapter in saved_adapters(model).items():
        prefix = name + "."
        adapter.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def load_adapter(model: nn.Module, path: str | Path) -> AdapterMeta:
    """Attach the saved family to `model` and load its weights; returns the saved metadata."""
    meta = read_meta(path)
    attach(model, meta.adapter)
    load_adapter_weights(model, path)
    return meta
