"""Experiment trackers and the measured peak memory: a tiny run reports to tensorboard (offline) the same figures
as metrics.jsonl, and every run's `done` event sets the measured peak beside the planner's prediction."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qmor.adapters.config import AdapterConfig
from qmor.data.pipeline import DataConfig
from qmor.errors import QmorError
from qmor.training.config import TrainConfig
from qmor.training.loop import train
from qmor.training.run_dir import RunDir


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QMOR_CACHE", str(tmp_path / "cache"))


def config(tiny_dir, out, **kw) -> TrainConfig:
    return TrainConfig(model=str(tiny_dir), output=str(out), lr=5e-3, max_steps=4, batch_size=4, log_steps=1,
                       eval_steps=2, eval_generate=0, device="cpu",
                       adapter=AdapterConfig(family="lora", r=4, init="default"),
                       data=DataConfig(source="uuid", num_examples=8, max_len=80, val_size=2), **kw)


def test_tensorboard_gets_what_metrics_jsonl_gets(tiny_dir, tmp_path):
    out = tmp_path / "run"
    seen = []
    result = train(config(tiny_dir, out, report_to="tensorboard", lr_scheduler_type="constant", warmup_ratio=0.0,
                          attn_implementation="eager"),
                   on_step=lambda step, model: seen.append(model.config._attn_implementation))
    events = RunDir(out).read_events()
    board = EventAccumulator(str(out / RunDir.TENSORBOARD))
    board.Reload()

    def scalars(tag):
        return {e.step: pytest.approx(e.value, rel=1e-6) for e in board.Scalars(tag)}

    train_events = [e for e in events if e["event"] == "train"]
    assert scalars("train/loss") == {e["step"]: e["loss"] for e in train_events} and len(train_events) == 4
    assert scalars("train/grad_norm") == {e["step"]: e["grad_norm"] for e in train_events}
    assert scalars("eval/eval_loss") == {e["step"]: e["eval_loss"] for e in events if e["event"] == "eval"}
    done = events[-1]
    assert done["event"] == "done" and done["peak_memory_bytes"] > 0 and done["predicted_peak_bytes"] > 0
    assert scalars("done/peak_memory_bytes") == {4: done["peak_memory_bytes"]}
    assert scalars("done/predicted_peak_bytes") == {4: done["predicted_peak_bytes"]}
    assert result["peak_memory_bytes"] == done["peak_memory_bytes"]
    # the other new options took effect: transformers' constant schedule, eager attention
    assert {e["lr"] for e in train_events} == {5e-3} and seen == ["eager"] * 4


def test_a_tracker_that_is_not_installed_is_one_line_before_anything_is_written(tiny_dir, tmp_path, monkeypatch):
    from qmor.training import trackers

    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    out = tmp_path / "run"
    with pytest.raises(QmorError) as err:
        train(config(tiny_dir, out, report_to="tensorboard,mlflow"))
    assert str(err.value) == "--report-to mlflow needs the mlflow package: pip install mlflow (or leave mlflow out " \
                             "of --report-to)"
    assert not out.exists()


def test_every_run_records_the_measured_peak_beside_the_plan(tiny_dir, tmp_path):
    """Without a tracker too: the done event carries both figures, the plan's being that of the run's config."""
    from qmor.model.load import load_4bit
    from qmor.plan import estimate

    out = tmp_path / "run"
    train(config(tiny_dir, out))
    done = RunDir(out).read_events()[-1]
    cfg = config(tiny_dir, out)
    plan = estimate(load_4bit(str(tiny_dir), cfg.quant, "cpu").config, 80, 4, cfg.adapter, param_dtype_bytes=4,
                    device="cpu", autocast=False)
    assert done["predicted_peak_bytes"] == plan.total_bytes
    assert done["peak_memory_bytes"] > 0
