"""The measuring stages of the GPU check (scripts/gpu_check.py), each run in a process of its own.

`paths` runs qmor's own entry points on the tiny built-in model; `geometry` and `longest` run the training
benchmark's runners (scripts/bench_runner.py) on the Llama-3.1-8B shape. Every result is one record, written as
soon as it is known.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_runner import (  # noqa: E402
    BASELINE,
    GEOMETRIES,
    Memory,
    Runner,
    build_model,
    planned,
    planned_longest,
    preload,
    search,
)

from qmor.model.tile import TILE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


def emit(out: Path, stage: str, line: str, **fields) -> dict:
    """Print a result's line and append its record at once, so a run cut short keeps it."""
    record = {"stage": stage, "time": time.time(), "line": line, **fields}
    print(f"[{stage}] {line}", flush=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    return record


@dataclass
class Check:
    """What a stage needs to know: where it runs, at which size, until when, and where its records go."""

    device: str  # cuda, or cpu for the toy run
    tiny: bool  # toy sizes: the code paths in seconds, not the figures
    out: Path  # JSON lines, appended
    work: Path  # runs, exports and the LoftQ caches
    deadline: float  # unix time by which the whole check should be done

    def emit(self, stage: str, line: str, **fields) -> dict:
        return emit(self.out, stage, line, **fields)

    def attempt(self, stage: str, what: str, run: Callable[[], None]) -> None:
        """Run one check; its failure becomes a record and the stage goes on with the next."""
        try:
            run()
        except Exception as e:  # any failure of one check is a result, not the end of the stage
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self.emit(stage, f"{what}: FAILED ({type(e).__name__}: {first})", check=what, ok=False,
                      error=f"{type(e).__name__}: {first}")


# ---------------------------------------------------------------------------------------------------- paths


def paths(check: Check) -> None:
    """qmor's CUDA paths on the tiny built-in model, through the same functions the commands call."""
    from qmor.adapters import ADAPTERS, check_family

    start = time.time()
    families = list(ADAPTERS)
    for family in families:
        check.attempt("paths", f"train {family}", lambda family=family: train_and_reload(check, family))
    # the toy run takes one family through the paths that do not branch on it
    mergeable = [f for f in families if check_family(f).merges][: 1 if check.tiny else None]
    for family in mergeable:
        check.attempt("paths", f"export {family}", lambda family=family: export(check, family))
    for family in families[: 1 if check.tiny else None]:
        check.attempt("paths", f"loftq {family}", lambda family=family: loftq(check, family))
    check.attempt("paths", "cli", lambda: cli(check))
    seconds = time.time() - start
    check.emit("paths", f"all paths in {seconds:.0f} s (limit 90 s)", check="time", ok=seconds <= 90,
               seconds=seconds)


def autocast(device: str):
    return torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")


def probe_logits(model: torch.nn.Module, device: str) -> torch.Tensor:
    """Logits of a fixed batch, in eval mode under the training's autocast."""
    ids = torch.randint(8, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(device):
        out = model(input_ids=ids.to(device)).logits.float().cpu()
    model.train(was_training)
    return out


def train_config(check: Check, family: str, **changes):
    from qmor.adapters.config import AdapterConfig
    from qmor.data.pipeline import DataConfig
    from qmor.training.config import TrainConfig

    data = DataConfig(source="uuid", num_examples=16 if check.tiny else 32, max_len=96)
    return TrainConfig(model="tiny", output=str(check.work / f"run-{family}"), data=data, lr=5e-3, max_steps=10,
                       batch_size=4 if check.tiny else 16, log_steps=1, eval_generate=0, save_steps=0,
                       device=check.device, adapter=AdapterConfig(family=family, r=8), **changes)


def train_and_reload(check: Check, family: str) -> None:
    """10 steps whose loss falls, with the optimizer and autocast training picks on this device; then the saved
    adapter loaded on a fresh base gives the trained model's logits bit for bit."""
    from qmor.model.load import load_trained
    from qmor.training.loop import train
    from qmor.training.run_dir import RunDir

    cfg = train_config(check, family)
    final = {}

    def keep_logits(step: int, model: torch.nn.Module) -> None:
        if step == cfg.max_steps:
            final["logits"] = probe_logits(model, check.device)

    start = time.time()
    result = train(cfg, keep_logits)
    events = RunDir(cfg.output).read_events()
    losses = [e["loss"] for e in events if e["event"] == "train"]
    optimizer, precision = next((e["optimizer"], e["mixed_precision"]) for e in events if e["event"] == "start")
    falls = len(losses) == cfg.max_steps and losses[-1] < losses[0]
    # the path under test on CUDA is bf16 autocast with paged 8-bit AdamW; anything else did not test it
    expected = ("PagedAdamW8bit", "bf16" if torch.cuda.is_bf16_supported() else "no") if check.device == "cuda" \
        else ("AdamW", "no")
    check.emit("paths", f"train {family}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps "
               f"({optimizer}, mixed precision {precision}, {time.time() - start:.1f} s)", check=f"train {family}",
               family=family, ok=falls and (optimizer, precision) == expected, losses=losses, optimizer=optimizer,
               mixed_precision=precision, seconds=time.time() - start)
    model, _ = load_trained(result["adapter"], check.device)
    diff = (probe_logits(model, check.device) - final["logits"]).abs().max().item()
    check.emit("paths", f"reload {family}: saved then loaded, max |logit difference| {diff:.3g}",
               check=f"reload {family}", family=family, ok=diff == 0.0, max_abs_diff=diff)


def export(check: Check, family: str) -> None:
    """The merged fp16 export of the trained run, which checks its own logits before it is kept."""
    from qmor.export.exporter import export_merged

    out = export_merged(check.work / f"run-{family}", check.work / f"merged-{family}", device=check.device)
    check.emit("paths", f"export {family}: merged, max |Δlogit| {out['max_abs']:.3g} (tolerance "
               f"{out['tolerance']:.3g}), top-1 agreement {out['top1']:.0%}", check=f"export {family}", family=family,
               ok=True, **{k: out[k] for k in ("max_abs", "top1", "tolerance")})


def loftq(check: Check, family: str) -> None:
    """LoftQ computed on this device and on the CPU, each into a cache of its own: the mean relative error of the
    device's init within 1% of the CPU's."""
    from qmor.adapters.config import AdapterConfig
    from qmor.model.load import load_for_training

    cfg = AdapterConfig(family=family, r=8, init="loftq", loftq_iters=2)
    errors = {}
    for device in ("cpu", check.device):
        model, _, report = load_for_training("tiny", cfg, device=device,
                                             cache_dir=check.work / f"loftq-{device}-{family}")
        errors[device] = report["mean_loftq"]
        del model
    cpu, here = errors["cpu"], errors[check.device]
    gap = abs(here - cpu) / cpu
    check.emit("paths", f"loftq {family}: mean relative error {here:.4f} on {check.device}, {cpu:.4f} on the CPU "
               f"({gap:.2%} apart)", check=f"loftq {family}", family=family, ok=gap <= 0.01, device_error=here,
               cpu_error=cpu, relative_gap=gap)


def cli(check: Check) -> None:
    """The built-in default run, as a user starts it, on this device."""
    toy = ["--max-steps", "3", "--num-examples", "16", "--eval-generate", "2"] if check.tiny else []
    cmd = [sys.executable, str(ROOT / "scripts" / "finetune_4bit.py"), "--device", check.device,
           "--output", str(check.work / "cli-run"), *toy]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    tail = (proc.stderr.strip().splitlines() or [""])[-1]
    check.emit("paths", f"cli: scripts/finetune_4bit.py --device {check.device} exited {proc.returncode} in "
               f"{time.time() - start:.0f} s" + (f" ({tail})" if proc.returncode else ""), check="cli",
               ok=proc.returncode == 0, returncode=proc.returncode, seconds=time.time() - start,
               stdout_tail=proc.stdout.strip().splitlines()[-3:])


# ---------------------------------------------------------------------------------------------------- 8B geometry


def spec(check: Check, runner: str = BASELINE) -> dict:
    """The comparison's settings: batch 1, rank 16 on every linear, checkpointing, chunked loss for qmor, and the
    optimizer qmor trains with on this device, for both sides."""
    return {"device": check.device, "geometry": GEOMETRIES["tiny" if check.tiny else "llama31-8b"], "batch": 1,
            "rank": 16, "checkpointing": True, "loss_chunk": 1024, "runner": runner,
            "optimizer": "paged-adamw-8bit" if check.device == "cuda" else "adamw"}


def beside_plan(result: dict, plan) -> dict:
    """The planner's figure for a measured peak and their ratio: on CUDA the live tensors (allocated peak) against
    the plan without the context and slack the allocator does not count; on the CPU the resident set against the
    plan for the CPU."""
    from qmor.training.measure import planned_live_bytes

    live = planned_live_bytes(plan)
    measured = result.get("peak_allocated", result["peak"])
    return {"planned_bytes": live, "measured_over_planned": measured / live}


def geometry(check: Check) -> None:
    """peft, then qmor's LoRA, MoRA and MoSLoRA on one model, each measured alone in this process."""
    seq, warmup, steps = (64, 1, 2) if check.tiny else (2048, 3, 10)
    preload()
    memory = Memory(check.device)
    for names in ([BASELINE], ["lora", "mora", "moslora"]):  # peft wraps its model; qmor's families share one
        on_one_model(check, "geometry", names, lambda model, name: measure_one(check, model, memory, name, seq,
                                                                               warmup, steps))
        memory.reset()


def on_one_model(check: Check, stage: str, names: list[str], run: Callable) -> None:
    """`run(model, name)` for each runner in turn on one model built for them, each a check of its own; the model
    is gone when this returns."""
    model = build_model(spec(check))
    for name in names:
        check.attempt(stage, name, lambda name=name: run(model, name))


def measure_one(check: Check, model, memory: Memory, name: str, seq: int, warmup: int, steps: int) -> None:
    s = spec(check, name)
    runner = Runner(s, model, memory)
    trainable = sum(p.numel() for p in runner.params)
    try:
        result = runner.measure(seq, warmup, steps)
    finally:
        runner.close()
    if result["oom"]:
        check.emit("geometry", f"{name} at {seq} tokens: out of memory", runner=name, seq=seq, ok=False, oom=True)
        return
    plan = planned(s, seq)
    fields = {**result, **beside_plan(result, plan), "trainable": trainable}
    peak = " / ".join(f"{result[k] / GIB:.2f}" for k in ("peak_allocated", "peak_reserved") if k in result) \
        or f"{result['peak'] / GIB:.2f}"
    check.emit("geometry", f"{name} at {seq} tokens: peak {peak} GiB "
               f"({'allocated / reserved' if 'peak_allocated' in result else 'RSS'}), {result['tokens_per_s']:,.0f} "
               f"tokens/s; planner {fields['planned_bytes'] / GIB:.2f} GiB, measured / planned "
               f"{fields['measured_over_planned']:.2f}", ok=True, **fields)


# ---------------------------------------------------------------------------------------------------- longest


class OutOfTime(Exception):
    """The check's time is spent: the search stops between probes."""


def card_cap(check: Check, gib: float) -> int:
    """What the allocator may use on a card of `gib` GiB: that less this process's CUDA context (measured), which
    a real card holds outside the allocator too. On the CPU the cap applies to the resident set as it is."""
    if check.device != "cuda":
        return int(gib * GIB)
    torch.zeros(1, device="cuda")  # the context exists from the first allocation
    free, total = torch.cuda.mem_get_info()
    context = total - free - torch.cuda.memory_reserved()
    cap = int(gib * GIB) - context
    torch.cuda.set_per_process_memory_fraction(cap / total)
    return cap


def longest(check: Check) -> None:
    """The longest sequence whose full training step fits the card, for peft, qmor and qmor with offloaded
    activations; the time left is shared among the searches still to run."""
    gib = 24.0
    step, limit = (256, 2048) if check.tiny else (1024, 1 << 18)
    cap = card_cap(check, gib)
    preload()
    memory = Memory(check.device)
    left = [BASELINE, "lora", "lora+offload"]  # the searches still to run share the time that is left

    def one(model, name: str) -> None:
        deadline = time.time() + (check.deadline - time.time()) / len(left)
        left.remove(name)
        search_one(check, model, memory, name, cap, gib, step, limit, deadline)

    for names in ([BASELINE], ["lora", "lora+offload"]):
        on_one_model(check, "longest", names, one)
        memory.reset()


def bracket(probes: dict[int, bool]) -> tuple[int, int | None]:
    """From the probes made so far: the longest length that fitted (0 if none) and the shortest length above it
    that did not (None if none did)."""
    found = max((n for n, ok in probes.items() if ok), default=0)
    return found, min((n for n, ok in probes.items() if not ok and n > found), default=None)


def search_one(check: Check, model, memory: Memory, name: str, cap: int, gib: float, step: int, limit: int,
               deadline: float) -> None:
    s = {**spec(check, name), "tile": TILE}  # qmor tiles its layers as training does (the baseline ignores it)
    guess = planned_longest(s, gib, step, limit)
    runner = Runner(s, model, memory)
    probes: dict[int, bool] = {}

    def fits(seq: int) -> bool:
        if time.time() > deadline:
            raise OutOfTime
        probes[seq] = runner.fits(seq, cap)
        return probes[seq]

    try:
        search(fits, guess, step, limit)
        complete = True
    except OutOfTime:
        complete = False
    finally:
        runner.close()
    found, above = bracket(probes)
    shown = f"{found:,}" if complete else f"at least {found:,}" + (f", below {above:,}" if above else "") + \
        " (time ran out)"
    check.emit("longest", f"{name}: {shown} tokens fit {gib:g} GiB; planner {guess:,} (measured / planned "
               f"{found / guess if guess else float('nan'):.2f}); {len(probes)} probes", runner=name, tokens=found,
               complete=complete, below=above, planned=guess, measured_over_planned=found / guess if guess else None,
               probes={str(k): v for k, v in sorted(probes.items())}, cap_bytes=cap, limit=limit, ok=True)


STAGES = {"paths": paths, "geometry": geometry, "longest": longest}


def run(stage: str, device: str, tiny: bool, out: Path, deadline: float) -> None:
    with tempfile.TemporaryDirectory(prefix=f"qmor-{stage}-") as work:
        # a cache of the check's own: the tiny model built and LoftQ computed here, on these versions, never read
        # from an earlier run (the CLI's subprocess inherits it)
        os.environ["QMOR_CACHE"] = str(Path(work) / "cache")
        STAGES[stage](Check(device, tiny, out, Path(work), deadline))
