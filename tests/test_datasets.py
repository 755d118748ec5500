"""Data through datasets: data files, Hub ids read offline from the caches, splits, column mapping, TRL's shapes,
and the tokenising cache that spares a restart the work."""

import copy
import json
import os

import pandas as pd
import pytest
from test_data import spans, write_jsonl

import qmor.data.pipeline
from qmor.data.pipeline import DataConfig, build_datasets, preview
from qmor.data.sources import open_source
from qmor.errors import QmorError
from qmor.model.tiny import tiny_tokenizer

QA = pd.DataFrame({"question": [f"q{i}" for i in range(6)], "answer": [f"a{i}" for i in range(6)]})
MAP = {"prompt": "question", "completion": "answer"}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(autouse=True)
def caches(tmp_path, monkeypatch):
    """qmor's, datasets' and the Hub's caches in the test's folder, and no network."""
    import datasets
    import huggingface_hub.constants as hub

    monkeypatch.setenv("QMOR_CACHE", str(tmp_path / "qmor"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


def texts(tok, rows):
    return [tok.decode(r["input_ids"]) for r in rows]


def test_parquet_and_csv_with_columns_match_the_same_jsonl(tok, tmp_path):
    QA.to_parquet(tmp_path / "d.parquet")
    QA.to_csv(tmp_path / "d.csv", index=False)
    same = write_jsonl(tmp_path / "d.jsonl", [{"prompt": q, "completion": a} for q, a in zip(QA.question, QA.answer,
                                                                                              strict=True)])
    expected, _, _ = build_datasets(tok, DataConfig(source=same))
    for source in ("d.parquet", "d.csv"):
        for columns in (MAP, "prompt=question,completion=answer", "prompt=question,response=answer"):
            rows, _, stats = build_datasets(tok, DataConfig(source=str(tmp_path / source), columns=columns))
            assert rows == expected and stats.n_records == 6
    assert texts(tok, expected)[0] == "<|user|>q0<|end|><|assistant|>a0<|end|>"
    sliced, _, _ = build_datasets(tok, DataConfig(source=str(tmp_path / "d.parquet"), columns=MAP, split="train[:2]"))
    assert sliced == expected[:2]


def test_llama_factory_column_names_make_alpaca_records(tok, tmp_path):
    frame = pd.DataFrame({"q": ["Add"], "extra": ["1+2"], "a": ["3"], "sys": ["Be terse"]})
    frame.to_parquet(tmp_path / "d.parquet")
    rows, _, stats = build_datasets(tok, DataConfig(source=str(tmp_path / "d.parquet"),
                                                    columns="prompt=q,query=extra,response=a,system=sys"))
    assert stats.format == "alpaca"
    assert texts(tok, rows) == ["<|system|>Be terse<|end|><|user|>Add\n\n1+2<|end|><|assistant|>3<|end|>"]
    assert spans(tok, rows[0]) == ["3<|end|>"]


def write_hub_snapshot(hub, repo, files):
    """Files of a dataset repo where `hf download REPO --repo-type dataset` puts them (the Hugging Face cache)."""
    folder = hub / f"datasets--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    for name, frame in files.items():
        path = folder / "snapshots" / COMMIT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path)


def test_hub_id_offline_from_the_downloaded_files(tok, caches):
    write_hub_snapshot(caches / "hub", "qmor-tests/qa", {"data/train-00000-of-00001.parquet": QA.iloc[:4],
                                                         "data/test-00000-of-00001.parquet": QA.iloc[4:]})
    train, _, stats = build_datasets(tok, DataConfig(source="qmor-tests/qa", columns=MAP))
    test, _, _ = build_datasets(tok, DataConfig(source="qmor-tests/qa", columns=MAP, split="test"))
    assert (stats.n_records, len(test)) == (4, 2)
    assert texts(tok, test)[0] == "<|user|>q4<|end|><|assistant|>a4<|end|>"
    with pytest.raises(QmorError, match=r"qmor-tests/qa has no split 'validation'; its splits: train, test; pass one "
                                        r"with --split") as e:
        build_datasets(tok, DataConfig(source="qmor-tests/qa", columns=MAP, split="validation"))
    assert "\n" not in str(e.value)
    fmt, rows = preview("qmor-tests/qa", n=2, columns=MAP)
    assert fmt == "prompt_completion" and [r["prompt"] for r in rows] == ["q0", "q1"]


def test_hub_id_offline_from_the_datasets_cache_of_an_earlier_load(tok, caches):
    """What datasets.load_dataset leaves in HF_DATASETS_CACHE when it loads a Hub dataset (here written by its own
    parquet builder under the id's name, as the Hub loader does), read back offline."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    QA.to_parquet(caches / "qa.parquet")
    Parquet(dataset_name="qmorqa", config_name="default", config_id="default", hash=COMMIT,
            data_files={"train": str(caches / "qa.parquet")}).download_and_prepare()
    (caches / "qa.parquet").unlink()  # only the cache is left
    rows, _, stats = build_datasets(tok, DataConfig(source="qmorqa", columns=MAP))
    assert stats.n_records == 6 and texts(tok, rows)[5] == "<|user|>q5<|end|><|assistant|>a5<|end|>"


def test_hub_id_that_is_not_cached_names_the_fix(tok):
    with pytest.raises(QmorError) as e:
        build_datasets(tok, DataConfig(source="qmor-tests/nowhere"))
    line = str(e.value)
    assert "\n" not in line
    assert "'qmor-tests/nowhere' is not in the local cache and the Hub is offline" in line
    assert "hf download qmor-tests/nowhere --repo-type dataset" in line


def test_missing_column_unknown_split_and_bad_mapping_are_one_line(tok, tmp_path):
    QA.to_parquet(tmp_path / "d.parquet")
    src = str(tmp_path / "d.parquet")
    cases = [
        (dict(source=src, columns={"prompt": "quest", "completion": "answer"}),
         r"d.parquet has no column 'quest' \(columns prompt=quest\); its columns: question, answer; fix --columns"),
        (dict(source=src, split="test"), r"d.parquet has no split 'test'; its splits: train; pass one with --split"),
        (dict(source=write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}]), split="test"),
         r"d.jsonl is a single file, which holds one split \(train\), not 'test'; pass --split train or a slice"),
        (dict(source="uuid", split="dev"), r"built-in task uuid has the splits train and test, not 'dev'"),
        (dict(source=write_jsonl(tmp_path / "e.jsonl", [{"q": "x", "a": "y"}]), columns="prompt=q,completion=b"),
         r"e.jsonl has no column 'b' \(columns completion=b\); its columns: q, a; fix --columns"),
    ]
    for kw, pattern in cases:
        with pytest.raises(QmorError, match=pattern) as e:
            build_datasets(tok, DataConfig(**kw))
        assert "\n" not in str(e.value)
    # a JSON file takes slices as CSV and Parquet do, with file-and-line names for what it keeps
    rows = write_jsonl(tmp_path / "f.jsonl", [{"text": f"t{i}"} for i in range(10)])
    assert [r["text"] for r, _ in open_source(rows, "train[:2]+train[-1:]").head(9)] == ["t0", "t1", "t9"]
    assert [loc for _, loc in open_source(rows, "train[50%:60%]").head(9)] == [f"{rows} line 6"]
    with pytest.raises(QmorError, match=r"columns names unknown field\(s\) \['answer'\]"):
        DataConfig(columns="answer=a")
    with pytest.raises(QmorError, match="must be field=column pairs"):
        DataConfig(columns="prompt")
    with pytest.raises(QmorError, match="maps two columns onto 'completion'"):
        DataConfig(source=src, columns="completion=question,response=answer")


def test_datasets_folders_by_split(tok, tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(QA.iloc[:4]),
                          "test": datasets.Dataset.from_pandas(QA.iloc[4:])}).save_to_disk(str(tmp_path / "saved"))
    rows, _, _ = build_datasets(tok, DataConfig(source=str(tmp_path / "saved"), columns=MAP, split="test"))
    assert texts(tok, rows) == ["<|user|>q4<|end|><|assistant|>a4<|end|>", "<|user|>q5<|end|><|assistant|>a5<|end|>"]
    with pytest.raises(QmorError, match="saved has no split 'dev'; its splits: train, test"):
        build_datasets(tok, DataConfig(source=str(tmp_path / "saved"), columns=MAP, split="dev"))
    (tmp_path / "files").mkdir()  # a folder of data files, as hf download --local-dir leaves one
    QA.to_parquet(tmp_path / "files" / "train.parquet")
    rows, _, _ = build_datasets(tok, DataConfig(source=str(tmp_path / "files"), columns=MAP))
    assert len(rows) == 6


def test_trl_conversational_prompt_completion_trains_the_completion_only(tok, tmp_path):
    parts = [{"type": "text", "text": "hi "}, {"type": "text", "text": "you"}]
    record = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": parts},
                         {"role": "assistant", "content": "earlier"}, {"role": "user", "content": "q"}],
              "completion": [{"role": "assistant", "content": "answer"}]}
    rows, _, stats = build_datasets(tok, DataConfig(source=write_jsonl(tmp_path / "c.jsonl", [record])))
    assert stats.format == "prompt_completion"
    assert texts(tok, rows) == ["<|system|>s<|end|><|user|>hi you<|end|><|assistant|>earlier<|end|><|user|>q<|end|>"
                                "<|assistant|>answer<|end|>"]
    assert spans(tok, rows[0]) == ["answer<|end|>"]  # not the earlier reply, which belongs to the prompt
    import datasets

    # through a table, where every turn is a struct with every field any turn has (None where it has none)
    record["prompt"][1]["content"] = "hi you"  # a column holds strings or lists of parts, not both
    record["completion"][0]["tool_calls"] = None
    record["prompt"][2]["name"] = "bot"
    datasets.Dataset.from_list([record]).to_parquet(str(tmp_path / "c.parquet"))
    assert build_datasets(tok, DataConfig(source=str(tmp_path / "c.parquet")))[0] == rows


def test_content_that_is_not_text_is_a_bad_record(tok, tmp_path):
    image = {"messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]},
                          {"role": "assistant", "content": "a cat"}]}
    src = write_jsonl(tmp_path / "i.jsonl", [image])
    with pytest.raises(QmorError, match=r"i.jsonl line 1: a content part of type 'image' is not text"):
        build_datasets(tok, DataConfig(source=src))


TOOL_CALL = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "today's weather",
                                           "parameters": {"type": "object", "properties": {}}}}]
TOOL_RECORD = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                            {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
                            {"role": "tool", "name": "weather", "content": "sunny"},
                            {"role": "assistant", "content": "Sunny."}],
               "tools": TOOLS}


def test_tool_role_tool_calls_and_tools_reach_the_template(tok, tmp_path):
    bare = copy.deepcopy(tok)
    bare.chat_template = None  # the ChatML fallback writes tools and tool calls as JSON
    rows, _, _ = build_datasets(bare, DataConfig(source=write_jsonl(tmp_path / "t.jsonl", [TOOL_RECORD]),
                                                 max_len=512))
    call = json.dumps([TOOL_CALL])
    assert bare.decode(rows[0]["input_ids"]) == (
        f"<|im_start|>tools\n{json.dumps(TOOLS)}<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        f"<|im_start|>assistant\n{call}<|im_end|><|end|>\n<|im_start|>tool\nsunny<|im_end|>\n"
        "<|im_start|>assistant\nSunny.<|im_end|><|end|>\n")
    assert spans(bare, rows[0]) == [f"{call}<|im_end|><|end|>\n", "Sunny.<|im_end|><|end|>\n"]  # not the tool's


def test_sharegpt_tool_turns(tok, tmp_path):
    record = {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "function_call", "value": "add(2,2)"},
                                {"from": "observation", "value": "4"}, {"from": "gpt", "value": "4"}]}
    rows, _, _ = build_datasets(tok, DataConfig(source=write_jsonl(tmp_path / "s.jsonl", [record])))
    assert texts(tok, rows) == ["<|user|>2+2?<|end|><|assistant|>add(2,2)<|end|><|tool|>4<|end|><|assistant|>4<|end|>"]
    assert spans(tok, rows[0]) == ["add(2,2)<|end|>", "4<|end|>"]


def test_a_second_build_reads_the_tokenised_cache(tok, tmp_path, monkeypatch):
    QA.to_parquet(tmp_path / "d.parquet")
    recs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(5)]
    sources = {"jsonl": DataConfig(source=write_jsonl(tmp_path / "m.jsonl", recs)),
               "parquet": DataConfig(source=str(tmp_path / "d.parquet"), columns=MAP),
               "task": DataConfig(source="add", num_examples=20)}
    calls = []
    real = qmor.data.pipeline._example
    monkeypatch.setattr(qmor.data.pipeline, "_example", lambda *a: calls.append(1) or real(*a))
    for name, cfg in sources.items():
        calls.clear()
        first, _, stats = build_datasets(tok, cfg)
        assert calls and not stats.from_cache and os.path.isfile(stats.cache_file), name
        calls.clear()
        again, _, stats2 = build_datasets(tok, cfg)  # as a restarted run would
        assert not calls and stats2.from_cache and stats2.cache_file == stats.cache_file, name
        assert again == first
    changed = DataConfig(source=sources["jsonl"].source, train_on_prompt=True)  # other labels: tokenised again
    calls.clear()
    assert not build_datasets(tok, changed)[2].from_cache and calls
    write_jsonl(tmp_path / "m.jsonl", recs[:4])  # other data: tokenised again
    calls.clear()
    rows, _, stats = build_datasets(tok, sources["jsonl"])
    assert not stats.from_cache and len(calls) == len(rows) == 4
    other = copy.deepcopy(tok)
    other.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"  # another template: again
    calls.clear()
    assert not build_datasets(other, sources["jsonl"])[2].from_cache and calls


def test_training_script_takes_split_and_columns(tiny_dir, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import datasets
    import finetune_4bit

    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(QA.iloc[:4]),
                          "test": datasets.Dataset.from_pandas(QA.iloc[4:])}).save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "run"
    code = finetune_4bit.main(["--model", str(tiny_dir), "--dataset", str(tmp_path / "saved"), "--split", "test",
                               "--columns", "prompt=question,response=answer", "--output", str(out),
                               "--max-steps", "2", "--batch-size", "2", "--max-len", "32", "--eval-generate", "0",
                               "--device", "cpu", "--init", "default", "--family", "lora", "--rank", "4"])
    assert code == 0
    data = json.loads((out / "config.json").read_text())["data"]
    assert (data["split"], data["columns"]) == ("test", "prompt=question,response=answer")
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["n_train"] == 2  # the test split's two records
