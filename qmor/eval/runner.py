"""Evaluate runs: the base and the adapter on the same examples, questions and prompts, then each export against
the adapter. One 4-bit base is loaded per base model; adapters switch on it (qmor.chat.ChatSession), and the base's
own results are computed once for runs that share its data.

    reports = evaluate([RunDir("runs/a"), RunDir("runs/b")], EvalOptions())
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from qmor import hints
from qmor.chat import ChatSession
from qmor.data.tasks import char_accuracy
from qmor.errors import QmorError
from qmor.eval import agreement, exports, general, items
from qmor.eval.exports import Export
from qmor.eval.generate import Reply, greedy
from qmor.eval.items import DataChoice, EvalSet
from qmor.eval.stops import end_of_turn, token_text
from qmor.model.base import Base, TrainedAdapter
from qmor.model.files import builtin_name
from qmor.training.evaluate import eval_loss
from qmor.training.loss import ChunkedLoss
from qmor.training.run_dir import RunDir, open_adapter
from qmor.version import __version__

# an export is flagged below this top-1 agreement or above this mean KL (nats per token) against the adapter: an
# fp16 merge and a q8_0 GGUF of SmolLM2 stay far inside both (docs/eval.md), a wrong merge base does not
TOP1_MIN = 0.9
KL_MAX = 0.1
GENERAL_TOKENS = 32  # new tokens for a general question: the answers sit in the first sentence


@dataclass
class EvalOptions:
    data: DataChoice = field(default_factory=DataChoice)
    exports: list[Path] = field(default_factory=list)  # export folders beside those the run records (one run only)
    prompts: int = 6  # side-by-side prompts: the data's first, then general questions (half of them at most)
    max_new_tokens: int = 48  # per side-by-side reply
    general: bool = True  # ask the built-in general questions (forgetting)
    device: str | None = None  # cuda or cpu (None: cuda when available)
    base_model: str | None = None  # the base where it is now, when it moved since training
    allow_other_base: bool = False  # evaluate on a base whose fingerprint differs
    batch_size: int = 8  # sequences per forward pass


@dataclass
class Target:
    run: RunDir
    adapter: TrainedAdapter  # its adapter, on the base it records or the one given
    exports: list[Export]
    notes: list[str]

    @property
    def base(self) -> Base:
        return self.adapter.base


def resolve(runs: list[RunDir], opts: EvalOptions) -> list[Target]:
    """Every run's adapter, base and exports, checked before any model loads."""
    if opts.exports and len(runs) > 1:
        raise QmorError("--export goes with one run; with several, each is compared with the exports it records")
    if opts.prompts < 0 or opts.max_new_tokens < 1:
        raise QmorError("--prompts must be 0 or more and --max-new-tokens at least 1")
    targets = []
    for run in runs:
        if not run.path.is_dir():
            raise QmorError(f"{run} does not exist; pass a run folder (runs/NAME)")
        if run.config.is_file() and run.final_adapter() is None:
            raise QmorError(f"{run} has no adapter yet: its training has not finished; {hints.resume(run)}")
        adapter = open_adapter(run.path, opts.base_model)
        adapter.located_base()  # a base that is not where it was: one line before any model loads
        found, notes = exports.find(run, opts.exports)
        targets.append(Target(run, adapter, found, notes))
    return targets


class Stages:
    """One progress bar over every stage of every run (what the app reads back from the log)."""

    def __init__(self, total: int):
        self.bar = tqdm(total=total, desc="eval", file=sys.stderr, dynamic_ncols=True, mininterval=0.2)
        self.open = False

    def __call__(self, what: str) -> None:
        if self.open:
            self.bar.update(1)
        self.bar.set_description(what)
        self.open = True

    def close(self) -> None:
        if self.open:
            self.bar.update(1)
        self.bar.close()


STAGES_PER_RUN = 10  # data, then four for the base and four for the adapter, then the agreement set-up


def evaluate(runs: list[RunDir], opts: EvalOptions, done: Callable[[RunDir, dict], None] | None = None) -> list[dict]:
    """Each run's report, in order; `done(run, report)` is called as each one is ready (to write it at once)."""
    targets = resolve(runs, opts)
    stages = Stages(sum(STAGES_PER_RUN + len(t.exports) for t in targets))
    session, base_cache, reports = None, {}, []
    try:
        for target in targets:
            if session is None or session.base.path != target.base.path:
                session = None  # the previous base leaves memory before the next one loads
                session = ChatSession(target.base, opts.device, allow_other_base=opts.allow_other_base)
            reports.append(Evaluation(session, target, opts, stages, base_cache).run())
            if done is not None:
                done(target.run, reports[-1])
    finally:
        stages.close()
    return reports


