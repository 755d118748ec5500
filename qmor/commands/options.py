"""Rows of the flag table (qmor/flags.py) on an argparse parser, shared by `qmor train` and `qmor plan` so both
take the same names for the same things: transformers' and LLaMA-Factory's spellings as aliases, `--name_with_
underscores` as well as `--name-with-dashes`, and a one-line error for an unknown flag (naming the closest one) or
an option given twice under two names."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable

from qmor.errors import QmorError
from qmor.flags import Flag


def _remember(namespace: argparse.Namespace, dest: str, option_string: str | None, switch: bool) -> None:
    """Refuse an option given under two of its names (`--lr 1e-4 --learning-rate 2e-4`): which one was meant?"""
    name = option_string or ""
    if switch and name.startswith("--no-"):
        name = "--" + name[5:]
    used = namespace.__dict__.setdefault("_names_used", {})
    if used.setdefault(dest, name) != name:
        raise QmorError(f"{used[dest]} and {name} set the same option; give it once")


class Store(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        _remember(namespace, self.dest, option_string, switch=False)
        setattr(namespace, self.dest, values)


class Switch(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None):
        _remember(namespace, self.dest, option_string, switch=True)
        super().__call__(parser, namespace, values, option_string)


def add_flags(p: argparse.ArgumentParser, flags: Iterable[Flag], defaults: dict | None = None) -> None:
    """One argument per row under its name and aliases. Defaults are suppressed: only the flags given are in the
    result, so they override a config file. The help shows the default, or the command's own from `defaults`."""
    defaults = defaults or {}
    for flag in flags:
        default = str(defaults[flag.key]) if flag.key in defaults else flag.shown_default
        shown = f" (default: {default})" if default else ""
        kind = {"action": Switch} if flag.switch else {"action": Store, "type": flag.kind}
        p.add_argument(flag.name, *flag.aliases, dest=flag.key, default=argparse.SUPPRESS,
                       help=flag.help_text() + shown, **kind)


def parse(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse with `--a_b` read as `--a-b` (transformers' parser takes both); an unknown flag is a QmorError naming
    the closest known one. The names used are dropped from the result."""
    argv = [_dashes(a) for a in argv]
    args, rest = p.parse_known_args(argv)
    if rest:
        known = [s for a in p._actions for s in a.option_strings]
        close = difflib.get_close_matches(rest[0].split("=")[0], known, n=1)
        fix = f"did you mean {close[0]}?" if close else f"see {p.prog} --help"
        raise QmorError(f"unknown argument {rest[0]}; {fix}")
    vars(args).pop("_names_used", None)
    return args


def _dashes(arg: str) -> str:
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    return name.replace("_", "-") + eq + value
