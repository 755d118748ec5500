"""The app's safety rules and job manager, without a browser: paths confined to the workspace, no exposed app
without a password, the CLI line the form builds, and stopping a job's whole process group."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apps import command, jobs, progress
from apps.paths import check_launch, dataset_arg, make_workspace, model_arg, run_dir, user_path
from qmor.errors import QmorError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ws(tmp_path):
    return make_workspace(tmp_path / "ws", restrict=True)


def test_path_outside_workspace_is_refused(ws, tmp_path):
    outside = tmp_path / "secret.jsonl"
    outside.write_text('{"text": "x"}\n')
    with pytest.raises(QmorError, match="outside the workspace"):
        user_path(ws, str(outside))
    with pytest.raises(QmorError, match="outside the workspace"):
        user_path(ws, "../secret.jsonl")  # relative paths are relative to the workspace, and may not climb out
    with pytest.raises(QmorError, match="outside the workspace"):
        dataset_arg(ws, str(outside))
    (ws.root / "link").symlink_to(outside)
    with pytest.raises(QmorError, match="outside the workspace"):
        user_path(ws, "link")  # a symlink pointing out is resolved first
    inside = ws.data / "ok.jsonl"
    inside.write_text('{"text": "x"}\n')
    assert dataset_arg(ws, "data/ok.jsonl") == str(inside)


def test_hub_dataset_ids_pass_and_mistyped_paths_do_not(ws):
    assert dataset_arg(ws, "openai/gsm8k") == "openai/gsm8k"  # read from the Hugging Face cache, as the CLI does
    with pytest.raises(QmorError, match="does not exist; upload a file, enter a path or a Hub dataset id"):
        dataset_arg(ws, "data/missing.jsonl")  # shaped like org/name, but a file name
    assert dataset_arg(ws, "org/..") == str(ws.root.resolve())  # a path (the workspace), never passed on as an id
    (ws.root / "org" / "name").mkdir(parents=True)
    assert dataset_arg(ws, "org/name") == str(ws.root / "org" / "name")  # a folder in the workspace comes first


def test_unrestricted_workspace_allows_outside_paths(tmp_path):
    ws = make_workspace(tmp_path / "ws", restrict=False)
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "x"}\n')
    assert dataset_arg(ws, str(f)) == str(f.resolve())


def test_model_and_run_names(ws, tmp_path):
    assert model_arg(ws, "tiny") == "tiny"
    assert model_arg(ws, "Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    with pytest.raises(QmorError, match="outside the workspace"):
        model_arg(ws, str(tmp_path))
    with pytest.raises(QmorError, match="not valid"):
        run_dir(ws, "../escape")
    with pytest.raises(QmorError, match="not valid"):
        run_dir(ws, "a/b")
    assert run_dir(ws, "my-run.1") == ws.runs / "my-run.1"


def fake_run(folder: Path, base_model: str, base_weights: str | None = None) -> Path:
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"adapter": {"family": "lora"}, "base_model": base_model, "base_weights": base_weights}))
    return folder


def test_run_links_and_run_sources_stay_in_the_workspace(ws, tmp_path):
    from apps.paths import check_run_sources
    from apps.ui import trained_runs

    model = ws.root / "models" / "base"
    model.mkdir(parents=True)
    fake_run(ws.runs / "good", str(model), str(ws.root / "qmor-cache" / "loftq-1"))
    (ws.runs / "escape").symlink_to(fake_run(tmp_path / "elsewhere", str(model)))
    assert trained_runs(ws) == ["good"]  # the link out is not listed
    with pytest.raises(QmorError, match="run .* leads outside the workspace"):
        run_dir(ws, "escape")  # nor exported from, nor chatted with, when its name is typed in
    check_run_sources(ws, run_dir(ws, "good"))
    fake_run(ws.runs / "outside-base", str(tmp_path / "secret-model"))
    with pytest.raises(QmorError, match="base model of run outside-base .* leads outside the workspace"):
        check_run_sources(ws, run_dir(ws, "outside-base"))
    fake_run(ws.runs / "outside-weights", str(model), str(tmp_path / "cache" / "loftq"))
    with pytest.raises(QmorError, match="LoftQ base weights of run outside-weights"):
        check_run_sources(ws, run_dir(ws, "outside-weights"))
    fake_run(ws.runs / "hub", "Qwen/Qwen2.5-0.5B")
    check_run_sources(ws, run_dir(ws, "hub"))  # a hub id is no path
    loose = make_workspace(ws.root, restrict=False)  # on loopback without --restrict-paths: the user's own files
    assert sorted(trained_runs(loose)) == ["escape", "good", "hub", "outside-base", "outside-weights"]
    check_run_sources(loose, run_dir(loose, "outside-base"))


def test_exposed_app_needs_a_password():
    check_launch("127.0.0.1", False, None)
    with pytest.raises(QmorError, match="password"):
        check_launch("0.0.0.0", False, None)
    with pytest.raises(QmorError, match="password"):
        check_launch("127.0.0.1", True, None)
    check_launch("0.0.0.0", False, "pw")


def test_app_refuses_to_start_exposed_without_password(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "QMOR_APP_PASSWORD"}
    r = subprocess.run([sys.executable, str(ROOT / "apps" / "app.py"), "--host", "0.0.0.0", "--workspace",
                        str(tmp_path / "ws")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "password" in lines[0], r.stderr


def test_command_has_only_the_family_own_flags(ws):
    base = {"model": "tiny", "dataset": "uuid", "run_name": "r1", "rank": 8.0, "alpha": 16.0, "experts": 4,
            "top_k": 2, "mora_kind": "rope", "init": "default", "loftq_iters": 2, "max_steps": 0, "lr": 1e-3,
            "gradient_checkpointing": False, "packing": True}
    mora = command.train_args(ws, {**base, "family": "mora"})
    assert "--mora-kind" in mora and "--alpha" not in mora and "--experts" not in mora
    assert mora[mora.index("--rank") + 1] == "8" and "--loftq-iters" not in mora
    assert mora[mora.index("--max-steps") + 1] == "0"  # 0 means "by epochs" to the script, so it must be passed
    assert "--no-gradient-checkpointing" in mora and "--packing" in mora
    assert mora[mora.index("--output") + 1] == str(ws.runs / "r1")
    sira = command.train_args(ws, {**base, "family": "sira", "init": "loftq"})
    assert "--top-k" in sira and "--experts" in sira and "--mora-kind" not in sira and "--loftq-iters" in sira
    hub = command.train_args(ws, {**base, "family": "lora", "dataset": "openai/gsm8k", "split": "train[:100]",
                                  "subset": "main", "columns": "prompt=question,completion=answer"})
    assert hub[hub.index("--dataset") + 1] == "openai/gsm8k" and hub[hub.index("--subset") + 1] == "main"
    assert hub[hub.index("--split") + 1] == "train[:100]"
    assert hub[hub.index("--columns") + 1] == "prompt=question,completion=answer"
    assert "--subset" not in command.train_args(ws, {**base, "family": "lora", "subset": ""})
    line = command.shown(command.train_command(mora))
    assert line.startswith("qmor train --model tiny --dataset uuid")  # the command as a user types it


def test_progress_summary_follows_events():
    events = [{"event": "start", "total_steps": 10},
              {"event": "train", "step": 4, "loss": 2.0, "tokens_per_s": 100.0, "eta_s": 65},
              {"event": "eval", "step": 4, "eval_loss": 2.5}]
    s = progress.summary(events)
    assert (s["state"], s["step"], s["percent"], s["eta"]) == ("running", 4, 40.0, "0:01:05")
    frame = progress.loss_frame(events)
    assert list(frame["series"]) == ["train", "eval"]
    stopped = [*events, {"event": "stopped", "step": 4, "checkpoint": "ckpt"}]
    assert progress.summary(stopped)["state"] == "stopped"
    resumed = [*stopped, {"event": "start", "total_steps": 10}]  # a resumed run is running again
    assert progress.summary(resumed)["state"] == "running"


def test_stop_signals_the_whole_group_and_registry_survives(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    # a job that spawns a grandchild, and on SIGINT writes a marker and exits like the trainer does
    script = tmp_path / "job.py"
    script.write_text(
        "import signal, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        f"open({str(tmp_path / 'child.pid')!r}, 'w').write(str(child.pid))\n"
        "def stop(*a):\n"
        f"    open({str(tmp_path / 'stopped')!r}, 'w').write('ok'); sys.exit(0)\n"
        "signal.signal(signal.SIGINT, stop)\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(0.1)\n")
    log = tmp_path / "run" / "train.log"
    registry = jobs.Jobs(root)
    job = registry.start("train", [sys.executable, str(script)], log, tmp_path / "run")
    deadline = time.monotonic() + 60
    while "ready" not in jobs.tail(log) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert registry.running("train")["pid"] == job["pid"]  # what a refreshed page finds
    assert registry.stop(job, wait_s=30)
    assert (tmp_path / "stopped").read_text() == "ok"
    child = int((tmp_path / "child.pid").read_text())
    def gone() -> bool:  # exited (or a zombie waiting for its parent); the entry can vanish while it is read
        try:
            return ") Z " in Path(f"/proc/{child}/stat").read_text()
        except FileNotFoundError:
            return True

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not gone():
        time.sleep(0.1)
    assert gone()
    assert registry.running("train") is None
    assert registry.latest("train")["exit_code"] == 0


def test_a_confined_workspace_keeps_every_cache_inside_it(tmp_path, monkeypatch):
    from apps.app import job_env
    from qmor.model.base import Base

    monkeypatch.setenv("QMOR_CACHE", str(tmp_path / "outside"))
    ws = make_workspace(tmp_path / "ws", restrict=True)
    assert Path(Base.resolve("tiny", cache=ws.cache).path).parent == ws.root / "qmor-cache"  # the chat tab's base
    registry = jobs.Jobs(ws.root, job_env(ws))
    log = ws.root / "env.log"
    job = registry.start("eval", [sys.executable, "-c", "import os; print(os.environ['QMOR_CACHE'], "
                                  "os.environ['HF_HOME'])"], log, ws.runs)
    deadline = time.monotonic() + 60
    while registry.alive(job) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert jobs.tail(log).splitlines()[-1] == f"{ws.root / 'qmor-cache'} {ws.root / 'hf-cache'}"
    assert os.environ["QMOR_CACHE"] == str(tmp_path / "outside")  # the app's own environment is left as it was
    assert job_env(make_workspace(tmp_path / "open", restrict=False)) == {"PYTHONUNBUFFERED": "1"}


def test_runlog_opens_the_log_once_the_command_made_the_run_folder(tmp_path, monkeypatch):
    # the forwarder a training job runs under: the trainer refuses an output folder holding files, so the log may
    # only appear once the trainer has made the folder, with what it printed before that first
    sys.path.insert(0, str(Path(command.__file__).parent))
    import runlog

    monkeypatch.setattr(runlog.signal, "signal", lambda *args: None)  # the stop signals stay this test's own
    run = tmp_path / "run"
    trainer = ("import os, sys; print('before', flush=True); os.makedirs(sys.argv[1]); "
               "open(os.path.join(sys.argv[1], 'config.json'), 'w').close(); print('after'); sys.exit(3)")
    code = runlog.main([str(run / "train.log"), str(run), "qmor train", "--", sys.executable, "-c", trainer, str(run)])
    assert code == 3  # the trainer's own exit code
    assert (run / "train.log").read_text().splitlines() == ["$ qmor train", "before", "after"]
