"""The training loop: a 4-bit base with a trainable adapter, on accelerate (one device, or data parallel under
`accelerate launch` / `torchrun`), with chunked loss, checkpoints, resume and a metrics log the app polls.

Two entry points: `train(cfg)` starts a run, deciding what its config leaves unset (qmor/training/resolve.py);
`resume(run_dir)` continues one with its own saved config. Both hand a `Training` its folder; read it top to bottom:
load the data, decide the length and batch against the free memory and load the model (bad data, or settings that
cannot fit, stop here, before any output exists), create the run folder, set up optimizer and schedule, then step
(micro-batches -> chunked loss -> backward -> clip -> optimizer -> schedule), log, evaluate, checkpoint, and finish
with the final adapter.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from tqdm import tqdm

from qmor import hints
from qmor.adapters import check_family
from qmor.adapters.attach import aux_loss, count_parameters, save_adapter
from qmor.data.packing import check_documents_apart
from qmor.data.pipeline import collate, data_notes, empty_warning, prepare, read_examples
from qmor.data.template import template_text
from qmor.errors import QmorError
from qmor.files import save_json
from qmor.model.base import Base, TrainedAdapter
from qmor.model.load import load_for_training, load_trained
from qmor.model.moe import unadapted_experts
from qmor.model.quant import paged_adamw_8bit
from qmor.model.tile import tile as tile_layers
from qmor.plan import GIB, Plan, estimate, geometry
from qmor.training import fsdp, measure, trackers
from qmor.training.calibration import calibration_ids
from qmor.training.checkpoint import ADAPTER, load_checkpoint, rng_state, save_checkpoint
from qmor.training.config import TrainConfig, to_json
from qmor.training.evaluate import eval_loss, score_task
from qmor.training.loss import ChunkedLoss, enable_checkpointing
from qmor.training.metrics import MetricsLog
from qmor.training.resolve import Room, Settings, available, context_of, fit, length_note, plan_options, settle
from qmor.training.run_dir import RunDir

OnStep = Callable[[int, torch.nn.Module], None]


# ---------------------------------------------------------------------------------------------------- setup


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device):
    if device.type == "cuda":
        return paged_adamw_8bit(params, cfg.lr, cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def cosine_schedule(optimizer, total_steps: int, warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from zero, then cosine decay to zero at the last step."""
    warmup = round(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_schedule(optimizer, cfg: TrainConfig, total_steps: int):
    """cosine: qmor's own (above); any other name: transformers' scheduler of that name, same warmup steps."""
    if cfg.lr_scheduler_type == "cosine":
        return cosine_schedule(optimizer, total_steps, cfg.warmup_ratio)
    from transformers import get_scheduler

    return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=round(cfg.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def follow_schedule(scheduler) -> None:
    """After loading a schedule's state, which keeps its step but not its curve: the learning rate of that step from
    the curve built now (the same value for an unchanged length; on the new curve for a run given a new length)."""
    scheduler.last_epoch -= 1
    scheduler.step()


def example_order(n: int, seed: int, position: int, count: int, cache: dict) -> list[int]:
    """Indices `position .. position + count` of an endless stream of shuffled epochs (one permutation per
    epoch, seeded): any position can be resumed without replaying the data before it."""
    out = []
    for i in range(position, position + count):
        epoch, j = divmod(i, n)
        if epoch not in cache:
            cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        out.append(cache[epoch][j])
    return out


def planned_steps(cfg: TrainConfig, n_train: int, world: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_train / (cfg.batch_size * cfg.grad_accum * world)))


@contextlib.contextmanager
def stop_requests():
    """Turn SIGINT / SIGTERM into a request to stop at the next step boundary (a second signal acts at once)."""
    flag = {"signal": 0}
    if threading.current_thread() is not threading.main_thread():  # signals can only be caught there
        yield flag
        return

    def handler(signum, frame):
        flag["signal"] = signum
        signal.signal(signum, previous[signum])

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def make_accelerator(device: str, cfg: TrainConfig) -> Accelerator:
    cpu = device == "cpu" or not torch.cuda.is_available()
    if device.startswith("cuda:") and not cpu:
        torch.cuda.set_device(torch.device(device))
    bf16 = not cpu and torch.cuda.is_bf16_supported() and cfg.quant.compute_dtype in ("auto", "bfloat16")
    # the model is loaded straight onto its device, so accelerate must not move it (4-bit weights cannot be cast)
    return Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else "no", device_placement=False)


