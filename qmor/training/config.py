"""TrainConfig: everything a training run needs, nesting the adapter, quantisation and data configs.

The run folder's config.json is `to_json(cfg)`; a config file (`--config`, YAML or JSON) has the same layout, so a
finished run's config.json can start the next run. Only the keys present are changed; the rest keep their defaults.

A field left None depends on what is trained and is decided at the start of the run (qmor/training/resolve.py): the
built-in tiny demo keeps its preset (`DEMO_ADAPTER`, `DEMO_RUN`), every other model gets `MODEL_ADAPTER`, its
family's learning rate, `EPOCHS`, a length from its data and a batch that fits. config.json holds the values decided.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

from qmor.adapters.config import AdapterConfig
from qmor.config import QuantConfig, from_dict, to_dict
from qmor.data.pipeline import DataConfig
from qmor.errors import QmorError, check_range
from qmor.model.tile import TILE

SECTIONS = {"adapter": AdapterConfig, "quant": QuantConfig, "data": DataConfig}
# transformers' schedulers that need nothing beyond warmup and total steps (cosine is qmor's own: training/loop.py)
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
              "inverse_sqrt")
TRACKERS = ("none", "tensorboard", "wandb", "trackio", "mlflow")  # accelerate's trackers qmor reports to
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise QmorError(f"{name} must be one of {', '.join(choices)}, got {value!r}; {hint}"
                        f"pass e.g. --{name.replace('_', '-')} {close[0] if close else choices[0]}")


DEMO = "tiny"  # the built-in demo model (the run with no arguments), whose runs keep the preset below
# the demo's preset: the MoRA paper's UUID memorisation with MoRA on a LoftQ-initialised 4-bit base, a couple of
# minutes on a CPU
DEMO_ADAPTER = {"family": "mora", "r": 8, "alpha": 16.0, "init": "loftq"}
DEMO_RUN = {"lr": 5e-3, "epochs": 1.0, "max_steps": 120, "batch_size": 16, "grad_accum": 1, "max_len": 96}
# every other model: what a peft, TRL, LLaMA-Factory or unsloth user expects (README "Training" says why each)
MODEL_ADAPTER = {"family": "lora", "r": 16, "init": "loftq"}  # alpha: twice the rank (adapter_for)
EPOCHS = 3.0  # passes over the data: transformers' and TRL's default, LLaMA-Factory's recipes
EFFECTIVE_BATCH = 8  # sequences per optimizer step, as micro-batches times gradient accumulation


def is_demo(model: str) -> bool:
    return model == DEMO


def adapter_for(model: str, given: dict | None = None) -> AdapterConfig:
    """The adapter of a run on `model`: the fields `given` (a config file's section, flags), the others the model's
    default: the demo's preset, or LoRA r16 with alpha twice the rank."""
    fields = {**(DEMO_ADAPTER if is_demo(model) else MODEL_ADAPTER), **(given or {})}
    if isinstance(fields["r"], int):  # a rank that is no integer is refused by AdapterConfig, naming it
        fields.setdefault("alpha", 2.0 * fields["r"])  # LLaMA-Factory's rule: the scale alpha / r stays 2 at any rank
    return AdapterConfig.from_dict(fields)


def default_data() -> DataConfig:
    return DataConfig(source="uuid", num_examples=32, max_len=None)


@dataclass
class TrainConfig:
    model: str = "tiny"  # built-in "tiny" or "smollm2" (qmor/model/files.py), a local Hugging Face folder, or a hub id
    output: str = ""  # run folder; empty: runs/<timestamp>
    adapter: AdapterConfig | None = None  # family, rank, targets, init (qmor.config); None: the model's default
    quant: QuantConfig = field(default_factory=QuantConfig)  # NF4 block size, double quantisation, compute dtype
    data: DataConfig = field(default_factory=default_data)  # source, format, max_len, packing (data.pipeline)
    lr: float | None = None  # peak learning rate (after warmup), cosine decay to zero; None: the demo's or the family's
    epochs: float | None = None  # passes over the training set, used when max_steps is 0; None: the demo's 1, or 3
    max_steps: int | None = None  # optimizer steps; 0: derived from epochs; None: the demo's 120 (unless epochs are
    # given), else 0
    batch_size: int | None = None  # sequences per micro-batch per process; None: the demo's 16, else the largest up
    # to EFFECTIVE_BATCH that fits in free memory
    grad_accum: int | None = None  # micro-batches per optimizer step; None: the demo's 1, else EFFECTIVE_BATCH over
    # the sequences a micro-batch of every process holds
    warmup_ratio: float = 0.05  # share of the steps with a linear warmup from zero
    weight_decay: float = 0.0  # AdamW weight decay on the adapter parameters
    max_grad_norm: float = 1.0  # clip the gradient norm to this (0: no clipping)
    eval_steps: int = 0  # eval loss on the validation split every this many steps (0: only at the end)
    save_steps: int = 100  # resumable checkpoint every this many steps (0: only when stopped)
    keep_checkpoints: int = 2  # how many of the latest checkpoints to keep
    log_steps: int = 10  # training loss logged (averaged) every this many steps
    eval_generate: int = 32  # built-in tasks: greedy-generate and score this many examples at the end (0: off)
    seed: int = 0  # seed of the tiny model, the data order, dropout and the built-in task's records
    gradient_checkpointing: bool = True  # non-reentrant activation checkpointing of every decoder layer
    offload_activations: bool = False  # keep the checkpointed layer inputs in CPU RAM instead of GPU memory
    loss_chunk: int = 1024  # tokens per cross-entropy chunk: full-sequence fp32 logits never exist at once
    tile_tokens: int = TILE  # tokens per tile of each layer's MLP and attention input projections (qmor.model.tile;
    # 0: untiled): a longer batch runs tile by tile, so the MLP's T x intermediate tensors never exist whole
    trust_remote_code: bool = False  # run model code shipped with a hub model (only for models you trust)
    device: str = "auto"  # "auto" (CUDA when available), "cpu" or "cuda"
    lr_scheduler_type: str = "cosine"  # cosine (qmor's: warmup, then cosine to zero) or a transformers scheduler
    report_to: str = "none"  # experiment trackers, comma-separated: tensorboard, wandb, trackio, mlflow (or none)
    attn_implementation: str = "auto"  # transformers' attention kernel: auto (its default), sdpa, eager, flash_...
    calibration: str = ""  # --init calibrated: a data file (any training format) to calibrate on; "": the training data

    def __post_init__(self) -> None:
        for name in ("max_steps", "grad_accum", "batch_size", "loss_chunk", "save_steps", "eval_steps", "log_steps",
                     "eval_generate", "keep_checkpoints", "seed", "tile_tokens"):
            low = 1 if name in ("grad_accum", "batch_size", "loss_chunk", "log_steps", "keep_checkpoints") else 0
            if getattr(self, name) is not None:  # None: decided when the run starts
                check_range(name, getattr(self, name), f"an integer >= {low}", low, None,
                            f"--{name.replace('_', '-')} {max(low, 1)}", integer=True)
        # nan and infinity pass every comparison check silently, so each float is checked for being finite too
        if self.lr is not None:
            check_range("lr", self.lr, "positive and finite", 0.0, None, "--lr 2e-4", open_low=True)
        if self.epochs is not None:
            check_range("epochs", self.epochs, "positive and finite", 0.0, None, "--epochs 1", open_low=True)
        if not (isinstance(self.warmup_ratio, int | float) and 0 <= self.warmup_ratio < 1):
            raise QmorError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}; pass e.g. --warmup-ratio 0.05")
        check_range("weight_decay", self.weight_decay, ">= 0", 0.0, None, "--weight-decay 0")
        check_range("max_grad_norm", self.max_grad_norm, ">= 0 (0: no clipping)", 0.0, None, "--max-grad-norm 1")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise QmorError(f"device must be auto, cpu or cuda, got {self.device!r}")
        check_choice("lr_scheduler_type", self.lr_scheduler_type, SCHEDULERS)
        for name in self.report_to.split(","):
            check_choice("report_to", name.strip(), TRACKERS)
        if "/" not in self.attn_implementation:  # "org/kernel" names a hub kernel, which transformers checks
            check_choice("attn_implementation", self.attn_implementation, ATTENTION)
        if self.adapter is not None:
            self.adapter.check_trainable()  # a run trains, resumed or not


