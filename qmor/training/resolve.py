"""The settings a run leaves unset (None in its TrainConfig), decided once at its start from what is trained: the
model, its data and the memory free on its device. Each is recorded with where its value came from and printed in
one block; the run's config.json holds the values decided, so a resumed run and the app read the same.

- `settle`, before anything loads: the adapter, the learning rate and the length of the run, from the model's name
  (the built-in demo keeps its preset; qmor/training/config.py) and the family's declaration (qmor/adapters/).
- `fit`, once the data is tokenised and before the weights load: the sequence length (the longest example, capped
  by the model's context), the micro-batch and the gradient accumulation. The planner's peak (qmor.plan) is held
  against the free memory: an unset micro-batch is the largest up to EFFECTIVE_BATCH that fits, an unset length is
  cut to what fits, and settings that cannot fit are refused in one line naming the length and the batch that do.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from qmor.adapters import check_family
from qmor.adapters.config import AdapterConfig
from qmor.errors import QmorError
from qmor.plan import CUDA_CONTEXT, GIB, Geometry, Plan, estimate, longest_sequence
from qmor.training.config import (
    DEMO_RUN,
    EFFECTIVE_BATCH,
    EPOCHS,
    TrainConfig,
    adapter_for,
    is_demo,
    planner_attention,
)

GIVEN, DEFAULT, DATA, PLANNER = "given", "default", "data", "planner"  # where a value came from
MIN_LEN = 8  # the shortest max_len a run takes (DataConfig's check)


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str  # GIVEN (a flag, a config file or the caller), DEFAULT, DATA or PLANNER
    why: str = ""  # what decided the value, when it was not given


@dataclass
class Settings:
    """The decided settings of one run, in the order they are printed, and the notes about them."""

    model: str
    chosen: dict[str, Setting] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def take(self, name: str, given, default, source: str = DEFAULT, why: str = ""):
        """`given` when it is not None, else `default`. A setting is recorded where it is first decided: the demo's
        preset fills its batch and length in `settle`, and `fit` then finds them decided."""
        setting = Setting(given, GIVEN) if given is not None else Setting(default, source, why)
        self.chosen.setdefault(name, setting)
        return setting.value

    def block(self) -> str:
        kind = "the built-in demo's preset" if is_demo(self.model) else "qmor's for any model but the built-in tiny"
        rows = [f"settings on {self.model} (given: by a flag, the config file or the caller; default: {kind}):"]
        for name, s in self.chosen.items():
            why = f" ({s.why})" if s.why else ""
            rows.append(f"  {name:<11} {shown(s.value):<10} {s.source}{why}")
        return "\n".join(rows + [f"note: {n}" for n in self.notes])


def shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------------- settle


def settle(cfg: TrainConfig) -> tuple[TrainConfig, Settings]:
    """The settings that need only the model's name: the adapter, the learning rate and the run's length (and the
    demo's whole preset). The sequence length and the batch of other models are left to `fit`."""
    settings = Settings(cfg.model)
    demo = is_demo(cfg.model)
    adapter = take_adapter(settings, cfg)
    lr = settings.take("lr", cfg.lr, DEMO_RUN["lr"] if demo else check_family(adapter.family).lr,
                       why="" if demo else f"{adapter.family}'s")
    epochs = settings.take("epochs", cfg.epochs, DEMO_RUN["epochs"] if demo else EPOCHS)
    steps = DEMO_RUN["max_steps"] if demo and cfg.epochs is None else 0
    max_steps = settings.take("max_steps", cfg.max_steps, steps, why="" if steps else "by epochs")
    note = length_note(cfg.epochs, cfg.max_steps)
    if note:
        settings.notes.append(note)
    data, batch, accum = cfg.data, cfg.batch_size, cfg.grad_accum
    if demo:
        data = replace(data, max_len=settings.take("max_len", data.max_len, DEMO_RUN["max_len"]))
        batch = settings.take("batch_size", batch, DEMO_RUN["batch_size"])
        accum = settings.take("grad_accum", accum, DEMO_RUN["grad_accum"])
    return replace(cfg, adapter=adapter, lr=lr, epochs=epochs, max_steps=max_steps, data=data, batch_size=batch,
                   grad_accum=accum), settings


def take_adapter(settings: Settings, cfg: TrainConfig) -> AdapterConfig:
    """The adapter given, or the model's default. A config file or flags fill the fields they leave out from that
    default (qmor/training/config.py), so a field equal to the default reads as the default."""
    adapter = cfg.adapter or adapter_for(cfg.model)
    plain = adapter_for(cfg.model)
    default = {"family": plain.family, "rank": plain.r, "init": plain.init,
               "alpha": adapter_for(cfg.model, {"r": adapter.r}).alpha}  # alpha's default follows the rank
    values = {"family": adapter.family, "rank": adapter.r, "alpha": adapter.alpha, "init": adapter.init}
    if not check_family(adapter.family).scaled:  # alpha scales nothing in this family
        del values["alpha"]
    for name, value in values.items():
        why = "twice the rank" if name == "alpha" and not is_demo(cfg.model) else ""
        settings.take(name, None if value == default[name] else value, value, why=why)
    return adapter


def length_note(epochs: float | None, max_steps: int | None) -> str | None:
    """The line that says which of two given lengths a run follows."""
    if epochs is None or not max_steps:
        return None
    return (f"--max-steps {max_steps} and --epochs {epochs:g} are both given: --max-steps wins, the run stops after "
            f"{max_steps} steps")


# ---------------------------------------------------------------------------------------------------- fit


@dataclass
class Room:
    """What fits where the run trains: the planner for this model on this device, and the memory free there."""

    geometry: Geometry
    options: dict  # `estimate`'s keyword arguments for this run on this device
    free: int | None  # bytes available to the plan; None: unknown, so nothing is refused and micro-batches are 1
    where: str  # "on cuda:0", "in RAM": where the memory is, for messages

    @property
    def free_gb(self) -> float:
        return self.free / GIB

    def plan(self, adapter: AdapterConfig, seq_len: int, batch: int) -> Plan:
        return estimate(self.geometry, seq_len, batch, adapter, **self.options)

    def fits(self, adapter: AdapterConfig, seq_len: int, batch: int) -> bool:
        return self.free is None or self.plan(adapter, seq_len, batch).total_bytes <= self.free

    def longest(self, adapter: AdapterConfig, batch: int, upper: int) -> int:
        """The longest length up to `upper` that fits at `batch`: `upper` itself, or a multiple of MIN_LEN (0: none)."""
        if self.fits(adapter, upper, batch):
            return upper
        return longest_sequence(self.geometry, self.free_gb, batch, adapter, step=MIN_LEN, limit=upper, **self.options)

    def largest_batch(self, adapter: AdapterConfig, seq_len: int, upper: int) -> int:
        """The largest batch up to `upper` that fits at `seq_len` (0 if none)."""
        return next((b for b in range(upper, 0, -1) if self.fits(adapter, seq_len, b)), 0)


def plan_options(cfg: TrainConfig, cuda: bool, autocast: bool) -> dict:
    """The planner's keyword arguments for this run: the optimizer and dtypes training picks on the device."""
    return dict(checkpointing=cfg.gradient_checkpointing, offload=cfg.offload_activations, loss_chunk=cfg.loss_chunk,
                optimizer="paged-adamw-8bit" if cuda else "adamw", param_dtype_bytes=2 if cuda else 4,
                device="cuda" if cuda else "cpu", attention=planner_attention(cfg.attn_implementation),
                autocast=autocast, tile=cfg.tile_tokens)


def available(free: int | None, cuda: bool, processes: int) -> int | None:
    """Bytes available to a run's plan, from the bytes free on its device (None: unknown)."""
    if free is None:
        return None
    if cuda:  # reading the free memory started the CUDA context, which the plan counts: it is no longer free
        return free + CUDA_CONTEXT
    return free // processes  # the processes of a CPU run share its RAM


def fit(cfg: TrainConfig, settings: Settings, longest: int, context: int | None, room: Room,
        world: int) -> TrainConfig:
    """The sequence length, micro-batch and accumulation left unset, decided against the free memory; a run whose
    length and batch cannot fit is refused in one line."""
    max_len = take_length(settings, cfg.data.max_len, longest, context)
    per_step = max(1, EFFECTIVE_BATCH // ((cfg.grad_accum or 1) * world))
    batch = cfg.batch_size or largest_divisor(room, cfg.adapter, max_len, per_step)
    if cfg.data.max_len is None and not room.fits(cfg.adapter, max_len, batch):
        shortest = room.longest(cfg.adapter, batch, max_len)
        if shortest >= MIN_LEN:
            max_len = shortest
            settings.chosen["max_len"] = Setting(max_len, PLANNER, f"the longest that fits the {room.free_gb:.1f} "
                                                 f"GiB available at batch {batch}; longer examples are cut")
    if not room.fits(cfg.adapter, max_len, batch):
        raise refusal(room, cfg.adapter, max_len, batch)
    settings.take("batch_size", cfg.batch_size, batch, PLANNER, "free memory unknown" if room.free is None else
                  f"the largest up to {per_step} that fits the {room.free_gb:.1f} GiB available {room.where}")
    if cfg.batch_size is None:  # the micro-batch is qmor's choice, so the accumulation makes up the step
        accum = settings.take("grad_accum", cfg.grad_accum, max(1, EFFECTIVE_BATCH // (batch * world)),
                              why=f"{EFFECTIVE_BATCH} sequences per optimizer step")
    else:  # a batch given is the batch of each step, as in transformers and TRL
        accum = settings.take("grad_accum", cfg.grad_accum, 1, why="--batch-size given: one micro-batch per step")
    return replace(cfg, data=replace(cfg.data, max_len=max_len), batch_size=batch, grad_accum=accum)


def context_of(model_config) -> int | None:
    """The longest sequence the model was built for (None when its config does not say)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return getattr(text, "max_position_embeddings", None)


def take_length(settings: Settings, given: int | None, longest: int, context: int | None) -> int:
    """The sequence length given, or the longest example's cut to the model's context."""
    if context is not None and longest > context:
        why = f"the longest example has {longest} tokens, cut to the model's context"
    else:
        why = "the longest example"
    return settings.take("max_len", given, max(MIN_LEN, min(longest, context or longest)), DATA, why)


def largest_divisor(room: Room, adapter: AdapterConfig, max_len: int, per_step: int) -> int:
    """The largest micro-batch that divides `per_step` and fits (1 when none does or the free memory is unknown,
    so the accumulation makes up the rest)."""
    if room.free is None:
        return 1
    divisors = [b for b in range(per_step, 0, -1) if per_step % b == 0]
    return next((b for b in divisors if room.fits(adapter, max_len, b)), 1)


def refusal(room: Room, adapter: AdapterConfig, max_len: int, batch: int) -> QmorError:
    """The one line for a run that cannot fit: what it needs, and the length and the batch that do fit."""
    need = room.plan(adapter, max_len, batch).total_bytes / GIB
    longest = room.longest(adapter, batch, max_len)
    largest = room.largest_batch(adapter, max_len, batch)
    fixes = ([f"--max-len {longest} at --batch-size {batch}"] if longest >= MIN_LEN else []) + (
        [f"--batch-size {largest} at --max-len {max_len}"] if largest else [])
    fix = ("what fits: " + " or ".join(fixes)) if fixes else (
        f"even 1 x {MIN_LEN} tokens does not fit; free memory {room.where}, try --offload-activations or a smaller "
        "model")
    return QmorError(f"{batch} x {max_len} tokens does not fit: the planner predicts {need:.2f} GiB, "
                     f"{room.free_gb:.2f} GiB available {room.where}; {fix}")
