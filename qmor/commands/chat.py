"""Chat in the terminal with a 4-bit base model and, optionally, a trained adapter; replies stream as they come.

    qmor chat --adapter runs/NAME --temperature 0.7          # on the base the adapter records
    qmor chat --base-model meta-llama/Llama-3.1-8B-Instruct  # the base alone
    qmor chat --base-model merged/NAME --no-4bit             # a merged export, unquantised as exported

Commands: /adapter DIR (switch adapter, base stays loaded), /base (no adapter), /system TEXT, /clear, /quit.
"""

from __future__ import annotations

import argparse
import sys

from qmor import hints
from qmor.commands import USER_ERRORS, fail
from qmor.errors import QmorError

HELP = "commands: /adapter DIR, /base, /system TEXT, /clear, /quit"


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", "--model", dest="base_model", default=None,
                   help="base model folder, hub id, or built-in tiny / smollm2, loaded once in 4-bit (default: the "
                   "base the --adapter records)")
    p.add_argument("--adapter", default=None, help="run folder or adapter folder to start with")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--no-4bit", dest="quantise", action="store_false",
                   help="load --base-model unquantised (bf16 on CUDA, fp32 on CPU), as plain transformers runs it: "
                   "for a merged export, which 4-bit would quantise a second time; takes no adapter")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    p.add_argument("--allow-other-base", action="store_true",
                   help="use adapters whose recorded base fingerprint differs from --base-model")
    return p.parse_args(argv)


def pick(args: argparse.Namespace):
    """The adapter to start with (None without --adapter) and the base to load: --base-model when given, else the
    base the adapter records."""
    # loaded when the command runs, so --help and bad options answer at once
    from qmor.model.base import Base
    from qmor.training.run_dir import open_adapter

    if args.adapter and not args.quantise:
        raise QmorError("an adapter needs the 4-bit base it was trained on, and --no-4bit loads the base unquantised; "
                        "pass --no-4bit with --base-model alone (a merged export), or drop it")
    if not args.adapter and not args.base_model:
        raise QmorError("pass --adapter (a run folder: its base is the one it records) or --base-model (a model "
                        "folder, hub id, tiny or smollm2)")
    trust = args.trust_remote_code
    if not args.adapter:
        return None, Base.resolve(args.base_model, trust_remote_code=trust)
    adapter = open_adapter(args.adapter, args.base_model, trust)
    return adapter, adapter.located_base()


def command(session, line: str, state: dict) -> bool:
    """Handle a /command; False means quit."""
    name, _, arg = line.partition(" ")
    if name == "/quit":
        return False
    if name == "/adapter" and arg.strip():
        session.use_adapter(arg.strip())
        state["history"].clear()
        state["adapter"] = arg.strip()
    elif name == "/base":
        session.use_adapter(None)
        state["history"].clear()
        state["adapter"] = None
    elif name == "/system":
        state["system"] = arg.strip() or None
    elif name == "/clear":
        state["history"].clear()
    else:
        print(HELP)
        return True
    print(f"[{session.describe()}; system: {state['system']!r}]")
    return True


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    # loaded when the command runs, so --help and bad options answer at once
    from qmor.chat import ChatSession, Sampling
    from qmor.config import QuantConfig

    try:
        sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty)
        adapter, base = pick(args)
        session = ChatSession(base, device=args.device, quant=QuantConfig() if args.quantise else None,
                              allow_other_base=args.allow_other_base)
        if adapter:
            session.use_adapter(adapter)
    except USER_ERRORS as e:
        return fail(e)
    state = {"system": args.system, "history": [], "adapter": args.adapter}  # adapter: as the user named it
    print(f"[{session.describe()}] {HELP}")
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return goodbye(session, state)
        try:
            if line.startswith("/"):
                if not command(session, line, state):
                    return goodbye(session, state)
                continue
            if not line:
                continue
            state["history"].append({"role": "user", "content": line})
            reply = []
            for piece in session.stream(state["history"], system=state["system"], **vars(sampling)):
                reply.append(piece)
                print(piece, end="", flush=True)
            print()
            state["history"].append({"role": "assistant", "content": "".join(reply)})
        except QmorError as e:  # a bad path or setting: say so and keep the session
            print(f"error: {e}", file=sys.stderr)


def goodbye(session, state: dict) -> int:
    """The next step for the adapter in use, if it merges: its export."""
    from qmor.adapters import check_family  # loaded when the command runs, so --help answers at once

    if session.meta is not None and check_family(session.meta.adapter.family).merges:
        print(hints.export(state["adapter"]))
    return 0
