import json
import re
from collections import Counter

import pytest
import torch

from qmor.data import template
from qmor.data.pipeline import (
    DataConfig,
    build_datasets,
    collate,
    detect_format,
    empty_warning,
    load_records,
    preview,
    prompt_text,
)
from qmor.errors import QmorError
from qmor.model.tiny import tiny_tokenizer

END = "<|end|>"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(autouse=True)
def caches(tmp_path_factory, monkeypatch):
    """The tokenised examples and datasets' copies of data files stay in this session's folder."""
    import datasets

    monkeypatch.setenv("QMOR_CACHE", str(tmp_path_factory.getbasetemp() / "qmor-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "datasets"))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def spans(tok, example):
    """The decoded runs of consecutive labelled tokens."""
    out, run = [], []
    for i, lab in zip(example["input_ids"], example["labels"], strict=True):
        if lab == -100:
            if run:
                out.append(tok.decode(run))
            run = []
        else:
            assert lab == i  # a label is the token itself (the model shifts)
            run.append(lab)
    if run:
        out.append(tok.decode(run))
    return out


def build_one(tok, tmp_path, record, **kw):
    src = write_jsonl(tmp_path / "d.jsonl", [record])
    train, _, stats = build_datasets(tok, DataConfig(source=src, **kw))
    return train[0], stats


FORMAT_CASES = [
    ("alpaca", {"instruction": "Add", "input": "1+2", "output": "3", "system": "Be terse"},
     "<|system|>Be terse<|end|><|user|>Add\n\n1+2<|end|><|assistant|>3<|end|>", ["3" + END]),
    ("alpaca", {"instruction": "Say hi", "input": "", "output": "hi"},
     "<|user|>Say hi<|end|><|assistant|>hi<|end|>", ["hi" + END]),
    ("messages", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b"}]},
     "<|user|>q<|end|><|assistant|>a b<|end|>", ["a b" + END]),
    ("sharegpt", {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                    {"from": "gpt", "value": "ans"}]},
     "<|system|>s<|end|><|user|>q<|end|><|assistant|>ans<|end|>", ["ans" + END]),
    ("prompt_completion", {"prompt": "key", "completion": "value"},
     "<|user|>key<|end|><|assistant|>value<|end|>", ["value" + END]),
    ("text", {"text": "hello world"}, "hello world" + END, ["hello world" + END]),
]


@pytest.mark.parametrize("fmt,record,full,trained", FORMAT_CASES)
def test_each_format_splits_prompt_and_response(tok, tmp_path, fmt, record, full, trained):
    ex, stats = build_one(tok, tmp_path, record)
    assert stats.format == fmt
    assert tok.decode(ex["input_ids"]) == full
    assert spans(tok, ex) == trained
    forced, _ = build_one(tok, tmp_path, record, format=fmt)
    assert forced == ex


def test_multi_turn_trains_every_assistant_turn(tok, tmp_path):
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "second answer"}]
    ex, _ = build_one(tok, tmp_path, {"messages": msgs})
    assert spans(tok, ex) == ["a1" + END, "second answer" + END]


def test_train_on_prompt_labels_everything(tok, tmp_path):
    ex, _ = build_one(tok, tmp_path, {"prompt": "key", "completion": "value"}, train_on_prompt=True)
    assert ex["labels"] == ex["input_ids"]


