"""The app end to end through its API (gradio_client): train a tiny model, chat with the run, export it (merged,
GGUF and PEFT)."""

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from spm_model import CHATML, make_spm_llama

pytest.importorskip("gradio_client")

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """`python apps/app.py` in a subprocess on a free port; stopped (with its jobs) by SIGTERM."""

    def __init__(self, workspace: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = workspace.parent / f"app-{self.port}.log"
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "apps" / "app.py"), "--port", str(self.port),
                                      "--workspace", str(workspace), *extra],
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the app exited: {self.log.read_text()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"the app did not start: {self.log.read_text()}")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def train_values(**over) -> list:
    """The train form's values in endpoint order: the defaults with a few overridden for a quick run."""
    from apps.train_tab import FIELDS

    unknown = set(over) - set(FIELDS)
    assert not unknown, unknown
    return list({**FIELDS, **over}.values())


QUICK = dict(init="default", max_steps=3, batch_size=4, num_examples=8, log_steps=1, save_steps=0,
             eval_generate=0, rank=4)


def wait_state(client, states: tuple[str, ...], timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        html = client.predict(api_name="/poll_training")[0]
        state = re.search(r"data-state='(\w+)'", html).group(1)
        if state in states:
            return html
        time.sleep(1.0)
    raise AssertionError(f"training never reached {states}: {client.predict(api_name='/poll_training')[2]}")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    ws = tmp_path_factory.mktemp("app") / "ws"
    server = AppServer(ws)
    yield server, ws
    server.close()


def test_train_chat_export_through_the_api(app, tiny_dir):
    from gradio_client import Client

    server, ws = app
    client = Client(server.url, verbose=False)
    # by keyword, the flags' names; the fields not given keep the form's defaults
    status, cmd = client.predict(model=str(tiny_dir), run_name="api", **QUICK, api_name="/start_training")
    assert "started api" in status, status
    assert cmd.startswith("qmor train ") and "--max-steps 3" in cmd
    # a second Start while one runs is refused with a message, not a second job
    again, _ = client.predict(*train_values(model=str(tiny_dir), run_name="api2", **QUICK),
                              api_name="/start_training")
    assert "already going" in again
    html = wait_state(client, ("done", "error"))
    assert "data-state='done'" in html, client.predict(api_name="/poll_training")[2]
    _, plot, log, *_ = client.predict(api_name="/poll_training")
    rows = plot["data"] if "data" in plot else plot["value"]["data"]
    assert len(rows) >= 3, plot  # one loss point per step
    assert (ws / "runs" / "api" / "train.log").is_file() and "step" in log
    events = [json.loads(x) for x in (ws / "runs" / "api" / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "done"

    # chat: load the run's base and adapter, then a streamed reply
    status = client.predict("api", str(tiny_dir), False, api_name="/chat_load")
    assert "adapter" in status and "error" not in status, status
    job = client.submit("hello", [], [], True, "", 0.0, 1.0, 0, 12, 1.0, api_name="/chat")
    updates = list(job)
    adapter_hist, base_hist, _, status = job.result()
    assert adapter_hist[-1]["role"] == "assistant" and base_hist[-1]["role"] == "assistant"
    assert len(updates) >= 2, "the reply should arrive in pieces"
    assert "reply complete" in status, status

    # export: merged fp16 with the verification figures (the format left out: merged, as before it was a choice)
    status, result, log = client.predict("api", "api-fp16", "fp16", False, api_name="/export")
    assert "exported" in status, log
    assert "max abs logit difference" in result and "top-1 agreement" in result
    assert (ws / "exports" / "api-fp16" / "config.json").is_file()

    # chat with the export unquantised, as exported; an adapter on an unquantised base is refused in words
    status = client.predict("(none: base only)", str(ws / "exports" / "api-fp16"), False, True, api_name="/chat_load")
    assert "api-fp16 unquantised; adapter none" in status, status
    *_, status = client.predict("hello", [], [], False, "", 0.0, 1.0, 0, 8, 1.0, api_name="/chat")
    assert "reply complete" in status, status
    status = client.predict("api", str(tiny_dir), False, True, api_name="/chat_load")
    assert "needs the 4-bit base" in status, status


def saved_run(ws: Path, name: str, base: Path, family: str) -> None:
    """runs/NAME/adapter as training leaves it, with B moved off zero so the export has something to merge."""
    import torch

    from qmor import AdapterConfig, save_adapter
    from qmor.adapters.attach import AdapterMeta, attach
    from qmor.model.load import load_4bit

    model = load_4bit(str(base))
    cfg = AdapterConfig(family=family, r=4, alpha=8.0)
    attach(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    save_adapter(model, ws / "runs" / name / "adapter", AdapterMeta(adapter=cfg, base_model=str(base),
                                                                   chat_template=CHATML))


def test_gguf_and_peft_exports_through_the_api(app, tmp_path):
    """The Export tab's other formats: the same export command as the CLI, each output read back and checked.
    A SentencePiece base, because llama.cpp's converter only takes tokenizers it knows."""
    from gradio_client import Client

    server, ws = app
    client = Client(server.url, verbose=False)
    base = make_spm_llama(tmp_path / "spm-llama")
    saved_run(ws, "spm", base, "lora")
    saved_run(ws, "spm-mora", base, "mora")

    # GGUF with its Modelfile, named after its type when no name is given
    status, result, log = client.predict("spm", "", "fp16", False, "gguf", "q8_0", api_name="/export")
    assert "exported" in status, log
    assert "top-1 agreement" in result and "spm-q8_0" in result and "--gguf-type q8_0" in log
    assert len(list((ws / "exports" / "spm-q8_0").glob("*.gguf"))) == 1
    assert (ws / "exports" / "spm-q8_0" / "Modelfile").is_file()
    # PEFT: the adapter in PEFT's layout beside its dequantised base, checked through peft
    status, result, log = client.predict("spm", "", "bf16", False, "peft", "q8_0", api_name="/export")
    assert "exported" in status, log
    assert "top-1 agreement" in result and "--format peft --dtype bf16" in log
    assert (ws / "exports" / "spm-peft" / "adapter_config.json").is_file()
    # PEFT cannot hold MoRA: refused before any subprocess, with what to do instead
    status, _, _ = client.predict("spm-mora", "", "fp16", False, "peft", "q8_0", api_name="/export")
    assert "cannot hold it exactly; choose the merged model or GGUF format instead" in status
    assert not (ws / "exports" / "spm-mora-peft").exists()


def test_errors_come_back_as_messages(app, tmp_path):
    from gradio_client import Client

    server, ws = app
    client = Client(server.url, verbose=False)
    from apps.train_tab import FIELDS

    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/start_training"]
    assert [p["parameter_name"] for p in api["parameters"]] == list(FIELDS)  # not param_0, param_1, ...
    taken = ws / "runs" / "taken" / "checkpoints" / "step-000001"
    taken.mkdir(parents=True)
    (taken / "state.json").write_text("{}")
    status, _ = client.predict(*train_values(run_name="taken"), api_name="/start_training")
    assert "exists already; choose another name, or Resume it" in status
    status, _ = client.predict(*train_values(dataset="missing.jsonl", run_name="bad"), api_name="/start_training")
    assert "does not exist" in status
    status, _ = client.predict(*train_values(run_name="../up"), api_name="/start_training")
    assert "not valid" in status
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\nnot json\n')
    md, _ = client.predict(str(bad), "auto", api_name="/preview_data")
    assert "bad.jsonl" in md and "qmor-error" in md
    # a dataset with its own column names: previewed under qmor's names, one slice of its split
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(8)))
    md, frame = client.predict(str(qa), "auto", "train[:3]", "", "prompt=question,completion=answer",
                               api_name="/preview_data")
    assert "format: prompt_completion · showing 3 rows" in md, md
    prompt = frame["headers"].index("prompt")
    assert "completion" in frame["headers"] and [r[prompt] for r in frame["data"]] == ["q0", "q1", "q2"]
    md, _ = client.predict(str(qa), "auto", api_name="/preview_data")  # unmapped: no format fits its columns
    assert "qmor-error" in md
    status, _, _ = client.predict("", "", "fp16", False, api_name="/export")
    assert "pick a trained run" in status
    assert "unloaded" in client.predict(api_name="/chat_unload")
    _, _, _, status = client.predict("hi", [], [], False, "", 0.0, 1.0, 0, 8, 1.0, api_name="/chat")
    assert "no model is loaded" in status
    assert "neither a hub id" in client.predict("(none: base only)", "/nonexistent/model", False,
                                                api_name="/chat_load")
