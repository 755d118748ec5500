"""The `qmor` console command (installed by pip, see [project.scripts]; `python -m qmor` is the same):
`qmor train | export | chat | eval | plan | app [options]`, each a module in qmor/commands/."""

from __future__ import annotations

import difflib
import importlib
import sys

from qmor.version import __version__

COMMANDS = {  # name -> (module, one line for the overview)
    "train": ("qmor.commands.train", "fine-tune an adapter on a 4-bit base (the built-in default with no options)"),
    "export": ("qmor.commands.export", "export a trained adapter: merged fp16 model, PEFT adapter or GGUF file"),
    "chat": ("qmor.commands.chat", "chat in the terminal with a 4-bit base and an adapter"),
    "eval": ("qmor.commands.eval", "evaluate runs: loss, answers, forgetting, exports against the adapter"),
    "plan": ("qmor.commands.plan", "predict a training step's peak GPU memory: will it fit?"),
    "app": ("qmor.commands.app", "the web app: train, watch, chat, export and evaluate from the browser"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(["usage: qmor COMMAND [options]   (qmor COMMAND --help for its options)", "", "commands:", *lines])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"qmor {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        fix = f"did you mean qmor {close[0]}?" if close else f"choose one of {', '.join(COMMANDS)}"
        print(f"error: unknown command {name!r}; {fix}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest, prog=f"qmor {name}")


if __name__ == "__main__":
    sys.exit(main())
