"""The training options, one row each: the CLI parser (scripts/finetune_4bit.py), the app's form and command
builder (apps/) and the README's flag table (scripts/flags_table.py) are all built from `FLAGS`.

A row names its flag, the TrainConfig field it sets, its type and help; its default is read from TrainConfig and
its choices from where they are defined (the adapter registry, the data formats, the built-in tasks), so neither
can drift. An option whose default depends on what is trained (None in TrainConfig) shows as `auto`, with how a run
decides it (qmor/training/resolve.py); the app leaves it out of the command unless it is set. A new training option
is a field in its config dataclass plus one row here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
from collections.abc import Callable
from dataclasses import dataclass

from qmor.adapters import ADAPTERS, option_defaults, option_fields
from qmor.adapters.config import EXPERT_ADAPTERS, AdapterConfig
from qmor.data.pipeline import FILE_TYPES, FORMATS
from qmor.data.tasks import NAMES as TASKS
from qmor.errors import QmorError
from qmor.training.config import (
    ATTENTION,
    DEMO_ADAPTER,
    DEMO_RUN,
    EFFECTIVE_BATCH,
    EPOCHS,
    MODEL_ADAPTER,
    SCHEDULERS,
    TRACKERS,
    TrainConfig,
)

# where the app shows a row, in this order; the README's table follows the same order
GROUPS = ("model", "data", "adapter", "family", "init", "training", "memory")
WIDGETS = ("text", "number", "checkbox", "dropdown", "radio", "combo")  # combo: a dropdown that takes typed values


@dataclass(frozen=True)
class Flag:
    name: str  # the CLI flag, "--lr"; its key ("lr") is the argparse dest, the form field and the API parameter
    field: str  # the TrainConfig field it sets, dotted into sections: "lr", "adapter.r", "data.max_len"
    kind: type  # str, int or float: the value's type; bool: an on/off switch (--X / --no-X)
    help: str  # one line for --help and the README; the default is added where shown
    group: str  # one of GROUPS
    label: str = ""  # the app's label; "" keeps the row out of the app's form
    widget: str = ""  # one of WIDGETS; "" picks from kind and choices (checkbox, dropdown, number or text)
    choices: tuple[str, ...] = ()  # the values a dropdown or radio offers (a combo's are suggestions)
    only_when: tuple[str, tuple[str, ...]] | None = None  # (key, values): used (and shown) only when that option has
    # one of these values, e.g. ("family", ("sira",)); otherwise left out of the app's command
    aliases: tuple[str, ...] = ()  # other flag names for the same option, e.g. ("--learning-rate",)
    also: tuple[str, ...] = ()  # further fields given the same value (--seed seeds the built-in tasks too)
    parse: Callable[[str], object] | None = None  # the flag's text -> the config value, where it is not just kind
    minimum: float | None = None  # bounds of the app's number box (the config's checks are the real range)
    maximum: float | None = None
    scale: int = 1  # the widget's relative width in its row of the form
    info: str = ""  # a hint under the app's widget
    auto: str = ""  # how a run decides the value when it is not given ("": a fixed default); the default shows as auto

    @property
    def key(self) -> str:
        return self.name[2:].replace("-", "_")

    @property
    def default(self):
        """The value a run gets when the flag is not given; None where the run decides it (`auto`)."""
        return None if self.auto else default_of(self.field)

    @property
    def shown_default(self) -> str:
        """The default as --help, the README and the app's hints show it."""
        return f"auto: {self.auto}" if self.auto else str(self.default)

    @property
    def switch(self) -> bool:
        return self.kind is bool

    @property
    def in_app(self) -> bool:
        return bool(self.label)

    @property
    def shown_as(self) -> str:
        if self.widget:
            return self.widget
        if self.switch:
            return "checkbox"
        if self.choices:
            return "dropdown"
        return "number" if self.kind in (int, float) else "text"

    def help_text(self) -> str:
        """The help line with a closed list's choices, as --help (which adds the default) and the README show it."""
        text = self.help
        if self.choices and self.shown_as in ("dropdown", "radio"):
            text += ": " + " | ".join(self.choices)
        return text

    def applies(self, values: dict) -> bool:
        """Whether the option is used given the other options' values (an absent one counts as its default)."""
        if self.only_when is None:
            return True
        key, allowed = self.only_when
        given = values.get(key)
        return (by_key()[key].default if given in (None, "") else given) in allowed

    def to_config(self, value):
        """A flag's value (as argparse gives it) -> the config value."""
        return self.parse(value) if self.parse and isinstance(value, str) else value


