"""Forgetting: general questions the base model answers correctly (general.json, shipped with the package). A reply
counts as correct when it contains one of the question's answers as a whole word, in any case."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]  # any one of them, as a word of the reply, makes it correct

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question}]

    def correct(self, reply: str) -> bool:
        return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", reply, re.IGNORECASE) for a in self.answers)


def questions() -> list[Question]:
    data = json.loads(resources.files("qmor.eval").joinpath("general.json").read_text())
    return [Question(q["question"], tuple(q["answers"])) for q in data["questions"]]


def forgetting(questions: list[Question], base: list[str], adapter: list[str]) -> dict:
    """What the adapter still answers of what the base answered, and what it lost or gained."""
    base_ok = [q.correct(r) for q, r in zip(questions, base, strict=True)]
    adapter_ok = [q.correct(r) for q, r in zip(questions, adapter, strict=True)]
    pairs = list(zip(questions, base_ok, adapter_ok, strict=True))
    return {"n": len(questions), "base_correct": sum(base_ok), "adapter_correct": sum(adapter_ok),
            "kept": sum(b and a for _, b, a in pairs),
            "lost": [q.question for q, b, a in pairs if b and not a],
            "gained": [q.question for q, b, a in pairs if a and not b],
            "items": [{"question": q.question, "answers": list(q.answers), "base": rb, "adapter": ra,
                       "base_correct": b, "adapter_correct": a}
                      for (q, b, a), rb, ra in zip(pairs, base, adapter, strict=True)]}