class Evaluation:
    """One run: its data, the base and the adapter measured alike, the exports compared with the adapter."""

    def __init__(self, session: ChatSession, target: Target, opts: EvalOptions, stages: Stages, base_cache: dict):
        self.session, self.target, self.opts, self.stage, self.base_cache = session, target, opts, stages, base_cache
        self.tok = session.tokenizer
        self.pad = self.tok.pad_token_id

    def run(self) -> dict:
        started = time.time()
        name = self.target.run.name
        meta = self.session.use_adapter(self.target.adapter)
        template = self.session.template()
        self.eot = end_of_turn(self.tok, template)
        self.stops = sorted({self.eot, *([self.tok.eos_token_id] if self.tok.eos_token_id is not None else [])})
        self.stage(f"{name}: data")
        data = items.load(self.target.run, self.opts.data, self.tok)
        questions = general.questions() if self.opts.general else []
        side = self.side_prompts(data, questions)
        key = self.base_key(data, side, len(questions))
        self.session.use_adapter(None)
        if key in self.base_cache:
            for _ in range(4):  # the base's four stages, measured for an earlier run on the same data
                self.stage(f"{name}: base (as measured for an earlier run)")
        else:
            self.base_cache[key] = self.measure(f"{name}: base", data, questions, side)
        base = self.base_cache[key]
        self.session.use_adapter(self.target.adapter)
        adapter = self.measure(f"{name}: adapter", data, questions, side)
        self.stage(f"{name}: adapter log-probabilities")
        sequences = [agreement.Sequence(p + r.ids, len(p) - 1) for p, r in zip(side, adapter["side"], strict=True)]
        reference = agreement.log_probs(self.session.model, sequences)
        compared = [self.compare(e, side, sequences, reference, adapter["side"], template)
                    for e in self.target.exports]
        return {
            "run": str(self.target.run), "qmor_version": __version__, "seconds": round(time.time() - started, 1),
            "adapter": {"path": str(self.target.adapter.folder), "family": meta.adapter.family, "rank": meta.adapter.r,
                        "init": meta.init, "base_model": builtin_name(meta.base_model) or meta.base_model},
            "end_of_turn": token_text(self.tok, self.eot),
            "data": None if data is None else {"source": data.source, "split": data.split,
                                               "examples": len(data.examples), "answers": len(data.answers)},
            "loss": None if data is None else {k: loss_entry(r["loss"]) for k, r in (("base", base),
                                                                                    ("adapter", adapter))},
            "answers": self.answers(data, base, adapter),
            "general": general.forgetting(questions, base["general"], adapter["general"]) if questions else None,
            "side_by_side": [{"prompt": items.question(self.tok, template, p), "base": self.text(b),
                              "adapter": self.text(a), "exports": {c["name"]: c["replies"][i] for c in compared}}
                             for i, (p, b, a) in enumerate(zip(side, base["side"], adapter["side"], strict=True))],
            "exports": [{k: v for k, v in c.items() if k != "replies"} for c in compared],
            "notes": self.target.notes + ([] if data else ["no data to score: the run records no config.json; pass "
                                                           "--dataset"]),
        }

    def base_key(self, data: EvalSet | None, side: list[list[int]], questions: int) -> str:
        """What the base's results depend on: the base, the examples' tokens, the prompts, the questions asked."""
        examples = [] if data is None else [(e["input_ids"], e["labels"]) for e in data.examples]
        text = json.dumps([self.session.base.path, examples, side, questions, self.opts.max_new_tokens])
        return hashlib.sha256(text.encode()).hexdigest()

    def side_prompts(self, data: EvalSet | None, questions: list[general.Question]) -> list[list[int]]:
        """The data's first prompts, then general questions (rendered with the adapter's template) for the rest."""
        n = self.opts.prompts
        from_general = min(n // 2, len(questions))
        own = [a.prompt for a in (data.answers if data else [])][:n - from_general]
        asked = [self.session.encode(q.messages())["input_ids"][0].tolist() for q in questions]
        return own + asked[:n - len(own)]

    def measure(self, label: str, data: EvalSet | None, questions: list, side: list[list[int]]) -> dict:
        """Loss, greedy answers, general replies and side-by-side replies of the model as it is now."""
        model, out = self.session.model, {}
        self.stage(f"{label}: held-out loss")
        if data is not None:
            device = next(model.parameters()).device
            loss = eval_loss(ChunkedLoss(model), data.examples, self.opts.batch_size, self.pad, device)
            out["loss"] = (loss, sum(sum(t != -100 for t in e["labels"][1:]) for e in data.examples))
        self.stage(f"{label}: answers")
        if data is not None and data.answers:
            longest = max(a.reference_tokens for a in data.answers)
            out["answers"] = [self.text(r) for r in self.greedy([a.prompt for a in data.answers], longest + 8)]
        self.stage(f"{label}: general questions")
        asked = [self.session.encode(q.messages())["input_ids"][0].tolist() for q in questions]
        out["general"] = [self.text(r) for r in self.greedy(asked, GENERAL_TOKENS)]
        self.stage(f"{label}: side by side")
        out["side"] = self.greedy(side, self.opts.max_new_tokens)
        return out

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[Reply]:
        return greedy(self.session.model, prompts, max_new_tokens, self.stops, self.pad, self.opts.batch_size)

    def text(self, reply: Reply, tokenizer=None) -> str:
        return (tokenizer or self.tok).decode(reply.ids, skip_special_tokens=True).strip()

    def answers(self, data: EvalSet | None, base: dict, adapter: dict) -> dict | None:
        if data is None or not data.answers:
            return None
        refs = [a.reference for a in data.answers]
        result = {"n": len(refs)}
        for label, replies in (("base", base["answers"]), ("adapter", adapter["answers"])):
            result[label] = {"exact_match": sum(p == r for p, r in zip(replies, refs, strict=True)) / len(refs),
                             "char_accuracy": sum(map(char_accuracy, replies, refs)) / len(refs)}
        result["items"] = [{"prompt": items.question(self.tok, self.session.template(), a.prompt),
                            "reference": a.reference, "base": b, "adapter": r}
                           for a, b, r in zip(data.answers, base["answers"], adapter["answers"], strict=True)]
        return result

    def compare(self, export: Export, side: list[list[int]], sequences: list, reference: list, adapter_side: list,
                template: str | None) -> dict:
        """One export against the adapter: agreement on the same tokens, where it stops, its chat template."""
        self.stage(f"{self.target.run.name}: export {export.name}")
        device = str(next(self.session.model.parameters()).device)
        loaded = exports.load(export, device)
        try:
            pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else self.pad
            replies = greedy(loaded.model, side, self.opts.max_new_tokens, loaded.stop_ids, pad, self.opts.batch_size)
            scores = agreement.compare(reference, agreement.log_probs(loaded.model, sequences))
        finally:
            exports.free(loaded)
        eot = token_text(self.tok, self.eot)
        same_stop = sum(a.stopped and r.stopped and r.ids == a.ids for a, r in zip(adapter_side, replies,
                                                                                    strict=True))
        result = {"name": export.name, "path": str(export.path), "kind": export.kind, **scores,
                  "template_same": template is None or loaded.template == template,
                  "stops_on_end_of_turn": self.eot in loaded.stop_ids,
                  "stop_tokens": [token_text(self.tok, t) for t in loaded.stop_ids],
                  "modelfile_stops": loaded.modelfile_stops,
                  "stopped_with_adapter": same_stop, "adapter_stopped": sum(a.stopped for a in adapter_side),
                  "replies": [self.text(r, loaded.tokenizer) for r in replies]}
        result["problems"] = problems(result, eot)
        result["ok"] = not result["problems"]
        return result


def problems(r: dict, eot: str) -> list[str]:
    """What is wrong with an export, one line each, naming the consequence."""
    found = []
    if not r["template_same"]:
        found.append("its chat template differs from the one training used, so prompts reach it in a format the "
                     "adapter never saw")
    if not r["stops_on_end_of_turn"]:
        stops = ", ".join(r["stop_tokens"]) or "nothing"
        found.append(f"it does not stop on {eot}, the token that ends the adapter's replies (it stops on {stops}), "
                     "so it talks on past its answer")
    if r["modelfile_stops"] is not None and eot not in r["modelfile_stops"]:
        found.append(f"its Modelfile has no PARAMETER stop for {eot}, so Ollama talks on past the answer")
    if r["top1"] < TOP1_MIN or r["kl_mean"] > KL_MAX:
        found.append(f"its predictions drift from the adapter's: top-1 agreement {r['top1']:.1%} (at least "
                     f"{TOP1_MIN:.0%} expected), KL {r['kl_mean']:.3g} nats per token (at most {KL_MAX:g})")
    return found


def loss_entry(measured: tuple[float, int]) -> dict:
    loss, tokens = measured
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}