@functools.cache
def _defaults() -> TrainConfig:
    # the adapter fields that are the same for every model (dropout, targets, ...); the others are auto
    return TrainConfig(adapter=AdapterConfig())


def default_of(field: str):
    section, _, name = field.rpartition(".")
    if section == "adapter" and name in option_defaults():  # a family option's default is its family's own
        return option_defaults()[name]
    value = _defaults()
    for part in field.split("."):
        value = getattr(value, part)
    return value


def parse_targets(text: str) -> str | list[str]:
    """all-linear, a comma list of name suffixes, a single plain name, or else a regex."""
    if text in ("all-linear", "all"):  # "all" is LLaMA-Factory's lora_target for every linear
        return "all-linear"
    if "," in text:
        return [t.strip() for t in text.split(",") if t.strip()]
    return [text] if text.replace("_", "").replace(".", "").isalnum() else text


def family_uses() -> dict[str, tuple[str, ...]]:
    """Which adapter families read each family-specific option: alpha (every family that scales), then each
    family's own options as its file declares them."""
    uses = {"alpha": tuple(name for name, spec in ADAPTERS.items() if spec.scaled)}
    for f in option_fields():
        uses[f.key] = (*uses.get(f.key, ()), f.family)
    return uses


def rank_help() -> str:
    """--rank's help: what r is, with each family whose declaration gives it another meaning."""
    special = [f"{name}: {spec.rank_means}" for name, spec in ADAPTERS.items() if spec.rank_means]
    return f"adapter rank ({'; '.join(special)})" if special else "adapter rank"


def unscaled() -> str:
    """Which families alpha does not scale, as the alpha flag's help says it."""
    names = [name for name, spec in ADAPTERS.items() if not spec.scaled]
    return f"not used by {', '.join(names)}" if names else "used by every family"


def family_flags() -> list[Flag]:
    """The adapter families' own options, read from their declarations and shown with the family chosen; an option
    that several families declare (experts) is one flag."""
    uses, first = family_uses(), {}
    for f in option_fields():
        first.setdefault(f.key, f)
    flags = []
    for key, f in first.items():
        names = " / ".join(uses[key])
        low = f.spec.low if f.spec.low is not None and not f.spec.open_low else None
        flags.append(Flag(f.flag, f"adapter.{key}", f.type, f"{names}: {f.spec.help}", "family",
                          f.spec.label or key, choices=f.spec.choices, only_when=("family", uses[key]),
                          minimum=low if f.type is int else None))
    return flags


def demo_or(demo, other) -> str:
    """How an auto option is decided: the built-in demo's preset value, or what every other model gets."""
    return f"tiny {f'{demo:g}' if isinstance(demo, float) else demo}; other models {other}"


