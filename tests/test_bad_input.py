"""Every case of docs/bad-input.md end to end: the exit code, the one line the user reads, what is left on disk.

The scripts run in this process, so an exception that escapes (what the user would see as a traceback) fails the
test by itself; the assertions check that exactly one `error: ` line names the cause and the fix.
"""

import errno
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from qmor.adapters.attach import CONFIG, LEGACY_CONFIG
from qmor.adapters.config import AdapterConfig
from qmor.data.pipeline import DataConfig
from qmor.errors import QmorError
from qmor.model.tiny import make_tiny
from qmor.training.checkpoint import check_checkpoint
from qmor.training.config import TrainConfig
from qmor.training.loop import train
from qmor.training.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import chat as chat_cli  # noqa: E402
import export_fp16  # noqa: E402
import finetune_4bit  # noqa: E402

FAST = ["--max-steps", "3", "--batch-size", "4", "--num-examples", "8", "--max-len", "80", "--eval-generate", "0",
        "--log-steps", "1", "--device", "cpu", "--init", "default", "--family", "lora", "--rank", "4"]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QMOR_CACHE", str(tmp_path_factory.getbasetemp() / "qmor-cache"))


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    """A second tiny model of the same architecture and shapes, with other weights."""
    return make_tiny(tmp_path_factory.mktemp("other") / "tiny", seed=1, hidden=64, layers=2)


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory):
    """A finished LoftQ run (the default init, whose export used to pass on any base) with two checkpoints, the last
    step's among them."""
    out = tmp_path_factory.mktemp("runs") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QMOR_CACHE", str(tmp_path_factory.getbasetemp() / "qmor-cache"))
        argv = ["--model", str(tiny_dir), "--output", str(out), *FAST, "--init", "loftq", "--save-steps", "1"]
        assert finetune_4bit.main(argv) == 0
    assert [p.name for p in RunDir(out).checkpoint_dirs()] == ["step-000002", "step-000003"]
    return out