def default_output(accelerator) -> str:
    name = [f"runs/{time.strftime('%Y%m%d-%H%M%S')}"]
    return broadcast_object_list(name)[0] if accelerator.num_processes > 1 else name[0]


# ---------------------------------------------------------------------------------------------------- the run


def train(cfg: TrainConfig, on_step: OnStep | None = None) -> dict:
    """Train a new run into cfg.output (empty: runs/<timestamp>); returns the final figures. What `cfg` leaves unset
    (None) is decided here and in `Training.load`. `on_step(step, model)` is called on every process after each
    optimizer step (tests use it to compare data-parallel replicas)."""
    cfg, settings = settle(cfg)  # before anything loads, so a bad setting is one line and nothing else
    accelerator = make_accelerator(cfg.device, cfg)
    run_dir = RunDir(cfg.output or default_output(accelerator))
    cfg.output = str(run_dir)
    restart = run_dir.check_fresh()
    return Training(cfg, run_dir, accelerator, on_step, settings).run(checkpoint=None, restart=restart)


def resume(run_dir: str | Path | RunDir, on_step: OnStep | None = None, max_steps: int | None = None,
           epochs: float | None = None) -> dict:
    """Continue the run in `run_dir` from its newest intact checkpoint. The run's own config.json rules: the same
    data order, optimizer, schedule and RNG, so the steps after the checkpoint are those a straight run takes.

    `max_steps` or `epochs` give the run a new length (a finished run too, from the checkpoint of its last step):
    config.json records it, and the schedule is built for the new total and followed from the checkpoint's step on,
    warmup included, as if the run had been planned that long. A finished run given neither is left as it is."""
    run_dir = RunDir(run_dir)
    cfg = run_dir.read_config()
    cfg.output = str(run_dir)  # the folder may have been moved since
    new_length = max_steps is not None or epochs is not None
    if new_length:
        cfg = with_length(cfg, max_steps, epochs)
    accelerator = make_accelerator(cfg.device, cfg)
    main = accelerator.is_main_process
    finished = run_dir.finished_step()
    if finished is not None and not new_length:
        if main:
            tqdm.write(f"{run_dir} is finished at step {finished} of {finished}; to train it further pass --max-steps "
                       f"M (more than {finished}) or --epochs E with --resume")
        return {"run_dir": str(run_dir), "step": finished, "stopped": False, "finished": True}
    note = length_note(epochs, max_steps)
    if note and main:
        tqdm.write(f"note: {note}")
    checkpoint = run_dir.resumable_checkpoint(lambda line: tqdm.write(line, file=sys.stderr) if main else None)
    settings = Settings(cfg.model)  # config.json holds every value, so nothing is left to decide
    return Training(cfg, run_dir, accelerator, on_step, settings).run(checkpoint=checkpoint, new_length=new_length)


def with_length(cfg: TrainConfig, max_steps: int | None, epochs: float | None) -> TrainConfig:
    """The config with a new length (checked like any config): epochs alone lift the step count, so they decide;
    given both, the steps do."""
    if epochs is None:
        return replace(cfg, max_steps=max_steps)
    return replace(cfg, epochs=epochs, max_steps=max_steps or 0)


@dataclass
class Window:
    """The steps since the last `train` event, which that event averages."""

    loss: float = 0.0  # sum of the steps' mean token losses
    steps: int = 0
    tokens: int = 0  # tokens read by all processes (padding not counted)
    start: float = field(default_factory=time.time)


