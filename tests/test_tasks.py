import re

import pytest

from qmor.data import tasks
from qmor.errors import QmorError

HELD_OUT = ["reverse", "sort", "add", "upper", "mix"]


@pytest.mark.parametrize("name", [*HELD_OUT, "uuid"])
def test_records_are_deterministic_under_a_seed(name):
    a = tasks.records(name, "train", 40, seed=3)
    assert a == tasks.records(name, "train", 40, seed=3)
    assert len(a) == 40
    assert a != tasks.records(name, "train", 40, seed=4)
    assert len({r["prompt"] for r in a}) == 40  # no duplicate prompts


@pytest.mark.parametrize("name", HELD_OUT)
def test_held_out_test_split_is_disjoint_from_train(name):
    train = {r["prompt"] for r in tasks.records(name, "train", 300, seed=0)}
    test = {r["prompt"] for r in tasks.records(name, "test", 100, seed=0)}
    assert len(test) == 100
    assert not train & test
    # also across seeds: the split is a property of the prompt, not of the draw
    assert not {r["prompt"] for r in tasks.records(name, "train", 300, seed=1)} & test


def test_uuid_is_memorisation_test_equals_train():
    train = tasks.records("uuid", "train", 20, seed=0)
    assert tasks.records("uuid", "test", 20, seed=0) == train
    pattern = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
    for r in train:
        assert pattern.match(r["prompt"]) and pattern.match(r["completion"])
    assert len(tasks.records("uuid")) == tasks.TASKS["uuid"].default_n


def test_completions_are_correct():
    for r in tasks.records("reverse", n=20):
        assert r["completion"] == r["prompt"].removeprefix("reverse ")[::-1]
    for r in tasks.records("sort", n=20):
        assert r["completion"] == "".join(sorted(r["prompt"].removeprefix("sort ")))
    for r in tasks.records("add", n=20):
        a, b = r["prompt"].removeprefix("add ").split("+")
        assert int(r["completion"]) == int(a) + int(b)
    for r in tasks.records("upper", n=20):
        assert r["completion"] == r["prompt"].removeprefix("upper ").upper()


def test_mix_holds_every_skill():
    recs = tasks.records("mix", "train", 42, seed=0)
    counts = {t: sum(r["task"] == t for r in recs) for t in tasks.MIX}
    assert counts == {"reverse": 11, "sort": 11, "add": 10, "upper": 10}
    assert [r["task"] for r in recs[:8]] != sorted(r["task"] for r in recs[:8])  # interleaved, not blocked


def test_score_on_hand_made_cases():
    out = tasks.score("reverse", ["abc", "abd", " xyz\n", "ab", "abcd", ""], ["abc", "abc", "xyz", "abc", "abc", "a"])
    assert out["exact_match"] == pytest.approx(2 / 6)
    # per example: 1, 2/3, 1 (whitespace stripped), 2/3 (missing char), 3/4 (extra char), 0
    assert out["char_accuracy"] == pytest.approx((1 + 2 / 3 + 1 + 2 / 3 + 3 / 4 + 0) / 6)
    assert out["n"] == 6


def test_score_per_task_breakdown():
    out = tasks.score("mix", ["12", "cba", "x"], ["12", "abc", "x"], tasks=["add", "reverse", "add"])
    assert out["exact_match/add"] == 1.0
    assert out["exact_match/reverse"] == 0.0
    assert out["char_accuracy/reverse"] == pytest.approx(1 / 3)
    assert out["exact_match"] == pytest.approx(2 / 3)


def test_bad_names_and_lengths_raise():
    with pytest.raises(QmorError, match="unknown built-in task 'nope'"):
        tasks.records("nope")
    with pytest.raises(QmorError, match="split"):
        tasks.records("add", "valid")
    with pytest.raises(QmorError, match="2 predictions for 1 references"):
        tasks.score("add", ["1", "2"], ["1"])
    with pytest.raises(QmorError, match="unknown built-in task"):
        tasks.score("nope", ["1"], ["1"])