def test_fallback_template_when_tokenizer_has_none(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(template, "_warned", False)
    bare = tiny_tokenizer()
    bare.chat_template = None
    ex, stats = build_one(bare, tmp_path, {"prompt": "key", "completion": "value"})
    assert stats.template == "chatml-fallback"
    assert "no chat template; using a ChatML-style fallback" in caplog.text
    assert bare.chat_template is None  # the caller's tokenizer is left as it was
    assert bare.decode(ex["input_ids"]) == "<|im_start|>user\nkey<|im_end|>\n<|im_start|>assistant\nvalue<|im_end|>" \
                                           + END + "\n"
    assert spans(bare, ex) == ["value<|im_end|>" + END + "\n"]
    assert prompt_text(bare, {"prompt": "key"}) == "<|im_start|>user\nkey<|im_end|>\n<|im_start|>assistant\n"


def test_packing_keeps_every_label_and_respects_max_len(tok):
    cfg = DataConfig(source="mix", num_examples=60, max_len=64)
    plain, _, s0 = build_datasets(tok, cfg)
    packed, _, s1 = build_datasets(tok, DataConfig(source="mix", num_examples=60, max_len=64, packing=True))
    assert s1.packed and s1.n_train < s0.n_train == s1.n_train_examples == 60
    assert all(len(r["input_ids"]) == len(r["labels"]) <= 64 for r in packed)
    assert Counter(t for e in plain for t in e["labels"]) == Counter(t for e in packed for t in e["labels"])
    assert Counter(t for e in plain for t in e["input_ids"]) == Counter(t for e in packed for t in e["input_ids"])
    assert s0.n_label_tokens == s1.n_label_tokens
    assert s1.n_tokens / (s1.n_train * 64) > 0.9  # best fit leaves little room unused


def test_truncation_is_counted(tok, tmp_path):
    recs = [{"prompt": "p", "completion": "x" * n} for n in (5, 40, 10, 60)]
    train, _, stats = build_datasets(tok, DataConfig(source=write_jsonl(tmp_path / "d.jsonl", recs), max_len=32))
    assert stats.n_truncated == 2
    assert [len(e["input_ids"]) for e in train] == [5 + 5, 32, 10 + 5, 32]  # <|user|>p<|end|><|assistant|> ... <|end|>


def test_truncation_drops_examples_left_without_labels(tok, tmp_path):
    recs = [{"prompt": "p" * 40, "completion": "x"}, {"prompt": "p", "completion": "x"}]
    train, _, stats = build_datasets(tok, DataConfig(source=write_jsonl(tmp_path / "d.jsonl", recs), max_len=20))
    assert (stats.n_truncated, stats.n_dropped, len(train)) == (1, 1, 1)


def test_validation_split_sizes_and_determinism(tok):
    def split(val_size, seed=0):
        train, val, stats = build_datasets(tok, DataConfig(source="uuid", num_examples=50, val_size=val_size,
                                                           seed=seed))
        assert (stats.n_train, stats.n_val) == (len(train), len(val))
        return train, val

    train, val = split(0.2)
    assert (len(train), len(val)) == (40, 10)
    assert split(7)[1].__len__() == 7
    assert split(0.2) == (train, val)
    assert split(0.2, seed=1)[1] != val
    assert not {tuple(e["input_ids"]) for e in train} & {tuple(e["input_ids"]) for e in val}
    with pytest.raises(QmorError, match="leaves no training examples"):
        split(50)


def test_not_json_line_names_file_and_line(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": oops}\n{"text": "b"}\n')
    with pytest.raises(QmorError, match=r"bad.jsonl line 3: not valid JSON.*skip") as e:
        build_datasets(tok, DataConfig(source=str(path)))
    assert "\n" not in str(e.value)
    train, _, stats = build_datasets(tok, DataConfig(source=str(path), skip_bad=True))
    assert (stats.n_skipped, stats.n_records, len(train)) == (1, 2, 2)
    records, skipped = load_records(str(path), skip_bad=True)
    assert (len(records), skipped) == (2, 1)


def test_missing_fields_name_what_the_record_has_and_needs(tok, tmp_path):
    recs = [{"instruction": "i", "output": "o"}, {"instruction": "i", "answer": "o"},
            {"instruction": "j", "output": "p"}]
    src = write_jsonl(tmp_path / "alp.jsonl", recs)
    with pytest.raises(QmorError, match=r"alp.jsonl line 2: record has fields \['answer', 'instruction'\] but format "
                                        r"'alpaca' needs \['instruction', 'output'\]"):
        build_datasets(tok, DataConfig(source=src))
    train, _, stats = build_datasets(tok, DataConfig(source=src, skip_bad=True))
    assert (stats.n_skipped, stats.n_records, len(train)) == (1, 2, 2)


def test_malformed_conversations_are_bad_records(tok, tmp_path):
    recs = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "only a question"}]},
            {"messages": [{"role": "robot", "content": "q"}]},
            {"messages": "not a list"}]
    src = write_jsonl(tmp_path / "m.jsonl", recs)
    with pytest.raises(QmorError, match="m.jsonl line 2: the conversation has no assistant turn"):
        build_datasets(tok, DataConfig(source=src))
    _, _, stats = build_datasets(tok, DataConfig(source=src, skip_bad=True))
    assert stats.n_skipped == 3