def rate(lr: float) -> str:
    """2e-4, as learning rates are written."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def family_rates() -> str:
    return ", ".join(f"{name} {rate(spec.lr)}" for name, spec in ADAPTERS.items())


def _table() -> list[Flag]:
    return [
        Flag("--model", "model", str, "tiny or smollm2 (built-in), a local Hugging Face folder, or a hub id", "model",
             "Model (hub id, local folder, or built-in 'tiny' / 'smollm2')", scale=3,
             aliases=("--model-name-or-path",)),
        Flag("--device", "device", str, "where to train (cuda:N picks one GPU)", "model", "Device",
             choices=("auto", "cuda", "cpu")),
        Flag("--trust-remote-code", "trust_remote_code", bool, "run model code from the hub (only for trusted models)",
             "model", "Trust remote code", info="runs code from the model repository"),
        Flag("--output", "output", str, "run folder (default runs/<timestamp>)", "model", aliases=("--output-dir",)),
        Flag("--attn-implementation", "attn_implementation", str, "attention kernel passed to transformers (auto: "
             "its default; the planner counts eager's T x T scores, any other as O(T))", "model",
             choices=ATTENTION),
        Flag("--dataset", "data.source", str, f"built-in task ({', '.join(TASKS)}), a {'/'.join(FILE_TYPES)} "
             "file, a datasets folder or a Hub dataset id", "data",
             "Dataset (built-in name, file path in the workspace, or Hub id)", widget="combo", choices=TASKS, scale=3),
        Flag("--format", "data.format", str, "record format", "data", "Format", choices=("auto", *FORMATS)),
        Flag("--split", "data.split", str, "split to train on; files and Hub ids take slices too (train[:1000])",
             "data", "Split (or a slice: train[:1000])"),
        Flag("--subset", "data.subset", str, "a Hub dataset's configuration (load_dataset's name)", "data",
             "Hub subset (e.g. main)"),
        Flag("--columns", "data.columns", str, "the dataset's columns mapped onto qmor's fields: "
             "prompt=question,completion=answer", "data", "Columns (prompt=question,completion=answer)", scale=2),
        Flag("--num-examples", "data.num_examples", int, "built-in tasks: number of records (0: task default)",
             "data", "Examples (built-in tasks; 0 = task default)"),
        Flag("--skip-bad", "data.skip_bad", bool, "skip malformed records (counted) instead of stopping", "data",
             "Skip bad records"),
        Flag("--family", "adapter.family", str, "adapter family", "adapter", "Adapter family", widget="radio",
             choices=tuple(ADAPTERS), scale=3, auto=demo_or(DEMO_ADAPTER["family"], MODEL_ADAPTER["family"])),
        Flag("--rank", "adapter.r", int, rank_help(),
             "adapter", "Rank r", minimum=1, aliases=("--lora-r", "--lora-rank"),
             auto=demo_or(DEMO_ADAPTER["r"], MODEL_ADAPTER["r"])),
        Flag("--alpha", "adapter.alpha", float, f"scale alpha / rank ({unscaled()})", "adapter", "Alpha",
             only_when=("family", family_uses()["alpha"]), aliases=("--lora-alpha",),
             auto=demo_or(DEMO_ADAPTER["alpha"], "twice the rank")),
        Flag("--dropout", "adapter.dropout", float, "dropout on the adapter input", "adapter", "Dropout", minimum=0,
             maximum=0.99, aliases=("--lora-dropout",)),
        Flag("--targets", "adapter.targets", str, "all-linear (or all) | comma list of name suffixes (q_proj,v_proj) "
             "| regex", "adapter", "Targets", parse=parse_targets, info="all-linear, q_proj,v_proj, or a regex",
             aliases=("--lora-target", "--target-modules")),
        Flag("--expert-adapters", "adapter.expert_adapters", str, "MoE experts (--targets experts): an adapter "
             "per expert, or one per block and map shared by its experts", "adapter", "Expert adapters (MoE)",
             choices=EXPERT_ADAPTERS),
        *family_flags(),
        Flag("--init", "adapter.init", str, "adapter initialisation", "init", "Initialisation", widget="radio",
             choices=("loftq", "calibrated", "default"), auto=demo_or(DEMO_ADAPTER["init"], MODEL_ADAPTER["init"])),
        Flag("--loftq-iters", "adapter.loftq_iters", int, "alternations T of rounding and fit (LoftQ's, and the "
             "calibrated init's)", "init", "LoftQ iterations", only_when=("init", ("loftq", "calibrated")),
             minimum=1),
        Flag("--calibration-samples", "adapter.calibration_samples", int, "sequences the calibrated init runs "
             "through the model (the first of the data)", "init", "Calibration samples",
             only_when=("init", ("calibrated",)), minimum=1),
        Flag("--calibration", "calibration", str, "data file the calibrated init reads instead of the training data",
             "init", only_when=("init", ("calibrated",))),
        Flag("--lr", "lr", float, "peak learning rate (after the warmup)", "training", "Learning rate",
             aliases=("--learning-rate",), auto=demo_or(rate(DEMO_RUN["lr"]), f"the family's: {family_rates()}")),
        Flag("--lr-scheduler-type", "lr_scheduler_type", str, "learning rate schedule after the linear warmup "
             "(cosine: to zero at the last step; the others are transformers' get_scheduler)", "training",
             choices=SCHEDULERS),
        Flag("--epochs", "epochs", float, "passes over the data, used when --max-steps is 0", "training", "Epochs",
             aliases=("--num-train-epochs",), auto=demo_or(DEMO_RUN["epochs"], f"{EPOCHS:g}")),
        Flag("--max-steps", "max_steps", int, "optimizer steps (0: from --epochs; given with --epochs, it wins)",
             "training", "Max steps (0 = by epochs)", minimum=0,
             auto=f"tiny {DEMO_RUN['max_steps']} unless --epochs is given; otherwise 0 (by epochs)"),
        Flag("--batch-size", "batch_size", int, "sequences per micro-batch per process", "training", "Batch size",
             minimum=1, aliases=("--per-device-train-batch-size",),
             auto=demo_or(DEMO_RUN["batch_size"], f"the largest up to {EFFECTIVE_BATCH} that fits in free memory")),
        Flag("--grad-accum", "grad_accum", int, "micro-batches per optimizer step", "training", "Grad accumulation",
             minimum=1, aliases=("--gradient-accumulation-steps",),
             auto=demo_or(DEMO_RUN["grad_accum"], f"{EFFECTIVE_BATCH} sequences per step / (batch size x processes), "
                          "or 1 when --batch-size is given")),
        Flag("--max-len", "data.max_len", int, "tokens per sequence; longer examples are truncated (and counted), a "
             "data set with no example that fits is refused", "training", "Max length (tokens)", minimum=8,
             aliases=("--max-length", "--cutoff-len", "--max-seq-length"),
             auto=demo_or(DEMO_RUN["max_len"], "the longest tokenised example, within the model's context and what "
                          "fits in free memory")),
        Flag("--warmup-ratio", "warmup_ratio", float, "share of steps with linear warmup", "training", "Warmup ratio"),
        Flag("--weight-decay", "weight_decay", float, "AdamW weight decay", "training", "Weight decay"),
        Flag("--max-grad-norm", "max_grad_norm", float, "gradient clipping norm (0: off)", "training",
             "Max grad norm"),
        Flag("--val-size", "data.val_size", float, "validation split: fraction (<1) or count", "training",
             "Validation size (fraction or count)"),
        Flag("--eval-steps", "eval_steps", int, "eval loss every N steps (0: at the end only)", "training",
             "Eval every (steps)"),
        Flag("--save-steps", "save_steps", int, "checkpoint every N steps (0: only when stopped)", "training",
             "Checkpoint every (steps)"),
        Flag("--log-steps", "log_steps", int, "log the averaged loss every N steps", "training", "Log every (steps)",
             minimum=1, aliases=("--logging-steps",)),
        Flag("--keep-checkpoints", "keep_checkpoints", int, "how many checkpoints to keep", "training",
             "Checkpoints kept", aliases=("--save-total-limit",)),
        Flag("--report-to", "report_to", str, "experiment trackers, comma-separated (accelerate's; each needs its "
             "package)", "training", choices=TRACKERS),
        Flag("--eval-generate", "eval_generate", int, "built-in tasks: score greedy answers on N examples at the end",
             "training", "Score answers at end (examples)", minimum=0),
        Flag("--seed", "seed", int, "seed of the tiny model, data order, dropout and built-in records", "training",
             "Seed", also=("data.seed",)),
        Flag("--packing", "data.packing", bool, "pack several examples into each sequence", "training", "Packing"),
        Flag("--train-on-prompt", "data.train_on_prompt", bool, "also compute the loss on prompt tokens", "training",
             "Train on prompt"),
        Flag("--gradient-checkpointing", "gradient_checkpointing", bool, "recompute each decoder layer in backward "
             "(off: faster, much more memory)", "memory", "Gradient checkpointing"),
        Flag("--offload-activations", "offload_activations", bool, "keep checkpointed activations in CPU RAM",
             "memory", "Offload activations to CPU"),
        Flag("--loss-chunk", "loss_chunk", int, "tokens per cross-entropy chunk (full logits never exist)", "memory",
             "Loss chunk (tokens)", minimum=0),
        Flag("--tile-tokens", "tile_tokens", int, "tokens per tile of each layer's MLP and attention projections "
             "(0: untiled)", "memory", "Tile (tokens)", minimum=0),
        Flag("--quant-storage", "quant.storage", str, "container dtype of the 4-bit codes: uint8, or bfloat16 for "
             "FSDP", "memory"),
    ]


FLAGS: list[Flag] = _table()


@functools.cache
def by_key() -> dict[str, Flag]:
    return {f.key: f for f in FLAGS}


@functools.cache
def config_keys() -> dict[str, Flag]:
    """Flat config-file keys -> their row: every flag's name and alias as a key (lr, learning_rate, lora_r,
    cutoff_len, max_len), so a recipe written for transformers, TRL or LLaMA-Factory reads as it is."""
    return {name[2:].replace("-", "_"): f for f in FLAGS for name in (f.name, *f.aliases)}


def set_field(data: dict, field: str, value) -> None:
    """data[section][...][name] = value for the dotted TrainConfig field "section.name", making the sections. A
    section that is no mapping is left as it is: from_json refuses it, naming it."""
    *sections, name = field.split(".")
    where = data
    for section in sections:
        where = where.setdefault(section, {})
    if isinstance(where, dict):
        where[name] = value


def nest_config(data: dict, source: str) -> dict:
    """A config file's mapping with its flat keys moved to the nested fields they set (`cutoff_len: 512` ->
    data.max_len), numbers written as text read as numbers (YAML reads 1e-4 as a string); a key that is neither a
    TrainConfig key nor a flat one is refused naming the closest valid key, an option set under two names too."""
    top = {f.name for f in dataclasses.fields(TrainConfig)}
    out, named = {}, {}  # named: field -> the key that set it
    for key, value in data.items():
        flat = str(key).replace("-", "_")
        if key in top:
            out[key] = dict(value) if isinstance(value, dict) else value
            named.update({f"{key}.{k}": f"{key}: {k}" for k in value} if isinstance(value, dict) else {key: key})
        elif flat not in config_keys():
            close = difflib.get_close_matches(flat, [*top, *config_keys()], n=1)
            raise QmorError(f"{source}: unknown key {key!r}; " + (f"did you mean {close[0]!r}?" if close else
                                                                   f"valid keys: {', '.join(sorted(top))}"))
    for key, value in data.items():
        flag = config_keys().get(str(key).replace("-", "_"))
        if key in top and (flag is None or flag.field != key):
            continue
        if isinstance(value, str) and flag.kind in (int, float):
            with contextlib.suppress(ValueError):  # a value that is not a number is refused by the config's check
                value = flag.kind(value)
        if key in top:
            out[key] = value
            continue
        if flag.field in named:
            raise QmorError(f"{source} sets {flag.field} twice, as {named[flag.field]!r} and {key!r}; keep one")
        named[flag.field] = key
        set_field(out, flag.field, flag.to_config(value))
    return out
