"""Chat tab: one base model loaded in the app process; adapters switch on it without reloading the base.

"Compare with base" sends the same conversation through the adapter and then through the bare base, so the
effect of training shows side by side. One lock serialises generation: there is one model and one GPU.
"""

from __future__ import annotations

import gc
import threading
import time

import gradio as gr

from apps.command import short_path
from apps.paths import Workspace, check_run_sources, model_arg, run_dir
from apps.ui import adapter_config, error_md, ok_md, trained_runs
from qmor.errors import QmorError
from qmor.model.files import builtin_name
from qmor.training.run_dir import RunDir

NONE = "(none: base only)"
_LOCK = threading.Lock()
_STATE: dict = {"session": None, "base": None, "adapter": None}


def _load(base: str, adapter: str | None, trust_remote_code: bool) -> str:
    from qmor.chat import ChatSession

    t0 = time.perf_counter()
    if _STATE["session"] is None or _STATE["base"] != base:
        _unload()
        # a built-in name (tiny, smollm2) becomes its cached folder inside ChatSession, as in the training script
        _STATE["session"] = ChatSession(base, trust_remote_code=trust_remote_code)
        _STATE["base"] = base
        what = f"loaded {base}"
    else:
        what = f"kept {base} loaded"
    if adapter != _STATE["adapter"]:
        _STATE["session"].use_adapter(adapter)
        _STATE["adapter"] = adapter
    return f"{what}; adapter {adapter or 'none'} ({time.perf_counter() - t0:.1f} s)"


def _unload() -> None:
    _STATE.update(session=None, base=None, adapter=None)
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def _plain(history) -> list[dict]:
    """Chatbot messages arrive with content as a list of typed parts; the model wants role + text."""
    out = []
    for m in history or []:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        out.append({"role": m.get("role", "user"), "content": str(content or "")})
    return out


def build(ws: Workspace) -> dict:
    with gr.Row():
        run = gr.Dropdown([NONE, *trained_runs(ws)], value=NONE, label="Trained run (adapter)", scale=2,
                          allow_custom_value=True)
        base = gr.Textbox("tiny", label="Base model (filled in from the run)", scale=3)
        trust = gr.Checkbox(False, label="Trust remote code", scale=1)
    with gr.Row():
        refresh_btn = gr.Button("Refresh runs", size="sm")
        load_btn = gr.Button("Load", variant="primary", size="sm", elem_id="chat-load")
        unload_btn = gr.Button("Unload", size="sm")
    status = gr.HTML(elem_id="chat-status")
    system = gr.Textbox("", label="System prompt", lines=1)
    with gr.Accordion("Sampling", open=False), gr.Row():
        temperature = gr.Slider(0.0, 2.0, 0.7, step=0.05, label="Temperature (0 = greedy)")
        top_p = gr.Slider(0.05, 1.0, 0.9, step=0.05, label="Top-p")
        top_k = gr.Slider(0, 200, 50, step=1, label="Top-k (0 = off)")
        max_new = gr.Slider(1, 2048, 128, step=1, label="Max new tokens")
        rep = gr.Slider(1.0, 2.0, 1.0, step=0.05, label="Repetition penalty")
    compare = gr.Checkbox(False, label="Compare with base (same prompt through the base without the adapter)")
    with gr.Row():
        bot = gr.Chatbot(label="With adapter", height=360, elem_id="chat-adapter")
        bot_base = gr.Chatbot(label="Base only", height=360, visible=False, elem_id="chat-base")
    with gr.Row():
        msg = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=5, elem_id="chat-msg")
        send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        clear_btn = gr.Button("Clear", scale=1)

    def pick_run(name):
        if not name or name == NONE:
            return gr.update()
        try:
            meta = adapter_config(run_dir(ws, name))
        except QmorError:  # a run that leads out of the workspace: Load says so
            return gr.update()
        base = meta.get("base_model") or "tiny"
        return gr.update(value=builtin_name(base) or short_path(base))

    def load(name, base_text, trust_rc):
        try:
            adapter = None
            if name and name != NONE:
                run = run_dir(ws, name)
                check_run_sources(ws, run)
                adapter = str(RunDir(run).adapter)
            with _LOCK:
                return ok_md(_load(model_arg(ws, base_text), adapter, bool(trust_rc)))
        except Exception as e:
            return error_md(e)

    def unload():
        with _LOCK:
            _unload()
        return ok_md("unloaded")

    def chat(text, history, history_base, cmp, sys_prompt, temp, tp, tk, mx, rp):
        history, history_base = _plain(history), _plain(history_base)
        text = (text or "").strip()
        if not text:
            yield history, history_base, "", gr.update()
            return
        try:
            if _STATE["session"] is None:
                raise QmorError("no model is loaded; pick a run (or none) and press Load")
            kwargs = dict(system=sys_prompt or None, temperature=float(temp), top_p=float(tp), top_k=int(tk),
                          max_new_tokens=int(mx), repetition_penalty=float(rp))
            targets = [(history, _STATE["adapter"])] + ([(history_base, None)] if cmp else [])
            for h, _ in targets:
                h.append({"role": "user", "content": text})
            with _LOCK:
                session, adapter = _STATE["session"], _STATE["adapter"]
                try:
                    for h, use in targets:
                        session.use_adapter(use)
                        h.append({"role": "assistant", "content": ""})
                        for piece in session.stream(h[:-1], **kwargs):
                            h[-1] = {"role": "assistant", "content": h[-1]["content"] + piece}
                            yield history, history_base, "", gr.update()
                finally:
                    session.use_adapter(adapter)  # leave the chosen adapter active for the next turn
            yield history, history_base, "", ok_md("reply complete")
        except Exception as e:
            yield history, history_base, "", error_md(e)

    refresh_btn.click(lambda: gr.update(choices=[NONE, *trained_runs(ws)]), None, run, api_name="chat_runs")
    run.change(pick_run, run, base, api_visibility="private")
    load_btn.click(load, [run, base, trust], status, api_name="chat_load")
    unload_btn.click(unload, None, status, api_name="chat_unload")
    compare.change(lambda c: gr.update(visible=bool(c)), compare, bot_base, api_visibility="private")
    chat_in = [msg, bot, bot_base, compare, system, temperature, top_p, top_k, max_new, rep]
    chat_out = [bot, bot_base, msg, status]
    msg.submit(chat, chat_in, chat_out, api_name="chat")
    send_btn.click(chat, chat_in, chat_out, api_name=False)
    clear_btn.click(lambda: ([], []), None, [bot, bot_base], api_name=False)
    return {"runs": run, "refresh": lambda: gr.update(choices=[NONE, *trained_runs(ws)])}