class Training:
    """One run, from loading to the final adapter. The state its phases share lives here: the optimizer step, the
    data position, the loss window and the latest logged and evaluated losses."""

    def __init__(self, cfg: TrainConfig, run_dir: RunDir, accelerator, on_step: OnStep | None, settings: Settings):
        self.cfg, self.run_dir, self.accelerator, self.on_step = cfg, run_dir, accelerator, on_step
        self.settings = settings  # what the run's config left unset, as decided so far
        self.main = accelerator.is_main_process
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.metrics: MetricsLog | None = None  # the main process writes the log
        self.step = 0  # optimizer steps done
        self.position = 0  # training examples consumed by all processes together
        self.window = Window()
        self.last_loss: float | None = None  # the latest window's mean loss
        self.last_eval: float | None = None  # the latest eval loss
        self.lr, self.grad_norm = 0.0, 0.0  # of the latest step
        self.orders: dict[int, list[int]] = {}  # the shuffled order of each epoch seen so far
        trackers.check_installed(cfg.report_to)  # before anything loads: a missing package is one line
        self.tracking = False  # whether experiment trackers are started (on the main process)
        self.sharded = False  # whether FSDP shards the model over the processes
        self.memory_baseline = measure.start(accelerator.device)

    def run(self, checkpoint: Path | None, restart: bool = False, new_length: bool = False) -> dict:
        self.load(checkpoint)
        if new_length:
            self.check_length(checkpoint)
        self.create_folder(restart, write_config=checkpoint is None or new_length)
        try:
            self.setup(checkpoint)
            return self.loop()
        except Exception as e:
            if self.metrics is not None:
                with contextlib.suppress(OSError):  # a full disk must not hide the error that ended the run
                    self.metrics.log("error", message=str(e).strip().splitlines()[0] if str(e).strip()
                                     else type(e).__name__)
            raise

    def say(self, line: str) -> None:
        if self.main:
            tqdm.write(line)

    def emit(self, event: str, **fields) -> None:
        if self.metrics is not None:
            record = self.metrics.log(event, **fields)
            if self.tracking:
                self.tracking = trackers.log(self.accelerator, record)

    # ------------------------------------------------------------------------------------------------ setup

    def load(self, checkpoint: Path | None) -> None:
        """Tokenizer and data, then the length and batch that fit, then the model; nothing is written yet, so bad
        data, settings that cannot fit or a bad model leave no folder behind."""
        cfg, accelerator = self.cfg, self.accelerator
        torch.manual_seed(cfg.seed + self.rank)
        if fsdp.requested():
            fsdp.check(cfg.quant.storage, self.world)
        # the main process's figure for all, so every process decides the same batch; under FSDP the planner's
        # whole-model plan is not what a process holds, so nothing is refused
        free = self.shared(None if fsdp.requested() else measure.free_bytes(accelerator.device))
        with accelerator.main_process_first():  # the tiny model and the LoftQ cache are built once, then read
            base = Base.resolve(cfg.model, cfg.seed, cfg.trust_remote_code)
            self.tokenizer = base.tokenizer()
            examples = read_examples(self.tokenizer, cfg.data)
            self.cfg = cfg = self.fit(cfg, examples.longest, base, free)
            if checkpoint is None:
                self.say(self.settings.block())
            self.train_set, self.val_set, self.stats = prepare(examples, cfg.data)
            calibration = (calibration_ids(cfg, self.train_set, self.tokenizer)
                           if checkpoint is None and cfg.adapter.init == "calibrated" else None)
            self.model, self.meta, self.loftq_report = load_model(cfg, base, checkpoint, str(accelerator.device),
                                                                  calibration)
        self.total_steps = planned_steps(cfg, len(self.train_set), self.world)
        # chat and export render conversations with exactly the template training used (None: plain text, no template)
        self.meta.chat_template = None if self.stats.format == "text" else template_text(self.tokenizer)
        if cfg.data.packing:
            check_documents_apart(self.model)
        if self.main:
            report_memory(cfg, self.model, accelerator, self.room.free)
            for note in data_notes(self.stats, cfg.data.source):
                self.say(f"note: {note}")
            warning = empty_warning(self.stats, cfg.data.source)
            if warning:
                tqdm.write(f"warning: {warning}", file=sys.stderr)

    def fit(self, cfg: TrainConfig, longest: int, base: Base, free: int | None) -> TrainConfig:
        """The sequence length and batch the config leaves unset, decided against the memory free on the device."""
        config = base.config()
        cuda = self.accelerator.device.type == "cuda"
        shapes = geometry(config, cfg.adapter.targets, cfg.adapter.expert_adapters)
        self.room = Room(shapes, plan_options(cfg, cuda, self.accelerator.mixed_precision == "bf16"),
                         available(free, cuda, self.world), f"on {self.accelerator.device}" if cuda else "in RAM")
        return fit(cfg, self.settings, longest, context_of(config), self.room, self.world)

    def shared(self, value):
        """The main process's `value` on every process."""
        return broadcast_object_list([value])[0] if self.world > 1 else value

    def check_length(self, checkpoint: Path) -> None:
        """A new length has to lie beyond the step the run continues from: steps already taken cannot be undone."""
        step = RunDir.step_of(checkpoint)
        if self.total_steps <= step:
            raise QmorError(f"{self.run_dir} is at step {step} and the new length is {self.total_steps} steps; pass "
                            f"--max-steps above {step} (or more --epochs) with --resume to train it further")

    def create_folder(self, restart: bool, write_config: bool) -> None:
        """Loading worked: only now does the run folder appear (a resumed run keeps its config, unless given a new
        length, and its report)."""
        run_dir = self.run_dir
        if self.main:
            if restart:
                self.say(f"note: {run_dir} holds a run that failed before its first checkpoint; starting it afresh")
                run_dir.clear_failed()
            run_dir.path.mkdir(parents=True, exist_ok=True)
            if write_config:
                save_json(to_json(self.cfg), run_dir.config)
                if self.loftq_report is not None:
                    save_json(self.loftq_report, run_dir.loftq_report)
        self.accelerator.wait_for_everyone()
        self.metrics = MetricsLog(run_dir) if self.main else None

    def setup(self, checkpoint: Path | None) -> None:
        """Optimizer, schedule and loss; on resume their state, the RNG and the data position from the checkpoint."""
        cfg, accelerator = self.cfg, self.accelerator
        self.per_step = cfg.batch_size * cfg.grad_accum * self.world  # examples one optimizer step consumes
        self.pad_id = self.tokenizer.pad_token_id
        loss_fn = ChunkedLoss(self.model, cfg.loss_chunk, cfg.offload_activations)
        self.sharded = fsdp.requested()
        if self.sharded:  # before the optimizer is built: it holds the sharded parameters
            self.say(f"FSDP: {fsdp.shard(loss_fn, self.model)} decoder layers and the rest of the model sharded over "
                     f"{self.world} processes")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = make_optimizer(self.params, cfg, accelerator.device)
        self.scheduler = make_schedule(optimizer, cfg, self.total_steps)
        if self.sharded and not getattr(accelerator, "is_fsdp2", False):  # on CPUs accelerate would wrap it in DDP
            self.loss_fn, self.optimizer = loss_fn, accelerator.prepare(optimizer)
        else:  # on GPUs accelerate's FSDP2 path takes a model that is sharded already as it is
            self.loss_fn, self.optimizer = accelerator.prepare(loss_fn, optimizer)
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, self.optimizer, self.scheduler, self.rank)
            follow_schedule(self.scheduler)
            if self.sharded:
                fsdp.shard_optimizer_state(self.optimizer)
            self.step, self.position = state["step"], state["position"]
            if self.metrics is not None:
                self.metrics.forget_after(self.step)
            self.say(f"resuming {self.run_dir} from {checkpoint.name} (step {self.step} of {self.total_steps})")
        if self.main:
            self.tracking = trackers.start(accelerator, cfg.report_to, self.run_dir, to_json(cfg))
        trainable, total = count_parameters(self.model)
        family, stats = self.meta.adapter.family, self.stats
        self.say(f"{family} r={self.meta.adapter.r} on {cfg.model}: {trainable:,} trainable of {total:,} parameters; "
                 f"{stats.n_train} training sequences, {stats.n_val} validation, {self.total_steps} steps")
        experts = unadapted_experts(self.model, cfg.adapter.targets, total - trainable)
        if experts:
            self.say(f"note: {experts}")
        self.emit("start", total_steps=self.total_steps, step=self.step, run_dir=str(self.run_dir), model=cfg.model,
                  family=family, trainable_params=trainable, optimizer=type(optimizer).__name__,
                  mixed_precision=accelerator.mixed_precision, n_train=stats.n_train, n_val=stats.n_val,
                  resumed=checkpoint is not None, n_truncated=stats.n_truncated, n_dropped=stats.n_dropped,
                  n_skipped=stats.n_skipped, n_empty=stats.n_empty, template=stats.template, packed=stats.packed)
        self.window = Window()
        self.start_time, self.start_step = time.time(), self.step

    # ------------------------------------------------------------------------------------------------ the loop

    def loop(self) -> dict:
        cfg, total = self.cfg, self.total_steps
        self.bar = tqdm(total=total, initial=self.step, desc="training", unit="step", disable=not self.main,
                        dynamic_ncols=True)
        with stop_requests() as stop, self.bar:  # the bar closes on an error too, so the error line starts a line
            while self.step < total:
                self.train_step()
                if self.step % cfg.log_steps == 0 or self.step == total:
                    self.log()
                if self.val_set and cfg.eval_steps and self.step % cfg.eval_steps == 0 and self.step < total:
                    self.say(f"step {self.step:>5}/{total}  eval loss {self.evaluate():.4f}")
                # the last step is kept too, so a finished run can be given more steps
                if cfg.save_steps and (self.step % cfg.save_steps == 0 or self.step == total):
                    self.checkpoint()
                signum = self.stop_signal(stop)
                if signum and self.step < total:
                    return self.stopped(signum)
        return self.finish()

    def train_step(self) -> None:
        """One optimizer step over grad_accum micro-batches; a step whose loss or gradient is not finite is not
        taken, and the run stops."""
        cfg, accelerator = self.cfg, self.accelerator
        batches = self.micro_batches()
        n_label = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)  # tokens the window averages
        step_loss = 0.0
        for m, batch in enumerate(batches):
            sync = m == len(batches) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(self.loss_fn):
                loss_sum, _ = self.loss_fn(**batch)
                loss = loss_sum / max(n_label, 1)
                extra = aux_loss(self.model)  # SiRA's weighted load balancing; None for the other families
                if extra is not None:
                    loss = loss + extra / len(batches)
                accelerator.backward(loss)
            step_loss += loss_sum.item() / max(n_label, 1)
        grad_norm = float(accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm) if cfg.max_grad_norm > 0
                          else grad_norm_of(self.params))
        bad = not (math.isfinite(step_loss) and math.isfinite(grad_norm))
        if self.world > 1:  # every process stops at the same step, or the next all-reduce would hang
            bad = bool(accelerator.reduce(torch.tensor(int(bad), device=accelerator.device), "sum").item())
        if bad:  # the step is not taken: the weights stay those of the last finite step
            self.optimizer.zero_grad(set_to_none=True)
            raise self.diverged(self.step + 1, f"loss {step_loss:.4g}, gradient norm {grad_norm:.4g}")
        self.optimizer.step()
        self.lr, self.grad_norm = self.scheduler.get_last_lr()[0], grad_norm
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step, self.position = self.step + 1, self.position + self.per_step
        if self.world > 1:
            step_loss = accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), "mean").item()
        if self.on_step is not None:
            self.on_step(self.step, self.unwrapped().lm)
        self.window.loss, self.window.steps = self.window.loss + step_loss, self.window.steps + 1
        self.bar.update(1)

    def micro_batches(self) -> list[dict[str, torch.Tensor]]:
        """This process's share of the next step: each process reads its own slice of every micro-batch."""
        cfg, n = self.cfg, len(self.train_set)
        batches = []
        for m in range(cfg.grad_accum):
            at = self.position + m * cfg.batch_size * self.world + self.rank * cfg.batch_size
            idx = example_order(n, cfg.seed, at, cfg.batch_size, self.orders)
            rows = collate([self.train_set[i] for i in idx], self.pad_id)
            batches.append({k: v.to(self.accelerator.device) for k, v in rows.items()})
            self.window.tokens += sum(len(self.train_set[i]["input_ids"]) for i in idx) * self.world
        return batches

    def log(self) -> None:
        """The window's mean loss, speed and ETA: on the console and as a `train` event; a new window starts."""
        now, step, total = time.time(), self.step, self.total_steps
        tps = self.window.tokens / max(now - self.window.start, 1e-9)
        eta = (now - self.start_time) / (step - self.start_step) * (total - step)
        self.last_loss = self.window.loss / self.window.steps
        self.bar.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{self.lr:.2e}", tok_s=f"{tps:.0f}")
        self.say(f"step {step:>5}/{total}  loss {self.last_loss:.4f}  lr {self.lr:.2e}  {tps:,.0f} tok/s")
        self.emit("train", step=step, loss=self.last_loss, lr=self.lr, tokens_per_s=tps, eta_s=eta,
                  epoch=self.position / len(self.train_set), grad_norm=self.grad_norm)
        self.window = Window()

    def evaluate(self) -> float:
        """Eval loss on the validation split, logged as an `eval` event."""
        self.last_eval = eval_loss(self.unwrapped(), self.val_set, self.cfg.batch_size, self.pad_id,
                                   self.accelerator.device)
        self.emit("eval", step=self.step, eval_loss=self.last_eval)
        return self.last_eval

    def checkpoint(self) -> Path | None:
        """A resumable checkpoint of this step (written by the main process; the path there, None elsewhere)."""
        if not all_finite(self.params):  # never save weights that are not numbers over a good checkpoint
            raise self.diverged(self.step, "the adapter weights are not finite")
        rngs = gather_object([rng_state()]) if self.world > 1 else [rng_state()]
        # under FSDP every process takes part in gathering the shards; the main process writes them
        whole = (fsdp.adapter_state(self.model), fsdp.optimizer_state(self.optimizer)) if self.sharded else ()
        path = None
        if self.main:
            state = {"step": self.step, "position": self.position, "total_steps": self.total_steps,
                     "epoch": self.position / len(self.train_set)}
            path = save_checkpoint(self.run_dir.checkpoint(self.step), self.unwrapped().lm, self.meta,
                                   self.optimizer, self.scheduler, rngs, state, *whole)
            self.run_dir.prune_checkpoints(self.step, self.cfg.keep_checkpoints)
            self.emit("checkpoint", step=self.step, path=str(path))
        self.accelerator.wait_for_everyone()
        return path

    def stop_signal(self, stop: dict) -> int:
        signum = stop["signal"]
        if self.world > 1:  # every process must stop at the same step, or the next all-reduce would hang
            signum = int(self.accelerator.reduce(torch.tensor(signum, device=self.accelerator.device), "sum").item())
        return signum

    def stopped(self, signum: int) -> dict:
        """Asked to stop: checkpoint this step and say how to continue."""
        self.bar.close()
        path = self.checkpoint()
        self.say(f"stopped at step {self.step}; {hints.resume(self.run_dir)}")
        self.emit("stopped", step=self.step, checkpoint=str(path), signal=signum)
        trackers.finish(self.accelerator)
        return {"run_dir": str(self.run_dir), "step": self.step, "stopped": True, "signal": signum,
                "checkpoint": str(path), "loss": self.last_loss}

    def finish(self) -> dict:
        """Final adapter, eval loss, generation score and the `done` event."""
        cfg, run_dir, model = self.cfg, self.run_dir, self.unwrapped().lm
        if not all_finite(self.params):
            raise self.diverged(self.step, "the adapter weights are not finite")
        result = {"run_dir": str(run_dir), "step": self.step, "stopped": False, "loss": self.last_loss,
                  "train_seconds": time.time() - self.start_time, "adapter": str(run_dir.adapter)}
        if self.val_set:
            self.evaluate()
        result["eval_loss"] = self.last_eval
        # every run checks the planner: its prediction beside what this process measured (qmor/training/measure.py)
        result["peak_memory_bytes"] = measure.peak_since(self.accelerator.device, self.memory_baseline)
        result["predicted_peak_bytes"] = measure.planned_live_bytes(memory_plan(cfg, model, self.accelerator))
        whole = fsdp.adapter_state(model) if self.sharded else None  # gathered by every process, written by one
        if self.main:
            save_adapter(model, run_dir.adapter, self.meta, whole)
            if self.sharded and cfg.eval_generate:  # generation would run on one process, with part of the weights
                tqdm.write("note: no generation score under FSDP; try the adapter in the chat below")
            scores = None if self.sharded else score_task(model, self.tokenizer, cfg.data, cfg.eval_generate)
            if scores is not None:
                result.update(char_accuracy=scores["char_accuracy"], exact_match=scores["exact_match"],
                              n_scored=scores["n"])
                for ex in scores["examples"]:
                    tqdm.write(f"  {ex['prompt']!r} -> {ex['prediction']!r} (reference {ex['reference']!r})")
                tqdm.write(f"{cfg.data.source}: character accuracy {scores['char_accuracy']:.3f}, exact match "
                           f"{scores['exact_match']:.3f} on {scores['n']} examples (greedy generation)")
            self.emit("done", **{k: v for k, v in result.items() if k != "stopped"})
            trackers.finish(self.accelerator)
            tqdm.write(f"memory: peak {result['peak_memory_bytes'] / GIB:.2f} GiB measured, "
                       f"{result['predicted_peak_bytes'] / GIB:.2f} GiB planned")
            tqdm.write(f"wrote {run_dir}: {RunDir.ADAPTER}/, {RunDir.CONFIG}, {RunDir.METRICS}, {RunDir.PLOT}")
            tqdm.write(hints.chat(run_dir))
            if check_family(self.meta.adapter.family).merges:
                tqdm.write(hints.export(run_dir))
        self.accelerator.wait_for_everyone()
        return result

    def unwrapped(self) -> ChunkedLoss:
        return self.accelerator.unwrap_model(self.loss_fn)

    def diverged(self, step: int, what: str) -> QmorError:
        """The one line for a run whose loss, gradient or weights stopped being numbers."""
        cfg, latest = self.cfg, self.run_dir.latest_checkpoint()
        kept = (f"the last good checkpoint {latest.name} is kept; start a new run with another --output"
                if latest else "nothing was saved, so run it again with the same --output")
        return QmorError(f"training diverged at step {step}: {what}; lower --lr "
                         f"(now {cfg.lr:g}), keep --max-grad-norm on (now {cfg.max_grad_norm:g}) or check the data; "
                         f"no adapter was written, {kept}")


