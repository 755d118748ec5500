"""RunDir: the run folder's names, its event log read back, its checkpoints found and pruned, a new run's checks."""

import json
import os

import pytest

from qmor.errors import QmorError
from qmor.training.run_dir import RunDir, find_adapter


def checkpoint(run: RunDir, step: int, complete: bool = True):
    path = run.checkpoint(step)
    path.mkdir(parents=True)
    if complete:
        (path / "state.json").write_text(json.dumps({"step": step}))
    return path


def test_layout_names(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    root = tmp_path / "run"
    assert run.path == root and os.fspath(run) == str(root) and str(run) == str(root)
    assert run.config == root / "config.json"
    assert run.adapter == root / "adapter"
    assert run.metrics == root / "metrics.jsonl"
    assert run.plot == root / "loss.png"
    assert run.loftq_report == root / "loftq_report.json"
    assert run.log == root / "train.log"
    assert run.checkpoints == root / "checkpoints"
    assert run.checkpoint(50) == root / "checkpoints" / "step-000050"
    assert run.checkpoint(1234567) == root / "checkpoints" / "step-1234567"
    assert RunDir.step_of(run.checkpoint(1234567)) == 1234567
    assert RunDir(run).path == root  # a RunDir is a path too


def test_read_events_skips_a_damaged_or_unfinished_line(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_events() == []  # no log yet
    run.metrics.write_bytes(b'{"event": "start", "step": 0}\n'
                            b'{"event": "train", "st\xff\n'  # damaged: cut and not even UTF-8
                            b'[1, 2]\n'  # valid JSON, but not an event
                            b'{"event": "train", "step": 1, "loss": 2.5}\n'
                            b'{"event": "eval", "step"')  # being written
    assert run.read_events() == [{"event": "start", "step": 0}, {"event": "train", "step": 1, "loss": 2.5}]


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path):
    run = RunDir(tmp_path)
    assert run.checkpoint_dirs() == [] and run.latest_checkpoint() is None
    checkpoint(run, 100)
    checkpoint(run, 2000)  # sorted by step, not by name
    checkpoint(run, 300)
    checkpoint(run, 4000, complete=False)  # a save that was interrupted: no state.json
    (run.checkpoints / ".step-005000.tmp").mkdir()
    (run.checkpoints / "notes").mkdir()
    assert [p.name for p in run.checkpoint_dirs()] == ["step-000100", "step-000300", "step-002000"]
    assert run.latest_checkpoint() == run.checkpoint(2000)


def test_prune_keeps_the_latest_and_drops_later_ones(tmp_path):
    run = RunDir(tmp_path)
    for step in (100, 200, 300, 400):
        checkpoint(run, step)
    run.prune_checkpoints(300, keep=2)  # 400 came after a damaged 300 that resume passed over
    assert [RunDir.step_of(p) for p in run.checkpoint_dirs()] == [200, 300]


def test_resumable_checkpoint_says_why_there_is_none(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(QmorError, match="no checkpoint to resume from"):
        run.resumable_checkpoint()
    run.adapter.mkdir()
    with pytest.raises(QmorError, match="has finished"):
        run.resumable_checkpoint()


def test_resumable_checkpoint_passes_over_a_damaged_one(tmp_path):
    run = RunDir(tmp_path)
    checkpoint(run, 100)
    checkpoint(run, 200)
    said = []
    with pytest.raises(QmorError, match="every checkpoint of .* is damaged"):
        run.resumable_checkpoint(said.append)  # neither holds an adapter nor optimizer state
    assert [line.split()[2] for line in said] == [str(run.checkpoint(200)), str(run.checkpoint(100))]


def test_check_fresh(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.check_fresh() is False  # not there yet
    run.path.mkdir()
    assert run.check_fresh() is False  # empty
    for name in ("config.json", "metrics.jsonl", "train.log"):
        (run.path / name).write_text("{}")
    run.checkpoints.mkdir()
    assert run.check_fresh() is True  # what a run that failed early leaves: started afresh
    run.clear_failed()
    assert sorted(p.name for p in run.path.iterdir()) == ["train.log"]  # the app's log of every attempt stays
    checkpoint(run, 1)
    with pytest.raises(QmorError, match="already holds a run; pass --resume"):
        run.check_fresh()
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(QmorError, match="is a file"):
        RunDir(file).check_fresh()


def test_final_adapter_and_find_adapter(tmp_path):
    run = RunDir(tmp_path / "run")
    run.adapter.mkdir(parents=True)
    assert run.final_adapter() is None  # a folder without the adapter's metadata is not one
    with pytest.raises(QmorError, match="holds neither qmor_adapter.json nor adapter/qmor_adapter.json"):
        find_adapter(run)
    (run.adapter / "qmor_adapter.json").write_text("{}")
    assert run.final_adapter() == run.adapter
    assert find_adapter(run) == run.adapter == find_adapter(run.adapter)  # a run folder or the adapter folder