def to_json(cfg: TrainConfig) -> dict:
    return to_dict(cfg)


def from_json(data: dict) -> TrainConfig:
    """Build a TrainConfig from a (possibly partial) nested dict; unknown keys are refused with the valid ones."""
    data = dict(data)
    top = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - top)
    if unknown:
        close = difflib.get_close_matches(unknown[0], top, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise QmorError(f"unknown config key(s) {unknown}; {hint}valid keys: {sorted(top)}")
    defaults = TrainConfig()
    for name, cls in SECTIONS.items():
        section = data.get(name, {})
        if not isinstance(section, dict):
            raise QmorError(f"config key {name!r} must be a mapping of {cls.__name__} fields, got {section!r}")
        if name == "adapter":  # the fields not given are the model's default
            data[name] = adapter_for(data.get("model", defaults.model), section) if section else None
        else:
            data[name] = from_dict(cls, {**to_dict(getattr(defaults, name)), **section})
    return TrainConfig(**data)


def read_config_file(path: str | Path) -> dict:
    """The nested dict in a YAML (.yaml/.yml) or JSON config file."""
    path = Path(path)
    if not path.is_file():
        raise QmorError(f"config file {path} does not exist; check the path given to --config")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # yaml and json raise different types; both mean the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QmorError(f"config file {path} could not be parsed ({first}); fix its syntax") from None
    if not isinstance(data, dict):
        raise QmorError(f"config file {path} must hold a mapping of TrainConfig keys, not {type(data).__name__}")
    return data


def planner_attention(attn_implementation: str) -> str:
    """The planner's attention model for a kernel: eager keeps T x T scores, every other kernel is O(T)."""
    return "eager" if attn_implementation == "eager" else "sdpa"