def error_line(capsys, code: int, *words: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def strict_events(run_dir: Path) -> list[dict]:
    """metrics.jsonl read the way a strict JSON reader (a browser, jq) would: NaN or Infinity fail."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines]


# ---- silently wrong ------------------------------------------------------------------------------------------------

IMPOSSIBLE = [
    (["--family", "sira", "--top-k", "0"], "top_k must be between 1 and experts"),
    (["--family", "sira", "--experts", "2", "--top-k", "3"], "top_k must be between 1 and experts (2)"),
    (["--family", "sira", "--top-k", "1"], "top_k 1 cannot train SiRA"),
    (["--experts", "0"], "experts must be >= 1"),
    (["--lr", "nan"], "lr must be positive and finite"),
    (["--lr", "inf"], "lr must be positive and finite"),
    (["--alpha", "0"], "alpha must be > 0"),
    (["--capacity-factor", "0"], "capacity_factor must be > 0"),
    (["--expert-dropout", "1"], "expert_dropout must be in [0, 1)"),
    (["--aux-loss-weight", "-1"], "aux_loss_weight must be >= 0"),
    (["--loftq-iters", "0"], "loftq_iters must be >= 1"),
    (["--mora-kind", "wide"], "mora_kind must be auto, rope or sharing"),
    (["--epochs", "inf", "--max-steps", "0"], "epochs must be positive and finite"),
    (["--weight-decay", "-0.1"], "weight_decay must be >= 0"),
    (["--max-grad-norm", "nan"], "max_grad_norm must be >= 0"),
    (["--warmup-ratio", "nan"], "warmup_ratio must be in [0, 1)"),
    (["--val-size", "nan"], "val_size must be >= 0"),
    (["--max-len", "4"], "max_len must be an integer of at least 8"),
    (["--keep-checkpoints", "0"], "keep_checkpoints must be an integer >= 1"),
    (["--seed", "-1"], "seed must be an integer >= 0"),
    (["--quant-storage", "int4"], "quant storage must be"),
]


@pytest.mark.parametrize("flags,words", IMPOSSIBLE, ids=[" ".join(f) for f, _ in IMPOSSIBLE])
def test_impossible_settings_are_refused_before_anything_runs(flags, words, tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = finetune_4bit.main(["--model", str(tiny_dir), "--output", str(out), *FAST, *flags])
    error_line(capsys, code, words, "pass e.g.")
    assert not out.exists()


def test_diverged_run_stops_with_valid_metrics_and_can_be_run_again(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = finetune_4bit.main(["--model", str(tiny_dir), "--output", str(out), *FAST, "--lr", "1e30"])
    error_line(capsys, code, "training diverged at step 2", "loss nan", "lower --lr (now 1e+30)",
               "nothing was saved, so run it again with the same --output")
    assert not (out / "adapter").exists() and not RunDir(out).checkpoint_dirs()
    events = strict_events(out)
    assert [e["event"] for e in events] == ["start", "train", "error"]
    assert "diverged" in events[-1]["message"]
    # the same command with a sane learning rate starts afresh in the same folder, nothing deleted by hand
    assert finetune_4bit.main(["--model", str(tiny_dir), "--output", str(out), *FAST, "--lr", "1e-3"]) == 0
    assert "starting it afresh" in capsys.readouterr().out
    assert (out / "adapter").is_dir()
    assert [e["event"] for e in strict_events(out)] == ["start", "train", "train", "train", "checkpoint", "done"]


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_divergence_after_a_checkpoint_keeps_it(clip, tiny_dir, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(model=str(tiny_dir), output=str(out), max_steps=6, batch_size=4, save_steps=2, log_steps=1,
                      eval_generate=0, device="cpu", max_grad_norm=clip,
                      adapter=AdapterConfig(family="lora", r=4, init="default"),
                      data=DataConfig(source="uuid", num_examples=8, max_len=80))

    def poison(step, model):  # what a blown-up update leaves: weights that are no longer numbers
        if step == 3:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(math.nan)

    with pytest.raises(QmorError, match=r"training diverged at step 4: loss nan, gradient norm nan; .*the last good "
                                        r"checkpoint step-000002 is kept"):
        train(cfg, on_step=poison)
    assert [p.name for p in RunDir(out).checkpoint_dirs()] == ["step-000002"]
    check_checkpoint(RunDir(out).checkpoint_dirs()[0])  # intact, and resumable
    assert not (out / "adapter").exists()
    assert strict_events(out)[-1]["event"] == "error"


def test_loftq_never_starts_from_a_base_that_is_not_numbers(tiny_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from qmor.model import loftq
    from qmor.model.load import load_for_training

    fit = loftq.loftq_layer
    monkeypatch.setattr(loftq, "loftq_layer", lambda *a: (*fit(*a)[:2], math.nan))  # a fit gone wrong
    with pytest.raises(QmorError, match=r"LoftQ init of .* gave a non-finite error .*--init default"):
        load_for_training(str(tiny_dir), AdapterConfig(family="lora", r=4, init="loftq"), device="cpu",
                          cache_dir=tmp_path / "cache")
    monkeypatch.setattr(loftq, "loftq_layer", fit)

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    state = load_file(str(broken / "model.safetensors"))
    key = next(k for k in state if k.endswith("q_proj.weight"))
    state[key][0, 0] = math.inf
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QmorError, match=r"the checkpoint's .*q_proj.weight holds nan or inf values"):
        load_for_training(str(broken), AdapterConfig(family="lora", r=4, init="loftq"), device="cpu",
                          cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing cached


def test_metrics_never_hold_nan(tmp_path):
    from qmor.training.metrics import MetricsLog

    MetricsLog(tmp_path).log("train", step=1, loss=math.nan, grad_norm=math.inf, extra={"x": [math.nan]})
    (event,) = strict_events(tmp_path)
    assert event["loss"] is None and event["grad_norm"] is None and event["extra"] == {"x": [None]}


def test_wrong_base_is_refused_by_export_and_chat(run, other_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "merged"
    code = export_fp16.main([str(run), "--output", str(out), "--base-model", str(other_dir), "--device", "cpu"])
    error_line(capsys, code, f"{other_dir} is not the base this adapter was trained on", "other weights",
               "--allow-other-base")
    assert not out.exists() and not list(tmp_path.iterdir())
    monkeypatch.setattr("builtins.input", lambda prompt="": (_ for _ in ()).throw(EOFError))
    code = chat_cli.main(["--model", str(other_dir), "--adapter", str(run), "--device", "cpu"])
    error_line(capsys, code, "is not the base this adapter was trained on")


def test_moved_base_passes_and_another_base_needs_the_flag(run, tiny_dir, other_dir, tmp_path, capsys):
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(tiny_dir, moved)
    assert export_fp16.main([str(run), "--output", str(tmp_path / "a"), "--base-model", str(moved),
                             "--device", "cpu"]) == 0
    assert (tmp_path / "a" / "config.json").is_file()
    capsys.readouterr()
    assert export_fp16.main([str(run), "--output", str(tmp_path / "b"), "--base-model", str(other_dir),
                             "--device", "cpu", "--allow-other-base"]) == 0
    assert "using it anyway (--allow-other-base)" in capsys.readouterr().err


def test_chat_session_checks_the_base_and_old_adapters_load_unchecked(run, tiny_dir, other_dir, tmp_path):
    from qmor.chat import ChatSession

    session = ChatSession(str(other_dir), device="cpu")
    with pytest.raises(QmorError, match="is not the base this adapter was trained on"):
        session.use_adapter(run)
    assert session.adapter is None  # the refused switch leaves the plain base
    old = tmp_path / "old"  # an adapter saved before fingerprints existed
    shutil.copytree(run / "adapter", old)
    meta = json.loads((old / CONFIG).read_text())
    del meta["base_fingerprint"]
    (old / CONFIG).unlink()
    (old / LEGACY_CONFIG).write_text(json.dumps(meta))  # and under the name earlier versions wrote
    assert session.use_adapter(old).adapter.family == "lora"
    moved = tmp_path / "copy"
    shutil.copytree(tiny_dir, moved)
    assert ChatSession(str(moved), device="cpu").use_adapter(run) is not None


def test_fingerprint_is_the_same_for_a_copy_and_differs_for_another_model(tiny_dir, other_dir, tmp_path):
    from qmor.model.fingerprint import base_fingerprint

    shutil.copytree(tiny_dir, tmp_path / "copy")
    a, b, c = base_fingerprint(str(tiny_dir)), base_fingerprint(str(tmp_path / "copy")), base_fingerprint(
        str(other_dir))
    assert a == b
    assert (a["architecture"], a["shapes"], a["matrices"]) == (c["architecture"], c["shapes"], c["matrices"])
    assert a["weights"] != c["weights"]


# ---- one line instead of a traceback -------------------------------------------------------------------------------

def test_non_utf8_training_file(tiny_dir, tmp_path, capsys):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    out = tmp_path / "run"
    code = finetune_4bit.main(["--model", str(tiny_dir), "--dataset", str(data), "--output", str(out), *FAST])
    error_line(capsys, code, f"{data} line 2", "not UTF-8", "save the file as UTF-8")
    assert not out.exists()


def test_run_that_failed_before_its_first_checkpoint_is_restartable(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()  # what a run that failed after loading used to leave: neither --resume nor a new run took it
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"event": "start"}\n{"event": "error", "message": "x"}\n')
    code = finetune_4bit.main(["--resume", "--output", str(out)])
    error_line(capsys, code, "no checkpoint to resume from", "without --resume")
    assert finetune_4bit.main(["--model", str(tiny_dir), "--output", str(out), *FAST]) == 0
    assert [e["event"] for e in strict_events(out)][0] == "start" and (out / "adapter").is_dir()


def test_resume_passes_over_a_damaged_checkpoint(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    latest = copy / "checkpoints" / "step-000003" / "optimizer.pt"
    latest.write_bytes(latest.read_bytes()[:200])  # a write cut short
    assert finetune_4bit.main(["--resume", "--output", str(copy), "--max-steps", "4"]) == 0  # trained further
    err = capsys.readouterr().err
    assert "checkpoint" in err and "step-000003 is damaged (optimizer.pt cannot be read" in err
    starts = [e for e in strict_events(copy) if e["event"] == "start"]
    assert starts[-1]["step"] == 2 and starts[-1]["resumed"]
    check_checkpoint(copy / "checkpoints" / "step-000003")  # written again, whole


def test_resume_with_every_checkpoint_damaged(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for ckpt in RunDir(copy).checkpoint_dirs():
        (ckpt / "adapter" / "adapter.safetensors").write_bytes(b"\0" * 10)
    code = finetune_4bit.main(["--resume", "--output", str(copy), "--max-steps", "4"])
    error_line(capsys, code, "every checkpoint of", "is damaged", "start a new run")
    assert len(RunDir(copy).checkpoint_dirs()) == 2  # nothing deleted


def test_planted_pickle_is_not_a_qmor_checkpoint(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    planted = copy / "checkpoints" / "step-000003" / "optimizer.pt"
    torch.save({"state": Planted()}, planted)
    code = finetune_4bit.main(["--resume", "--output", str(copy), "--max-steps", "4"])
    line = error_line(capsys, code, "optimizer.pt is not a checkpoint qmor wrote", "never loads")
    assert "weights_only" not in line
    assert not marker.exists() and planted.is_file()


def test_export_onto_a_full_disk(run, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("qmor.export.merge.save_file", full)
    out = tmp_path / "exports" / "merged"
    code = export_fp16.main([str(run), "--output", str(out), "--device", "cpu"])
    error_line(capsys, code, "no space left on the device", "free some space")
    assert list((tmp_path / "exports").iterdir()) == []  # no output, no temporary folder


def test_export_into_a_folder_that_cannot_be_written(run, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr("qmor.export.exporter.os.access", lambda path, mode: Path(path) != locked)
    code = export_fp16.main([str(run), "--output", str(locked / "sub" / "merged"), "--device", "cpu"])
    error_line(capsys, code, f"cannot write into {locked}", "choose an --output")
    assert list(locked.iterdir()) == []


def test_a_folder_that_cannot_be_created_is_one_line(tmp_path, monkeypatch):
    from qmor.files import atomic_dir

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(QmorError, match="permission denied: .*choose a folder you can write to"):
        with atomic_dir(tmp_path / "a" / "b"):
            pass


def test_training_onto_a_full_disk(tiny_dir, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)  # the optimizer state of the first checkpoint
    out = tmp_path / "run"
    code = finetune_4bit.main(["--model", str(tiny_dir), "--output", str(out), *FAST, "--save-steps", "1"])
    error_line(capsys, code, "no space left on the device to write", "step-000001", "free some space")
    assert list((out / "checkpoints").iterdir()) == [] and not (out / "adapter").exists()
    assert strict_events(out)[-1]["event"] == "error"


@pytest.mark.parametrize("failure", ["oserror", "safetensors", "torch.save"])
def test_a_full_disk_is_one_line_whatever_writer_hit_it(failure, tmp_path, monkeypatch):
    """OSError, safetensors' "(os error 28)" and torch.save's bare "unexpected pos" on a disk with no room left."""
    from collections import namedtuple

    from qmor.files import atomic_dir

    raised = {"oserror": OSError(errno.ENOSPC, "No space left on device"),
              "safetensors": Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
              "torch.save": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")}
    if failure == "torch.save":
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr("qmor.files.shutil.disk_usage", lambda path: usage(1 << 30, 1 << 30, 0))
    with pytest.raises(QmorError, match="no space left on the device to write .*ckpt; free some space"):
        with atomic_dir(tmp_path / "ckpt"):
            raise raised[failure]
    assert list(tmp_path.iterdir()) == []


# ---- smaller -------------------------------------------------------------------------------------------------------

def test_resume_names_the_flags_it_ignores(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert finetune_4bit.main(["--resume", "--output", str(copy), "--lr", "0.5", "--no-packing"]) == 0
    err = capsys.readouterr().err
    assert "warning: --resume continues" in err and "--lr, --no-packing will not apply" in err
    assert json.loads((copy / "config.json").read_text())["lr"] != 0.5


def test_model_that_is_a_file(tmp_path, capsys):
    (tmp_path / "model.bin").write_bytes(b"x")
    for given in (str(tmp_path / "model.bin"), "model.bin"):
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(tmp_path)
            code = finetune_4bit.main(["--model", given, "--output", str(tmp_path / "run"), *FAST])
        error_line(capsys, code, "is a file; pass the model's folder")
    assert not (tmp_path / "run").exists()


def test_help_and_refusal_agree_on_over_long_examples(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        finetune_4bit.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "longer examples are truncated (and counted), a data set with no example that fits is refused" in help_text
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"instruction": "x" * 60, "output": "y" * 60}) + "\n")
    code = finetune_4bit.main(["--model", str(tiny_dir), "--dataset", str(data), "--output", str(tmp_path / "r"),
                               *FAST, "--max-len", "16"])
    error_line(capsys, code, "every example of", "raise max_len")


def test_records_without_a_reply_are_named_in_one_warning(tiny_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ""},
            {"instruction": "d", "output": None}, {"instruction": "e", "output": "f"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert finetune_4bit.main(["--model", str(tiny_dir), "--dataset", str(data), "--output", str(out), *FAST]) == 0
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert f"2 of 4 examples have an empty or null output ({data} lines 2, 3)" in line
    assert "teach the model to answer nothing" in line
    assert strict_events(out)[0]["n_empty"] == 2


@pytest.mark.parametrize("flags", [[], ["--train-on-prompt"]], ids=["replies", "train-on-prompt"])
def test_a_dataset_without_any_reply_is_refused(flags, tiny_dir, tmp_path, capsys):
    """The wrong column: the replies are in `response`, the empty `output` is what training reads."""
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"q{i}", "output": "", "response": f"a{i}"} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    code = finetune_4bit.main(["--model", str(tiny_dir), "--dataset", str(data), "--output", str(out), *FAST, *flags])
    error_line(capsys, code, f"all 4 examples of {data} have an empty or null output",
               "--columns output=COLUMN (its columns: instruction, output, response)")
    assert not out.exists()
    argv = ["--model", str(tiny_dir), "--dataset", str(data), "--output", str(out), *FAST, *flags]
    assert finetune_4bit.main([*argv, "--columns", "output=response"]) == 0
    assert "warning: " not in capsys.readouterr().err


def test_uncached_hub_id_names_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network attempts (and their retries): read once imported, so
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # the constant is set too
    code = finetune_4bit.main(["--model", "qmor-tests/no-such-model", "--output", str(tmp_path / "r"), *FAST])
    error_line(capsys, code, "'qmor-tests/no-such-model'", "hf download qmor-tests/no-such-model")
    assert not (tmp_path / "r").exists()


def test_missing_export_base_names_the_fix(run, tmp_path, capsys):
    code = export_fp16.main([str(run), "--output", str(tmp_path / "m"), "--base-model", str(tmp_path / "gone")])
    error_line(capsys, code, "does not exist", "pass the folder where it is now with --base-model")
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    meta = json.loads((copy / "adapter" / CONFIG).read_text())
    meta["base_model"] = str(tmp_path / "moved-away")
    (copy / "adapter" / CONFIG).write_text(json.dumps(meta))
    code = export_fp16.main([str(copy), "--output", str(tmp_path / "m")])
    error_line(capsys, code, "(recorded in the adapter) does not exist", "--base-model")
    assert not (tmp_path / "m").exists()


def test_corrupt_model_config_names_the_fix(tiny_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "config.json").write_text('{"model_type": "llama", ')
    code = finetune_4bit.main(["--model", str(broken), "--output", str(tmp_path / "r"), *FAST])
    error_line(capsys, code, "config.json is damaged", "download or save the model again")
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    code = finetune_4bit.main(["--model", str(broken), "--output", str(tmp_path / "r"), *FAST])
    error_line(capsys, code, "does not recognize this architecture", "upgrade transformers")
    assert not (tmp_path / "r").exists()


def test_dataset_problems_name_the_fix(tmp_path, capsys, monkeypatch):
    import datasets
    import pandas as pd

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network attempts, as for models above
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    pd.DataFrame({"question": ["q"], "answer": ["a"]}).to_parquet(tmp_path / "d.parquet")
    cases = [(["--dataset", "qmor-tests/no-such-data"], ["'qmor-tests/no-such-data' is not in the local cache",
                                                         "hf download qmor-tests/no-such-data --repo-type dataset"]),
             (["--dataset", str(tmp_path / "d.parquet"), "--columns", "prompt=q,completion=answer"],
              ["has no column 'q'", "its columns: question, answer", "fix --columns"]),
             (["--dataset", str(tmp_path / "d.parquet"), "--columns", "prompt=question,completion=answer",
               "--split", "test"], ["has no split 'test'", "its splits: train", "--split"])]
    for flags, words in cases:
        code = finetune_4bit.main(["--output", str(tmp_path / "r"), *FAST, *flags])
        error_line(capsys, code, *words)
        assert not (tmp_path / "r").exists()


# ---- damaged and non-finite files ------------------------------------------------------------------------------------

def cut_short(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def no_input(monkeypatch):
    monkeypatch.setattr("builtins.input", lambda prompt="": (_ for _ in ()).throw(EOFError))


def test_a_cut_short_model_file_is_one_line_in_every_command(run, tiny_dir, tmp_path, capsys, monkeypatch):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    cut_short(broken / "model.safetensors")
    words = (f"{broken / 'model.safetensors'} is damaged", "file not fully covered", "a download cut short",
             "download or save the model again")
    for init in ("default", "loftq"):  # transformers reads the file first, LoftQ's stream second
        out = tmp_path / f"run-{init}"
        code = finetune_4bit.main(["--model", str(broken), "--output", str(out), *FAST, "--init", init])
        error_line(capsys, code, *words)
        assert not out.exists()
    code = export_fp16.main([str(run), "--output", str(tmp_path / "m"), "--base-model", str(broken),
                             "--device", "cpu"])
    error_line(capsys, code, *words)
    no_input(monkeypatch)
    code = chat_cli.main(["--model", str(broken), "--adapter", str(run), "--device", "cpu"])
    error_line(capsys, code, *words)
    assert not (tmp_path / "m").exists()


def test_a_damaged_shard_names_itself_and_the_download_that_replaces_it(tiny_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    # where hf download puts a model: the fix names its hub id
    broken = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc123"
    broken.mkdir(parents=True)
    for file in tiny_dir.iterdir():
        if file.name != "model.safetensors":
            shutil.copy2(file, broken / file.name)
    state = load_file(str(tiny_dir / "model.safetensors"))
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(broken / name), metadata={"format": "pt"})
    (broken / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in halves.items() for k in part}}))
    shard = broken / "model-00002-of-00002.safetensors"
    shard.write_bytes(b"\xff" * 8 + shard.read_bytes()[8:])  # a garbled header
    code = finetune_4bit.main(["--model", str(broken), "--output", str(tmp_path / "r"), *FAST])
    error_line(capsys, code, f"{shard} is damaged", "hf download org/name --force-download")
    shard.unlink()
    code = finetune_4bit.main(["--model", str(broken), "--output", str(tmp_path / "r"), *FAST, "--init", "loftq"])
    error_line(capsys, code, f"{shard} is missing, though model.safetensors.index.json lists it",
               "hf download org/name --force-download")
    assert not (tmp_path / "r").exists()


def poison(adapter_dir: Path, value: float = math.nan) -> str:
    """Write `value` into one tensor of an adapter folder's file (what a damaged copy or another tool may hold)."""
    from safetensors.torch import load_file, save_file

    file = adapter_dir / "adapter.safetensors"
    state = load_file(str(file))
    key = sorted(state)[1]
    state[key][0, 0] = value
    save_file(state, str(file), metadata={"format": "qmor"})
    return key


def test_an_adapter_holding_nan_is_refused_by_chat_export_and_the_app(run, tiny_dir, tmp_path, capsys, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    key = poison(copy / "adapter")
    named = f"{copy / 'adapter' / 'adapter.safetensors'} holds nan values in {key}"
    monkeypatch.setattr("builtins.input", lambda prompt="": "hello")  # chat used to fail while sampling the reply
    code = chat_cli.main(["--model", str(tiny_dir), "--adapter", str(copy), "--device", "cpu"])
    error_line(capsys, code, named, "a checkpoint of its run")
    out = tmp_path / "merged"
    code = export_fp16.main([str(copy), "--output", str(out), "--device", "cpu"])
    line = error_line(capsys, code, named)
    assert "base checkpoint" not in line and not out.exists()
    pytest.importorskip("gradio")
    from apps import chat_tab
    from qmor.model.base import Base

    with pytest.raises(QmorError, match=f"holds nan values in {key}"):
        chat_tab.LoadedChat().load(Base.resolve(str(tiny_dir)), str(copy))  # what the Chat tab's Load runs
    key = poison(copy / "adapter", math.inf)
    with pytest.raises(QmorError, match=f"holds inf values in {key}"):
        chat_tab.LoadedChat().load(Base.resolve(str(tiny_dir)), str(copy))


def test_resume_passes_over_a_checkpoint_holding_inf(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    key = poison(copy / "checkpoints" / "step-000003" / "adapter", math.inf)
    assert finetune_4bit.main(["--resume", "--output", str(copy), "--max-steps", "4"]) == 0  # trained further
    err = capsys.readouterr().err
    assert f"step-000003 is damaged (adapter/adapter.safetensors holds inf values in {key}); trying the one" in err
    starts = [e for e in strict_events(copy) if e["event"] == "start"]
    assert starts[-1]["step"] == 2 and starts[-1]["resumed"]
    for ckpt in RunDir(copy).checkpoint_dirs():
        poison(ckpt / "adapter")
    code = finetune_4bit.main(["--resume", "--output", str(copy), "--max-steps", "5"])
    error_line(capsys, code, "every checkpoint of", "adapter/adapter.safetensors holds nan values in")


def test_a_cut_short_adapter_file_is_one_line(run, tiny_dir, tmp_path, capsys, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cut_short(copy / "adapter" / "adapter.safetensors")
    no_input(monkeypatch)
    named = f"{copy / 'adapter' / 'adapter.safetensors'} cannot be read"
    code = chat_cli.main(["--model", str(tiny_dir), "--adapter", str(copy), "--device", "cpu"])
    error_line(capsys, code, named, "cut short or garbled", "use an intact copy")
    code = export_fp16.main([str(copy), "--output", str(tmp_path / "merged"), "--device", "cpu"])
    error_line(capsys, code, named)
    assert not (tmp_path / "merged").exists()
