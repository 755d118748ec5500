"""Chat tab: one base model loaded in the app process; adapters switch on it without reloading the base.

"Compare with base" sends the same conversation through the adapter and then through the bare base, so the
effect of training shows side by side. The loaded model and its lock live in one `LoadedChat` that the tab's
handlers share.
"""

from __future__ import annotations

import gc
import threading
import time

import gradio as gr
import torch

from apps.command import short_path
from apps.paths import Workspace, adapter_config, check_run_sources, model_arg, run_dir
from apps.ui import error_md, ok_md, trained_runs
from qmor.config import QuantConfig
from qmor.errors import QmorError
from qmor.model.base import Base
from qmor.model.files import builtin_name
from qmor.training.run_dir import RunDir

NONE = "(none: base only)"


class LoadedChat:
    """The chat tab's model: one base loaded in the app process, the adapter active on it, and the lock that
    serialises loading and generation (there is one model and one GPU). The tab's handlers share one."""

    def __init__(self):
        self.lock = threading.Lock()
        self.session = None  # qmor.chat.ChatSession, once loaded
        self.base: Base | None = None  # the base it was loaded from
        self.quantised = True  # in 4-bit; False: unquantised (a merged export), which takes no adapter
        self.adapter: str | None = None  # the adapter folder active on it (None: the base alone)

    def load(self, base: Base, adapter: str | None, quantised: bool = True) -> str:
        """Load `base` (in 4-bit, or unquantised) unless it is loaded so already (the app's own: a built-in is built
        in the workspace's cache when paths are confined), then switch to `adapter`; returns what was done, in
        words. Call with the lock held."""
        from qmor.chat import ChatSession  # torch and transformers load when a chat starts, not with the app

        t0 = time.perf_counter()
        if self.session is None or self.base != base or self.quantised != quantised:
            self.unload()
            self.session = ChatSession(base, quant=QuantConfig() if quantised else None)
            self.base, self.adapter, self.quantised = base, None, quantised
            what = f"loaded {base.name}" + ("" if quantised else " unquantised")
        else:
            what = f"kept {base.name} loaded"
        if adapter != self.adapter:
            self.session.use_adapter(adapter)
            self.adapter = adapter
        return f"{what}; adapter {adapter or 'none'} ({time.perf_counter() - t0:.1f} s)"

    def unload(self) -> None:
        """Drop the model and give its memory back. Call with the lock held."""
        self.session, self.base, self.adapter = None, None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def replies(self, text: str, turns: list[tuple[list[dict], str | None]], **sampling):
        """Add the user's `text` to each (history, adapter), then stream a reply into each in turn with its adapter
        active, yielding after every piece; the chosen adapter is active again afterwards."""
        if self.session is None:
            raise QmorError("no model is loaded; pick a run (or none) and press Load")
        for history, _ in turns:
            history.append({"role": "user", "content": text})
        with self.lock:
            chosen = self.adapter
            try:
                for history, adapter in turns:
                    self.session.use_adapter(adapter)
                    history.append({"role": "assistant", "content": ""})
                    for piece in self.session.stream(history[:-1], **sampling):
                        history[-1] = {"role": "assistant", "content": history[-1]["content"] + piece}
                        yield
            finally:
                self.session.use_adapter(chosen)


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
    ui = _layout(ws)
    _wire(ws, ui, LoadedChat())
    return {"runs": ui["run"], "refresh": lambda: gr.update(choices=[NONE, *trained_runs(ws)])}


def _layout(ws: Workspace) -> dict:
    """The tab's components, by name."""
    with gr.Row():
        run = gr.Dropdown([NONE, *trained_runs(ws)], value=NONE, label="Trained run (adapter)", scale=2,
                          allow_custom_value=True)
        base = gr.Textbox("tiny", label="Base model (filled in from the run)", scale=3)
        with gr.Column(scale=1, min_width=160):
            trust = gr.Checkbox(False, label="Trust remote code")
            # a merged export in 4-bit is quantised a second time, away from the adapter it came from
            unquantised = gr.Checkbox(False, label="Unquantised (a merged export; no adapter)")
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
    return dict(run=run, base=base, trust=trust, unquantised=unquantised, refresh_btn=refresh_btn, load_btn=load_btn,
                unload_btn=unload_btn, status=status, system=system, temperature=temperature, top_p=top_p, top_k=top_k,
                max_new=max_new, rep=rep, compare=compare, bot=bot, bot_base=bot_base, msg=msg, send_btn=send_btn,
                clear_btn=clear_btn)


def _wire(ws: Workspace, ui: dict, loaded: LoadedChat) -> None:
    """The handlers, each given the tab's one LoadedChat."""

    def pick_run(name):
        if not name or name == NONE:
            return gr.update()
        try:
            meta = adapter_config(run_dir(ws, name))
        except QmorError:  # a run that leads out of the workspace: Load says so
            return gr.update()
        base = meta.get("base_model") or "tiny"
        return gr.update(value=builtin_name(base, ws.cache) or short_path(base))

    def load(name, base_text, trust_rc, unquantised=False):
        try:
            adapter = None
            if name and name != NONE:
                run = run_dir(ws, name)
                check_run_sources(ws, run)
                adapter = str(RunDir(run).adapter)
            with loaded.lock:
                base = Base.resolve(model_arg(ws, base_text), trust_remote_code=bool(trust_rc), cache=ws.cache)
                return ok_md(loaded.load(base, adapter, quantised=not unquantised))
        except Exception as e:  # shown in the tab, not raised into gradio's generic error
            return error_md(e)

    def unload():
        with loaded.lock:
            loaded.unload()
        return ok_md("unloaded")

    def chat(text, history, history_base, cmp, sys_prompt, temp, tp, tk, mx, rp):
        history, history_base = _plain(history), _plain(history_base)
        text = (text or "").strip()
        if not text:
            yield history, history_base, "", gr.update()
            return
        try:
            turns = [(history, loaded.adapter)] + ([(history_base, None)] if cmp else [])
            for _ in loaded.replies(text, turns, system=sys_prompt or None, temperature=float(temp), top_p=float(tp),
                                    top_k=int(tk), max_new_tokens=int(mx), repetition_penalty=float(rp)):
                yield history, history_base, "", gr.update()
            yield history, history_base, "", ok_md("reply complete")
        except Exception as e:  # shown in the tab, not raised into gradio's generic error
            yield history, history_base, "", error_md(e)

    run, base, status, bot, bot_base = ui["run"], ui["base"], ui["status"], ui["bot"], ui["bot_base"]
    ui["refresh_btn"].click(lambda: gr.update(choices=[NONE, *trained_runs(ws)]), None, run, api_name="chat_runs")
    run.change(pick_run, run, base, api_visibility="private")
    ui["load_btn"].click(load, [run, base, ui["trust"], ui["unquantised"]], status, api_name="chat_load")
    ui["unload_btn"].click(unload, None, status, api_name="chat_unload")
    ui["compare"].change(lambda c: gr.update(visible=bool(c)), ui["compare"], bot_base, api_visibility="private")
    chat_in = [ui[k] for k in ("msg", "bot", "bot_base", "compare", "system", "temperature", "top_p", "top_k",
                               "max_new", "rep")]
    chat_out = [bot, bot_base, ui["msg"], status]
    ui["msg"].submit(chat, chat_in, chat_out, api_name="chat")
    ui["send_btn"].click(chat, chat_in, chat_out, api_name=False)
    ui["clear_btn"].click(lambda: ([], []), None, [bot, bot_base], api_name=False)