def test_empty_and_all_too_long_and_missing(tok, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(QmorError, match="empty.jsonl holds no"):
        build_datasets(tok, DataConfig(source=str(empty)))
    long = write_jsonl(tmp_path / "long.jsonl", [{"text": "x" * 50}, {"text": "y" * 30}])
    with pytest.raises(QmorError, match=r"every example of .*long.jsonl is longer than max_len=16 tokens "
                                        r"\(shortest: 31 tokens, .*long.jsonl line 2\); raise max_len"):
        build_datasets(tok, DataConfig(source=long, max_len=16))
    with pytest.raises(QmorError, match="does not exist"):
        build_datasets(tok, DataConfig(source=str(tmp_path / "nope.jsonl")))
    with pytest.raises(QmorError, match="unsupported file type"):
        (tmp_path / "d.txt").write_text("a,b\n")
        build_datasets(tok, DataConfig(source=str(tmp_path / "d.txt")))
    with pytest.raises(QmorError, match="unknown data format"):
        DataConfig(format="csv")


NO_REPLY = [
    ("alpaca", lambda i, reply: {"instruction": f"q{i}", "output": reply}, "an empty or null output",
     "--columns output=COLUMN (its columns: instruction, output)"),
    ("prompt_completion", lambda i, reply: {"prompt": f"q{i}", "completion": reply}, "an empty or null completion",
     "--columns completion=COLUMN"),
    ("messages", lambda i, reply: {"messages": [{"role": "user", "content": f"q{i}"},
                                                {"role": "assistant", "content": reply}]},
     "only empty assistant turns", "check that the assistant turns hold the replies"),
    ("text", lambda i, reply: {"text": reply}, "an empty or null text", "--columns text=COLUMN"),
]


@pytest.mark.parametrize("train_on_prompt", [False, True])
@pytest.mark.parametrize("fmt,record,what,fix", NO_REPLY, ids=[c[0] for c in NO_REPLY])
def test_examples_without_a_reply_are_counted_and_all_of_them_refused(tok, tmp_path, fmt, record, what, fix,
                                                                     train_on_prompt):
    """Their labels are the template's end-of-turn tokens alone; with train_on_prompt the prompt's too, which does
    not make a data set without a single reply any less of a mistake."""
    some = write_jsonl(tmp_path / "some.jsonl", [record(i, "" if i in (1, 3, 4) else "yes") for i in range(8)])
    _, _, stats = build_datasets(tok, DataConfig(source=some, train_on_prompt=train_on_prompt))
    assert (stats.n_empty, stats.empty_at) == (3, [f"{some} line {n}" for n in (2, 4, 5)])
    assert f"3 of 8 examples have {what} ({some} lines 2, 4, 5)" in empty_warning(stats, some)
    none = write_jsonl(tmp_path / "none.jsonl", [record(i, " ") for i in range(6)])
    with pytest.raises(QmorError, match=f"all 6 examples of {none} have {what}, so the model would learn nothing "
                                        f"but .*; .*{re.escape(fix)}"):
        build_datasets(tok, DataConfig(source=none, train_on_prompt=train_on_prompt))


def test_a_warning_names_the_first_examples_without_a_reply(tok, tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": "" if i % 2 else "a"}
                                             for i in range(20)])
    _, _, stats = build_datasets(tok, DataConfig(source=src))
    assert f"10 of 20 examples have an empty or null completion ({src} lines 2, 4, 6, 8, 10, ...)" in \
        empty_warning(stats, src)
    full = write_jsonl(tmp_path / "full.jsonl", [{"prompt": "q", "completion": "a"}])
    assert empty_warning(build_datasets(tok, DataConfig(source=full))[2], full) is None


def test_json_list_and_datasets_folder_load(tok, tmp_path):
    recs = [{"prompt": f"k{i}", "completion": f"v{i}"} for i in range(5)]
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(recs, indent=1))
    a, _, sa = build_datasets(tok, DataConfig(source=str(as_list)))
    import datasets

    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "ds"))
    b, _, sb = build_datasets(tok, DataConfig(source=str(tmp_path / "ds")))
    c, _, _ = build_datasets(tok, DataConfig(source=write_jsonl(tmp_path / "d.jsonl", recs)))
    assert a == b == c and sa.n_records == sb.n_records == 5
    datasets.DatasetDict({"train": datasets.Dataset.from_list(recs)}).save_to_disk(str(tmp_path / "dd"))
    assert build_datasets(tok, DataConfig(source=str(tmp_path / "dd")))[0] == a
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "a",\n "completion": }]')
    with pytest.raises(QmorError, match="broken.json line 2: not valid JSON"):
        load_records(str(broken))
    (tmp_path / "notds").mkdir()
    with pytest.raises(QmorError, match="not a datasets folder"):
        load_records(str(tmp_path / "notds"))


