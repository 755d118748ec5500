"""The training loop: a 4-bit base with a trainable adapter, on accelerate (one device, or data parallel under
`accelerate launch` / `torchrun`), with chunked loss, checkpoints, resume and a metrics log the app polls.

Read top to bottom: resolve the run, load data (bad data stops here, before any output exists), load the model,
create the run folder, then step: micro-batches -> chunked loss -> backward -> clip -> optimizer -> schedule.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from qmor import fsdp
from qmor.adapters import MERGEABLE
from qmor.attach import aux_loss, count_parameters
from qmor.builtin import resolve_model
from qmor.checkpoint import checkpoint_dirs, load_checkpoint, resumable_checkpoint, rng_state, save_checkpoint
from qmor.data import build_datasets, collate, data_notes
from qmor.errors import QmorError
from qmor.evaluate import eval_loss, score_task
from qmor.files import load_json, save_json
from qmor.loss import ChunkedLoss, enable_checkpointing
from qmor.metrics import METRICS, PLOT, MetricsLog
from qmor.packing import check_documents_apart
from qmor.template import template_text
from qmor.train_config import TrainConfig, from_json, to_json

CONFIG = "config.json"
# what a run that failed before its first checkpoint leaves behind: such a folder is started afresh, not refused
LEFTOVERS = {CONFIG, METRICS, PLOT, "loftq_report.json", "train.log", "checkpoints"}


# ---------------------------------------------------------------------------------------------------- setup


def load_tokenizer(model_path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    from qmor.quant import LOAD_ERRORS, check_model_source, load_failed

    check_model_source(model_path)
    try:
        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as e:
        raise load_failed(model_path, e, "tokenizer") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out of attention and loss, so any id will do
    return tok


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device):
    if device.type == "cuda":
        from qmor.quant import paged_adamw_8bit

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


def make_accelerator(device: str, cfg: TrainConfig):
    from accelerate import Accelerator

    cpu = device == "cpu" or not torch.cuda.is_available()
    if device.startswith("cuda:") and not cpu:
        torch.cuda.set_device(torch.device(device))
    bf16 = not cpu and torch.cuda.is_bf16_supported() and cfg.quant.compute_dtype in ("auto", "bfloat16")
    # the model is loaded straight onto its device, so accelerate must not move it (4-bit weights cannot be cast)
    return Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else "no", device_placement=False)


def default_output(accelerator) -> str:
    from accelerate.utils import broadcast_object_list

    name = [f"runs/{time.strftime('%Y%m%d-%H%M%S')}"]
    return broadcast_object_list(name)[0] if accelerator.num_processes > 1 else name[0]


# ---------------------------------------------------------------------------------------------------- the run


def train(cfg: TrainConfig, resume: bool = False, on_step: Callable[[int, torch.nn.Module], None] | None = None
          ) -> dict:
    """Run (or with `resume`, continue) training; returns the final figures. `on_step(step, model)` is called on
    every process after each optimizer step (tests use it to compare data-parallel replicas)."""
    accelerator = make_accelerator(cfg.device, cfg)
    main = accelerator.is_main_process
    run_dir = Path(cfg.output or default_output(accelerator))
    say = tqdm.write if main else (lambda *_: None)
    if resume:
        cfg = from_json(load_json(run_dir / CONFIG))  # the saved config rules; only the folder comes from the caller
        cfg.output = str(run_dir)
        checkpoint = resumable_checkpoint(run_dir, lambda line: tqdm.write(line, file=sys.stderr) if main else None)
        restart = False
    else:
        cfg.output = str(run_dir)
        checkpoint = None
        restart = check_fresh(run_dir)
    torch.manual_seed(cfg.seed + accelerator.process_index)
    if fsdp.requested():
        fsdp.check(cfg.quant.storage, accelerator.num_processes)

    with accelerator.main_process_first():  # the tiny model and the LoftQ cache are built once, then read
        model_path = resolve_model(cfg.model, cfg.seed)
        tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
        train_set, val_set, stats = build_datasets(tokenizer, cfg.data)
        model, meta, report = load_model(cfg, model_path, checkpoint, str(accelerator.device))
    # chat and export render conversations with exactly the template training used (None: plain text, no template)
    meta.chat_template = None if stats.format == "text" else template_text(tokenizer)
    if cfg.data.packing:
        check_documents_apart(model)

    if main:
        report_memory(cfg, model, accelerator)
        for note in data_notes(stats, cfg.data.source):
            say(f"note: {note}")
    # loading worked: only now does the run folder appear
    if main:
        if restart:
            say(f"note: {run_dir} holds a run that failed before its first checkpoint; starting it afresh")
            clear_failed_run(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            save_json(to_json(cfg), run_dir / CONFIG)
            if report is not None:
                save_json(report, run_dir / "loftq_report.json")
    accelerator.wait_for_everyone()
    log = MetricsLog(run_dir) if main else None
    try:
        return _loop(cfg, accelerator, model, meta, tokenizer, train_set, val_set, stats, run_dir, checkpoint, log,
                     on_step)
    except Exception as e:
        if log is not None:
            with contextlib.suppress(OSError):  # a full disk must not hide the error that ended the run
                log.log("error", message=str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise


def check_fresh(run_dir: Path) -> bool:
    """Refuse a folder that holds a run or anything else; True when it holds only what a run that failed before
    its first checkpoint leaves behind (that run is started afresh, so no one has to delete files by hand)."""
    if not run_dir.exists():
        return False
    if not run_dir.is_dir():
        raise QmorError(f"output {run_dir} is a file; choose a folder for --output")
    names = {p.name for p in run_dir.iterdir()}
    if not names:
        return False
    if names - LEFTOVERS or checkpoint_dirs(run_dir):
        raise QmorError(f"output folder {run_dir} already holds a run; pass --resume to continue it or choose "
                        "another --output")
    return True


def clear_failed_run(run_dir: Path) -> None:
    for name in LEFTOVERS - {"train.log"}:  # train.log is the app's record of every attempt: it grows
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def diverged(step: int, what: str, cfg: TrainConfig, run_dir: Path) -> QmorError:
    """The one line for a run whose loss, gradient or weights stopped being numbers."""
    found = checkpoint_dirs(run_dir)
    kept = (f"the last good checkpoint {found[-1].name} is kept; start a new run with another --output"
            if found else "nothing was saved, so run it again with the same --output")
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


def report_memory(cfg: TrainConfig, model: torch.nn.Module, accelerator) -> None:
    """Print the planner's predicted peak before the first step, and warn when it exceeds the GPU: running out of
    memory an hour in is the most expensive way to find out."""
    from qmor.plan import GIB, estimate

    device = accelerator.device
    cuda = device.type == "cuda"
    plan = estimate(model.config, cfg.data.max_len, cfg.batch_size, cfg.adapter,
                    checkpointing=cfg.gradient_checkpointing, offload=cfg.offload_activations,
                    loss_chunk=cfg.loss_chunk, optimizer="paged-adamw-8bit" if cuda else "adamw",
                    param_dtype_bytes=2 if cuda else 4, device="cuda" if cuda else "cpu",
                    autocast=accelerator.mixed_precision == "bf16")
    tqdm.write(f"memory plan: predicted peak {plan.total_bytes / GIB:.2f} GiB at {cfg.batch_size} x "
               f"{cfg.data.max_len} tokens (see scripts/plan.py for the breakdown)")
    if cuda:
        capacity = torch.cuda.get_device_properties(device).total_memory / GIB
        if not plan.fits(capacity):
            tqdm.write(f"warning: {plan.verdict(capacity)} on this GPU; try --offload-activations, a smaller "
                       "--batch-size or --max-len, or a smaller --loss-chunk\n" + plan.table())


def load_model(cfg: TrainConfig, model_path: str, checkpoint: Path | None, device: str):
    """A fresh model (LoftQ-initialised or default), or on resume the base it started from plus the checkpoint's
    adapter (for LoftQ that base is the cached Q_T, not nf4(W))."""
    from qmor.load import load_for_training, load_trained

    if checkpoint is not None:
        model, meta = load_trained(checkpoint / "adapter", device, model_path, cfg.trust_remote_code)
        report = None
    else:
        model, meta, report = load_for_training(model_path, cfg.adapter, cfg.quant, device,
                                                trust_remote_code=cfg.trust_remote_code)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    return model, meta, report


def _loop(cfg, accelerator, model, meta, tokenizer, train_set, val_set, stats, run_dir, checkpoint, log, on_step):
    from accelerate.utils import gather_object

    main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    say = tqdm.write if main else (lambda *_: None)
    emit = log.log if log is not None else (lambda *a, **k: None)
    total_steps = planned_steps(cfg, len(train_set), world)
    loss_fn = ChunkedLoss(model, cfg.loss_chunk, cfg.offload_activations)
    sharded = fsdp.requested()
    if sharded:  # before the optimizer is built: it holds the sharded parameters
        say(f"FSDP: {fsdp.shard(loss_fn, model)} decoder layers and the rest of the model sharded over {world} "
            "processes")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, accelerator.device)
    scheduler = cosine_schedule(optimizer, total_steps, cfg.warmup_ratio)
    if sharded and not getattr(accelerator, "is_fsdp2", False):  # on CPUs accelerate would wrap it in DDP
        optimizer = accelerator.prepare(optimizer)
    else:  # on GPUs accelerate's FSDP2 path takes a model that is sharded already as it is
        loss_fn, optimizer = accelerator.prepare(loss_fn, optimizer)

    step, position = 0, 0  # optimizer steps done; training examples consumed by all processes together
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, optimizer, scheduler, rank)
        if sharded:
            fsdp.shard_optimizer_state(optimizer)
        step, position = state["step"], state["position"]
        if log is not None:
            log.forget_after(step)
        say(f"resuming {run_dir} from {checkpoint.name} (step {step} of {total_steps})")
    trainable, total = count_parameters(model)
    say(f"{meta.adapter.family} r={meta.adapter.r} on {cfg.model}: {trainable:,} trainable of {total:,} parameters; "
        f"{stats.n_train} training sequences, {stats.n_val} validation, {total_steps} steps")
    emit("start", total_steps=total_steps, step=step, run_dir=str(run_dir), model=cfg.model,
         family=meta.adapter.family, trainable_params=trainable, n_train=stats.n_train, n_val=stats.n_val,
         resumed=checkpoint is not None, n_truncated=stats.n_truncated, n_dropped=stats.n_dropped,
         n_skipped=stats.n_skipped, n_empty=stats.n_empty, template=stats.template, packed=stats.packed)

    pad_id = tokenizer.pad_token_id
    per_step = cfg.batch_size * cfg.grad_accum * world
    perms: dict = {}
    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.time()
    run_start, start_step = time.time(), step
    last_loss, last_eval = None, None

    def checkpoint_now() -> Path | None:
        if not all_finite(params):  # never save weights that are not numbers over a good checkpoint
            raise diverged(step, "the adapter weights are not finite", cfg, run_dir)
        rngs = gather_object([rng_state()]) if world > 1 else [rng_state()]
        # under FSDP every process takes part in gathering the shards; the main process writes them
        whole = (fsdp.adapter_state(model), fsdp.optimizer_state(optimizer)) if sharded else (None, None)
        path = None
        if main:
            path = save_checkpoint(run_dir, accelerator.unwrap_model(loss_fn).lm, meta, optimizer, scheduler, rngs,
                                   {"step": step, "position": position, "total_steps": total_steps,
                                    "epoch": position / len(train_set)}, cfg.keep_checkpoints, *whole)
            emit("checkpoint", step=step, path=str(path))
        accelerator.wait_for_everyone()
        return path

    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", disable=not main, dynamic_ncols=True)
    with stop_requests() as stop, bar:  # the bar closes on an error too, so the error line starts a line
        while step < total_steps:
            # -- one optimizer step over grad_accum micro-batches
            batches = []
            for m in range(cfg.grad_accum):
                at = position + m * cfg.batch_size * world + rank * cfg.batch_size
                idx = example_order(len(train_set), cfg.seed, at, cfg.batch_size, perms)
                batches.append({k: v.to(accelerator.device) for k, v in collate([train_set[i] for i in idx],
                                                                                 pad_id).items()})
                window_tokens += sum(len(train_set[i]["input_ids"]) for i in idx) * world  # padding not counted
            n_label = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)  # tokens the window averages
            step_loss = 0.0
            for m, batch in enumerate(batches):
                sync = m == len(batches) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(loss_fn):
                    loss_sum, _ = loss_fn(**batch)
                    loss = loss_sum / max(n_label, 1)
                    extra = aux_loss(model)  # SiRA's load balancing; None for the other families
                    if extra is not None:
                        loss = loss + cfg.adapter.aux_loss_weight * extra / len(batches)
                    accelerator.backward(loss)
                step_loss += loss_sum.item() / max(n_label, 1)
            grad_norm = (accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0
                         else grad_norm_of(params))
            grad_norm = float(grad_norm)
            bad = not (math.isfinite(step_loss) and math.isfinite(grad_norm))
            if world > 1:  # every process stops at the same step, or the next all-reduce would hang
                bad = bool(accelerator.reduce(torch.tensor(int(bad), device=accelerator.device), "sum").item())
            if bad:  # the step is not taken: the weights stay those of the last finite step
                optimizer.zero_grad(set_to_none=True)
                raise diverged(step + 1, f"loss {step_loss:.4g}, gradient norm {grad_norm:.4g}", cfg, run_dir)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, position = step + 1, position + per_step
            if world > 1:
                step_loss = accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), "mean").item()
            if on_step is not None:
                on_step(step, accelerator.unwrap_model(loss_fn).lm)
            window_loss, window_steps = window_loss + step_loss, window_steps + 1
            bar.update(1)

            # -- logging, eval, checkpoints
            if step % cfg.log_steps == 0 or step == total_steps:
                elapsed = time.time() - window_start
                tps = window_tokens / max(elapsed, 1e-9)
                eta = (time.time() - run_start) / (step - start_step) * (total_steps - step)
                last_loss = window_loss / window_steps
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
                say(f"step {step:>5}/{total_steps}  loss {last_loss:.4f}  lr {lr:.2e}  {tps:,.0f} tok/s")
                emit("train", step=step, loss=last_loss, lr=lr, tokens_per_s=tps, eta_s=eta,
                     epoch=position / len(train_set), grad_norm=grad_norm)
                window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.time()
            if val_set and cfg.eval_steps and step % cfg.eval_steps == 0 and step < total_steps:
                last_eval = eval_loss(accelerator.unwrap_model(loss_fn), val_set, cfg.batch_size, pad_id,
                                      accelerator.device)
                say(f"step {step:>5}/{total_steps}  eval loss {last_eval:.4f}")
                emit("eval", step=step, eval_loss=last_eval)
            if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
                checkpoint_now()
            signum = stop["signal"]
            if world > 1:  # every process must stop at the same step, or the next all-reduce would hang
                signum = int(accelerator.reduce(torch.tensor(signum, device=accelerator.device), "sum").item())
            if signum and step < total_steps:
                bar.close()
                path = checkpoint_now()
                say(f"stopped at step {step}; continue with --resume --output {run_dir}")
                emit("stopped", step=step, checkpoint=str(path), signal=signum)
                return {"run_dir": str(run_dir), "step": step, "stopped": True, "signal": signum,
                        "checkpoint": str(path), "loss": last_loss}
    bar.close()
    return _finish(cfg, accelerator, loss_fn, meta, tokenizer, val_set, run_dir, step, last_loss, last_eval,
                   time.time() - run_start, emit)


def _finish(cfg, accelerator, loss_fn, meta, tokenizer, val_set, run_dir, step, last_loss, last_eval, seconds, emit):
    """Final adapter, eval loss, generation score and the `done` event."""
    from qmor.attach import save_adapter

    model = accelerator.unwrap_model(loss_fn).lm
    if not all_finite([p for p in model.parameters() if p.requires_grad]):
        raise diverged(step, "the adapter weights are not finite", cfg, run_dir)
    result = {"run_dir": str(run_dir), "step": step, "stopped": False, "loss": last_loss, "train_seconds": seconds,
              "adapter": str(run_dir / "adapter")}
    if val_set:
        last_eval = eval_loss(accelerator.unwrap_model(loss_fn), val_set, cfg.batch_size, tokenizer.pad_token_id,
                              accelerator.device)
        emit("eval", step=step, eval_loss=last_eval)
    result["eval_loss"] = last_eval
    sharded = fsdp.is_sharded(model)
    whole = fsdp.adapter_state(model) if sharded else None  # gathered by every process, written by the main one
    if accelerator.is_main_process:
        save_adapter(model, run_dir / "adapter", meta, whole)
        if sharded and cfg.eval_generate:  # generation would run on the main process alone, with half the weights
            tqdm.write("note: no generation score under FSDP; chat with the adapter: scripts/chat.py --adapter "
                       f"{run_dir}")
        scores = None if sharded else score_task(model, tokenizer, cfg.data, cfg.eval_generate)
        if scores is not None:
            result.update(char_accuracy=scores["char_accuracy"], exact_match=scores["exact_match"],
                          n_scored=scores["n"])
            for ex in scores["examples"]:
                tqdm.write(f"  {ex['prompt']!r} -> {ex['prediction']!r} (reference {ex['reference']!r})")
            tqdm.write(f"{cfg.data.source}: character accuracy {scores['char_accuracy']:.3f}, exact match "
                       f"{scores['exact_match']:.3f} on {scores['n']} examples (greedy generation)")
        emit("done", **{k: v for k, v in result.items() if k != "stopped"})
        tqdm.write(f"wrote {run_dir}: adapter/, config.json, metrics.jsonl, loss.png")
        if meta.adapter.family in MERGEABLE:
            tqdm.write(f"merge it into an fp16 model: python scripts/export_fp16.py {run_dir} --output {run_dir}-fp16")
    accelerator.wait_for_everyone()
    return result
