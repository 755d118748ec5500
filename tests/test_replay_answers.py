"""The replay data shipped for SmolLM2 (docs/smollm2_replay.jsonl, written by scripts/replay_answers.py): every record
is one of the script's questions answered right in one sentence, and none asks, or answers, a built-in general
question, so `qmor eval` never counts what replay taught as what the adapter kept."""

import json
import sys
from pathlib import Path

import pytest

from qmor.eval import general

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import replay_answers  # noqa: E402

SHIPPED = [json.loads(line) for line in (ROOT / "docs" / "smollm2_replay.jsonl").read_text().splitlines()]
ASKED = {q: general.Question(q, tuple(a)) for q, a in replay_answers.QUESTIONS}


def test_every_shipped_answer_is_a_right_first_sentence_to_an_asked_question():
    assert len(SHIPPED) == 50 and len({r["instruction"] for r in SHIPPED}) == 50
    for record in SHIPPED:
        question = ASKED[record["instruction"]]
        assert question.correct(record["output"]), record
        assert replay_answers.first_sentence(record["output"]) == record["output"], record


def test_replay_is_disjoint_from_the_general_questions():
    built_in = general.questions()
    assert not {q.lower() for q in ASKED} & {b.question.lower() for b in built_in}
    # an answer shared with a general question would teach it: "Paris" replayed is "Paris" kept
    built_in_answers = {a.lower() for b in built_in for a in b.answers}
    assert not [q for q in ASKED.values() if {a.lower() for a in q.answers} & built_in_answers]


@pytest.mark.parametrize("text, first", [
    ("The capital of Greece is Athens. It is old.", "The capital of Greece is Athens."),
    ("John F. Kennedy was president. He was young.", "John F. Kennedy was president."),
    ("It has 206 bones", "It has 206 bones"),
    ("Is it? Yes. Quite.", "Is it?"),
])
def test_first_sentence(text, first):
    assert replay_answers.first_sentence(text) == first