def grad_norm_of(params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def all_finite(params: list[torch.nn.Parameter]) -> bool:
    # a sharded (FSDP) parameter is checked by its local shard
    return all(bool(torch.isfinite(getattr(p, "_local_tensor", p).detach()).all()) for p in params)


def memory_plan(cfg: TrainConfig, model: torch.nn.Module, accelerator) -> Plan:
    """The planner's prediction for this run on this device."""
    cuda = accelerator.device.type == "cuda"
    return estimate(model.config, cfg.data.max_len, cfg.batch_size, cfg.adapter,
                    **plan_options(cfg, cuda, accelerator.mixed_precision == "bf16"))


def report_memory(cfg: TrainConfig, model: torch.nn.Module, accelerator, free: int | None) -> None:
    """Print the planner's predicted peak before the first step beside the memory that was free (a run that could
    not fit was refused before loading)."""
    plan = memory_plan(cfg, model, accelerator)
    # the planner's command reads the run's config.json (written before the first step); it plans for a GPU
    breakdown = hints.command("plan", "--config", RunDir(cfg.output).config, "--optimizer", "paged-adamw-8bit")
    room = "" if free is None else f" of {free / GIB:.2f} GiB available"
    tqdm.write(f"memory plan: predicted peak {plan.total_bytes / GIB:.2f} GiB{room} at {cfg.batch_size} x "
               f"{cfg.data.max_len} tokens; the breakdown on a GPU: {breakdown}")


def load_model(cfg: TrainConfig, base: Base, checkpoint: Path | None, device: str,
               calibration: list[torch.Tensor] | None = None):
    """A fresh model (LoftQ- or calibrated-initialised, or default), or on resume the base it started from plus the
    checkpoint's adapter (for LoftQ and calibrated that base is the cached Q_T, not nf4(W))."""
    if checkpoint is not None:
        model, meta = load_trained(TrainedAdapter.open(checkpoint / ADAPTER, base), device)
        report = None
    else:
        model, meta, report = load_for_training(base, cfg.adapter, cfg.quant, device, calibration=calibration)
    model.config.use_cache = False
    if cfg.attn_implementation != "auto":
        set_attention(model, cfg.attn_implementation)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.tile_tokens:
        tile_layers(model, cfg.tile_tokens)
    model.train()
    return model, meta, report


def set_attention(model: torch.nn.Module, name: str) -> None:
    """The attention kernel asked for (transformers switches it on the loaded model, so every loading path, LoftQ's
    included, gets it); one that this model or machine lacks is one line."""
    try:
        model.set_attn_implementation(name)
    except (ValueError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QmorError(f"attn_implementation {name} is not available here ({first}); pass --attn-implementation "
                        "sdpa or eager") from None
