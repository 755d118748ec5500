"""Streaming chat on one loaded 4-bit base, switching adapters (or none) without reloading it.

    session = ChatSession("meta-llama/Llama-2-7b-chat-hf")   # or a Base, a folder, tiny, smollm2
    session.use_adapter("runs/NAME")            # a run folder, an adapter folder or a TrainedAdapter; None: the base
    for piece in session.stream([{"role": "user", "content": "Hi"}], system="Be brief.", temperature=0):
        print(piece, end="", flush=True)

LoftQ adapters were trained over their own quantised base Q_T, not nf4(W): switching to one puts its Q_T into the
4-bit layers, and switching away (to another adapter or to none) puts the plain NF4 weights back.

Conversations are rendered with the chat template the adapter was trained with (recorded in its metadata) and
tokenised the way training tokenised them, so the adapter sees the format it learnt.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from qmor.adapters.attach import AdapterMeta, detach
from qmor.config import QuantConfig
from qmor.data.template import TemplateError, encode, render, template_text
from qmor.errors import QmorError
from qmor.model.base import Base, TrainedAdapter
from qmor.model.load import attach_trained, load_4bit, load_unquantised
from qmor.model.quant import is_4bit, set_packed
from qmor.training.run_dir import open_adapter

ROLES = ("system", "user", "assistant")


@dataclass
class Sampling:
    max_new_tokens: int = 256  # upper bound on the reply's length in tokens
    temperature: float = 0.7  # softmax temperature; 0 means greedy decoding
    top_p: float = 0.9  # nucleus sampling: keep the smallest token set with this much probability
    top_k: int = 50  # keep only the k most likely tokens (0: no limit)
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context
    seed: int | None = None  # fixes the sampling draws, for reproducible replies

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise QmorError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise QmorError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise QmorError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise QmorError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise QmorError(f"repetition_penalty must be positive (1 is off), got {self.repetition_penalty}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> Sampling:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise QmorError(f"unknown sampling setting(s) {unknown}; valid: {sorted(names)}")
        return cls(**kwargs)

    def generate_kwargs(self) -> dict:
        kw = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature == 0:
            return kw | {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return kw | {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


def check_messages(messages: list[dict]) -> None:
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise QmorError(f"chat message {m!r} is not {{'role': one of {ROLES}, 'content': str}}")


class TokenStreamer:
    """generate()'s streamer protocol (put / end) read as an iterator of text pieces, one per new token.

    transformers' TextIteratorStreamer holds text back until a space or newline, so a reply without spaces (code,
    a character-level model) would arrive all at once at the end; this flushes after every token instead, holding
    back only an incomplete multi-byte character.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.ids: list[int] = []
        self.sent = ""
        self.prompt = True  # generate's first put() is the prompt itself

    def put(self, value: torch.Tensor) -> None:
        if self.prompt:
            self.prompt = False
            return
        self.ids.extend(value.flatten().tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if len(text) > len(self.sent):
            self.queue.put(text[len(self.sent):])
            self.sent = text

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > len(self.sent):
            self.queue.put(text[len(self.sent):])
        self.queue.put(None)

    def __iter__(self) -> Iterator[str]:
        while (piece := self.queue.get()) is not None:
            yield piece


class ChatSession:
    """One 4-bit base in memory; adapters come and go, the base stays. With `quant=None` the base is loaded
    unquantised instead (a merged export, as plain transformers runs it), and takes no adapter."""

    def __init__(self, base: str | Base, device: str | None = None, quant: QuantConfig | None = QuantConfig(),
                 trust_remote_code: bool = False, allow_other_base: bool = False):
        self.base = Base.resolve(base, trust_remote_code=trust_remote_code)
        self.allow_other_base = allow_other_base  # use adapters trained on another base (fingerprint differs)
        self.quantised = quant is not None
        self.model = (load_4bit(self.base, quant, device) if self.quantised
                      else load_unquantised(self.base, device)).eval()
        self.tokenizer = self.base.tokenizer()
        # the plain NF4 weights, kept by reference so a LoftQ adapter's Q_T can be swapped out again
        self.plain = {n: m.weight for n, m in self.model.named_modules() if is_4bit(m)}
        self.adapter: Path | None = None  # the adapter folder in use, None for the base alone
        self.meta: AdapterMeta | None = None
        self.lock = threading.Lock()  # one generation or switch at a time

    def _reset(self) -> None:
        detach(self.model)
        for name, packed in self.plain.items():
            linear = self.model.get_submodule(name)
            if linear.weight is not packed:
                set_packed(linear, packed)
        self.adapter, self.meta = None, None

    def use_adapter(self, adapter: str | Path | TrainedAdapter | None) -> AdapterMeta | None:
        """Switch to `adapter` (a run or adapter folder, or one opened already), or to the base alone with None."""
        with self.lock:
            self._reset()
            if adapter is None:
                return None
            if not self.quantised:
                raise QmorError("an adapter needs the 4-bit base it was trained on, and this base is loaded "
                                "unquantised; load it in 4-bit (chat without --no-4bit) to use one")
            adapter = open_adapter(adapter, self.base)  # on the base in memory, whatever base it records
            try:
                attach_trained(self.model, adapter, self.base, self.allow_other_base)
            except BaseException:
                self._reset()  # a failed switch leaves the plain base, never half an adapter
                raise
            self.model.eval()
            self.adapter, self.meta = adapter.folder, adapter.meta
            return adapter.meta

    def encode(self, messages: list[dict], system: str | None = None) -> dict[str, torch.Tensor]:
        check_messages(messages)
        if system and not (messages and messages[0]["role"] == "system"):
            messages = [{"role": "system", "content": system}] + list(messages)
        device = next(self.model.parameters()).device
        try:
            text = render(self.tokenizer, messages, add_generation_prompt=True, chat_template=self.template())
        except TemplateError as e:
            raise QmorError(str(e)) from None
        ids = torch.tensor([encode(self.tokenizer, text)], device=device)  # (1, T): tokenised as training does
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def template(self) -> str:
        """The chat template in use: the one the adapter was trained with, else the tokenizer's own, else the ChatML
        fallback that training uses for tokenizers without one."""
        if self.meta is not None and self.meta.chat_template:
            return self.meta.chat_template
        return template_text(self.tokenizer)

    def stream(self, messages: list[dict], system: str | None = None, **sampling) -> Iterator[str]:
        """Yield the reply in pieces as it is generated. Sampling: see `Sampling` (temperature 0 is greedy)."""
        settings = Sampling.from_kwargs(**sampling)
        inputs = self.encode(messages, system)
        streamer = TokenStreamer(self.tokenizer)
        stop = threading.Event()  # set when the consumer stops reading, so generation ends early

        def should_stop(input_ids, scores, **kwargs):  # a plain callable works as a stopping criterion
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        kwargs = inputs | settings.generate_kwargs() | {"streamer": streamer, "use_cache": True,
                                                        "pad_token_id": pad, "stopping_criteria": [should_stop]}
        failure: list[BaseException] = []

        def run() -> None:
            try:
                if settings.seed is not None:
                    torch.manual_seed(settings.seed)
                with torch.no_grad():
                    self.model.generate(**kwargs)
            except BaseException as e:  # surfaced in the consumer's thread below
                failure.append(e)
                streamer.queue.put(None)

        with self.lock:
            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            try:
                for piece in streamer:
                    if piece:
                        yield piece
            finally:
                stop.set()
                thread.join()
        if failure:
            raise failure[0]

    def reply(self, messages: list[dict], system: str | None = None, **sampling) -> str:
        return "".join(self.stream(messages, system, **sampling))

    def describe(self) -> str:
        if self.meta is None:
            return f"base {self.base} ({'no adapter' if self.quantised else 'unquantised, no adapter'})"
        return (f"{self.meta.adapter.family} r={self.meta.adapter.r} ({self.meta.init} init) from {self.adapter} on "
                f"base {self.base}")


__all__ = ["ChatSession", "Sampling"]
