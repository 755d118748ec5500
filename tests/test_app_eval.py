"""The Evaluate tab through the app's API (gradio_client): one run, two runs compared, Stop, and refusals."""

import time

import pytest
from test_app_api import AppServer
from test_eval import run

pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_dir):
    ws = tmp_path_factory.mktemp("app-eval") / "ws"
    server = AppServer(ws)
    run(ws / "runs" / "learnt", tiny_dir, 80)
    run(ws / "runs" / "short", tiny_dir, 4)
    yield server, ws
    server.close()


def test_one_run_then_two_compared(app):
    from gradio_client import Client

    server, ws = app
    client = Client(server.url, verbose=False)
    status, bar, figures, plot, side, log = client.predict(["learnt"], "", 2, 100, 24, False, api_name="/evaluate")
    assert "evaluated learnt" in status, log
    assert "data-state='done'" in bar and "100%" in bar
    assert "### Evaluation of learnt" in figures and "| adapter | 100% | 100% |" in figures, figures
    assert plot and plot.endswith(".png")
    assert "- base:" in side and "- adapter:" in side
    assert (ws / "runs" / "learnt" / "eval.json").is_file() and "qmor eval" in log

    status, _, figures, plot, side, log = client.predict(["learnt", "short"], "", 2, 100, 24, False,
                                                         api_name="/evaluate")
    assert "evaluated learnt, short" in status, log
    rows = figures.splitlines()
    assert rows[0].startswith("| run | family |") and rows[2].startswith("| learnt |") and rows[3].startswith(
        "| short |")
    assert (ws / "evals" / "learnt-vs-short" / "eval.png").is_file()
    assert "### learnt" in side and "### short" in side

    # a refreshed page finds the last evaluation again, from the job registry and the reports on disk
    from apps.eval_tab import latest
    from apps.jobs import Jobs

    status, bar, again, plot, side_again, _ = latest(Jobs(ws.resolve()))
    assert "the last evaluation" in status and "data-state='done'" in bar
    assert again.strip() == figures.strip() and side_again.strip() == side.strip()
    assert plot.endswith("learnt-vs-short/eval.png")


def test_stop_ends_the_job(app):
    from gradio_client import Client

    server, ws = app
    client = Client(server.url, verbose=False)
    log = ws / "evals" / "learnt.log"
    log.unlink(missing_ok=True)
    job = client.submit(["learnt"], "", 40, 100, 400, True, api_name="/evaluate")  # long enough to stop midway
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (log.is_file() and "%|" in log.read_text(errors="replace")):
        time.sleep(0.5)
    assert "stopping" in client.predict(api_name="/stop_eval")
    status, bar, *_ = job.result()
    assert "stopped" in status and "data-state='stopped'" in bar, status
    assert "no evaluation is running" in client.predict(api_name="/stop_eval")


def test_refusals_come_back_as_messages(app):
    from gradio_client import Client

    server, _ = app
    client = Client(server.url, verbose=False)
    status, *_ = client.predict([], "", 2, 100, 24, False, api_name="/evaluate")
    assert "pick one or more trained runs" in status
    status, *_ = client.predict(["learnt"], "missing.jsonl", 2, 100, 24, False, api_name="/evaluate")
    assert "does not exist" in status
    status, *_ = client.predict(["../learnt"], "", 2, 100, 24, False, api_name="/evaluate")
    assert "is not valid" in status


def test_a_recorded_export_outside_a_restricted_workspace_is_refused(tmp_path):
    from apps.eval_tab import check_sources
    from apps.paths import make_workspace
    from qmor.errors import QmorError
    from qmor.training.run_dir import RunDir

    ws = make_workspace(tmp_path / "ws", restrict=True)
    run = RunDir(ws.runs / "r")
    run.path.mkdir()
    run.record_export(ws.exports / "r-fp16", "merged")
    check_sources(ws, run.path)  # inside: fine
    run.record_export(tmp_path / "elsewhere", "merged")
    with pytest.raises(QmorError, match="export of run r .*leads outside the workspace"):
        check_sources(ws, run.path)