def test_detect_format_and_preview(tmp_path):
    with pytest.raises(QmorError, match=r"cannot tell the format from the first record's fields \['question'\]"):
        detect_format([{"question": "q"}], "x.jsonl")
    src = write_jsonl(tmp_path / "c.jsonl", [{"conversations": [{"from": "human", "value": str(i)},
                                                                {"from": "gpt", "value": "a"}]} for i in range(9)])
    fmt, rows = preview(src, n=3)
    assert fmt == "sharegpt" and [r["conversations"][0]["value"] for r in rows] == ["0", "1", "2"]
    with pytest.raises(QmorError, match="c.jsonl line 1: record has fields"):
        preview(src, format="alpaca")
    fmt, rows = preview("add", n=2)
    assert fmt == "prompt_completion" and len(rows) == 2 and rows[0]["prompt"].startswith("add ")


def test_prompt_text_for_generation(tok):
    assert prompt_text(tok, {"prompt": "key", "completion": "value"}) == "<|user|>key<|end|><|assistant|>"
    assert prompt_text(tok, {"instruction": "Do", "input": "x"}) == "<|user|>Do\n\nx<|end|><|assistant|>"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert prompt_text(tok, msgs) == "<|user|>a<|end|><|assistant|>b<|end|><|user|>c<|end|><|assistant|>"
    assert prompt_text(tok, {"text": "once upon"}) == "once upon"


def test_collate_pads_right(tok):
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [9], "labels": [9]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [9, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(v.dtype == torch.long for v in batch.values())


def test_masks_follow_a_template_with_bos_and_newlines(tok, tmp_path):
    t = tiny_tokenizer()
    t.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>"
                       "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    ex, _ = build_one(t, tmp_path, {"messages": msgs})
    assert t.decode(ex["input_ids"]).startswith("<s><|user|>\nq1")
    assert spans(t, ex) == ["a1<|end|>\n", "a2<|end|>\n"]
    assert prompt_text(t, msgs[:3]) == "<s><|user|>\nq1<|end|>\n<|assistant|>\na1<|end|>\n<|user|>\nq2<|end|>\n" \
                                       "<|assistant|>\n"


def test_template_that_rewrites_earlier_turns_never_labels_them(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(template, "_warned_prefix", False)
    t = tiny_tokenizer()
    # shows the last message only in full, as reasoning templates do with earlier thoughts
    t.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{% if loop.last %}{{ m['content'] }}{% else %}"
                       "{{ m['content'][:1] }}{% endif %}<|end|>{% endfor %}"
                       "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    msgs = [{"role": "user", "content": "question"}, {"role": "assistant", "content": "answer"}]
    ex, _ = build_one(t, tmp_path, {"messages": msgs})
    assert t.decode(ex["input_ids"]) == "<|user|>q<|end|><|assistant|>answer<|end|>"
    assert spans(t, ex) == ["answer<|end|>"]
    ex, _ = build_one(t, tmp_path, {"messages": msgs + [{"role": "user", "content": "again"},
                                                        {"role": "assistant", "content": "reply"}]})
    assert t.decode(ex["input_ids"]) == "<|user|>q<|end|><|assistant|>a<|end|><|user|>a<|end|><|assistant|>reply<|end|>"
    assert spans(t, ex) == ["a", "reply<|end|>"]  # the shortened first reply is all the input holds of it
    assert "renders a conversation prefix differently" in caplog.text


def test_json_list_errors_name_the_line_of_the_record(tok, tmp_path):
    path = tmp_path / "list.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c"}\n]\n')
    with pytest.raises(QmorError, match=r"list.json line 3: record has fields \['prompt'\]"):
        build_datasets(tok, DataConfig(source=str(path)))
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c"},\n  "x"\n]\n')
    with pytest.raises(QmorError, match="list.json line 4: a record must be a JSON object, got str"):
        load_records(str(path))
    train, _, stats = build_datasets(tok, DataConfig(source=str(path), skip_bad=True))
    assert (len(train), stats.n_skipped) == (1, 2)
