"""Every `qmor ...` and `python scripts/...` command in README.md and docs/*.md, parsed by the real parser of that
command, so the docs cannot drift from the flags.

Where commands are found: in fenced and indented code blocks, read as the shell reads them (a trailing backslash
continues a line; `&&` / `;` / `|` chains; `VAR=value` prefixes; `NAME="..."` assignments expanded where `$NAME`
is used later in the block; `# comments` dropped, but read as prose), and in inline code spans and comments. A
command is a shell command that starts with `qmor NAME`, a script's path (in prose, with arguments), or a launcher
(`python`, `python3`, `accelerate launch`, `torchrun`, their own options skipped) running `-m qmor NAME` or a file
under scripts/ or apps/; in prose it may also end a quoted message (`continue with: qmor train ...`).

How they are parsed: `qmor NAME` through qmor/cli.py's command table, a script through its own main() with
sys.argv set, exactly as the shell would call them, except that the first argparse parse raises with its result,
so nothing after it runs. Placeholders stand for values: `<...>`, an unset `$VAR`, a word in CAPITALS (N, NAME,
RUN) and `...` after an option become a value the option's type and choices accept; a `...` elsewhere stands for
more options and is dropped. Prose may quote part of a command (`qmor chat --adapter`, `qmor export`): there a
missing required argument or last value is not an error, while an unknown flag, a bad choice or a bad value are.

Refusals: a table row whose other cell quotes `error: --FLAG ...` documents that qmor refuses that flag; a command
in it that gives --FLAG must still be refused, by its parser or by the command before it parses (as `qmor plan`
names the new name of an old one). Any other command in such a row must parse: its error comes at run time.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib.util
import inspect
import io
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qmor import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LAUNCHERS = {"python", "python3", "accelerate", "torchrun"}
SCRIPT_DIRS = ("scripts/", "apps/")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
CAPITALS = re.compile(r"^[A-Z][A-Z0-9_]*$")  # N, NAME, RUN: a value the reader fills in
MORE = "..."  # more options, or a value left out
COMMENT = re.compile(r"(?:^|\s)#\s*(.+)$")
ERROR_CELL = re.compile(r"`error: (--[a-z][a-z0-9-]*)")


@dataclass
class Snippet:
    """Text that may hold commands: one logical line of a code block or one inline code span."""
    page: Path
    line: int
    text: str
    fragment: bool  # an inline span: it may name a command and some flags rather than a whole command line
    refused: str | None = None  # the flag a table row says is refused (`error: --seq is now ...`)
    block: dict = field(default_factory=dict)  # shell variables assigned earlier in the same code block


@dataclass
class DocCommand:
    page: Path
    line: int
    text: str  # the command as written (after joining continued lines)
    target: str  # a qmor command name, or a script path relative to the repository
    argv: list[str]
    fragment: bool
    refused: str | None

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}: {self.text}"


# ---- finding the snippets ------------------------------------------------------------------------------------------


def snippets(page: Path) -> list[Snippet]:
    found = []
    for kind, start, lines in blocks(page.read_text().splitlines()):
        if kind in ("fenced", "indented"):
            found += code_snippets(page, start, lines)
        elif kind in ("paragraph", "row"):
            found += spans(page, start, lines)
    return found


def blocks(lines: list[str]) -> list[tuple[str, int, list[str]]]:
    """The page cut into code blocks, paragraphs, table rows and blank lines: (kind, first line number, lines)."""
    found, fence = [("blank", 0, [])], None
    for number, line in enumerate(lines, 1):
        marker = FENCE.match(line)
        if fence is None and marker:
            fence = marker.group(1)
            found.append(("fenced", number + 1, []))
            continue
        if fence is not None:
            if marker and marker.group(1).startswith(fence):
                fence = None
            else:
                found[-1][2].append(line)
            continue
        kind = prose_kind(line, found[-1][0])
        if kind == found[-1][0] and kind in ("paragraph", "indented"):
            found[-1][2].append(line)
        else:
            found.append((kind, number, [line]))
    return found


def prose_kind(line: str, previous: str) -> str:
    if not line.strip():
        return "blank"
    if line.lstrip().startswith("|"):  # a table row is a paragraph of its own
        return "row"
    # Markdown's indented code: four spaces after a blank line; after text they continue a list item's paragraph
    if line.startswith("    ") and previous in ("blank", "indented"):
        return "indented"
    return "paragraph"


def code_snippets(page: Path, start: int, lines: list[str]) -> list[Snippet]:
    """One snippet per logical line of a code block (a trailing backslash continues a line), and one for the text
    of each comment, which may quote a command: `# a recipe: qmor train --config recipe.yaml`."""
    found, variables, joined, first = [], {}, "", None
    for number, line in enumerate(lines, start):
        first = first or number
        text = joined + line.strip()
        if text.endswith("\\"):
            joined = text[:-1].rstrip() + " "
            continue
        found.append(Snippet(page, first, text, fragment=False, block=variables))
        comment = COMMENT.search(text)
        if comment:
            found.append(Snippet(page, first, comment.group(1), fragment=True))
        joined, first = "", None
    return found


def spans(page: Path, start: int, lines: list[str]) -> list[Snippet]:
    """The inline code spans of a paragraph or a table row, with the line each starts on."""
    text = "\n".join(lines)
    row = text.lstrip().startswith("|")
    if row:
        text = text.replace("\\|", "|")  # a pipe escaped for the table
    refused = ERROR_CELL.search(text) if row else None
    return [Snippet(page, start + text.count("\n", 0, m.start()), " ".join(m.group(2).split()), fragment=True,
                    refused=refused.group(1) if refused else None)
            for m in SPAN.finditer(text)]


# ---- reading the shell ---------------------------------------------------------------------------------------------


def shell_commands(snippet: Snippet) -> list[list[str]]:
    """The words of each simple command in a snippet (`a && b; c | d` is four), shell variables expanded."""
    text = re.sub(r"<[^<>\n]+>", " PLACEHOLDER ", snippet.text)
    text = re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: snippet.block.get(m.group(1), m.group(1).upper()), text)
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:  # an unbalanced quote: prose, not a command
        return []
    commands, current = [], []
    for word in words:
        if set(word) <= set(";&|"):
            commands.append(current)
            current = []
        else:
            current.append(word)
    commands.append(current)
    return [c for c in commands if c]


def doc_commands_in(snippet: Snippet) -> list[DocCommand]:
    found = []
    for words in shell_commands(snippet):
        if not snippet.fragment and all(ASSIGNMENT.match(w) for w in words):  # NAME=value: for later $NAME
            snippet.block.update(w.split("=", 1) for w in words)
            continue
        command = parse_words(words, snippet.fragment)
        if command is None and snippet.fragment:
            command = parse_words(quoted_command(words), fragment=True)
        if command is not None:
            target, argv = command
            found.append(DocCommand(snippet.page, snippet.line, snippet.text, target, argv, snippet.fragment,
                                    snippet.refused if snippet.refused in argv else None))
    return found


def quoted_command(words: list[str]) -> list[str]:
    """The command a quoted message ends with (`continue with: qmor train ...`), or []; a message that goes on in
    prose (`error: qmor runs FSDP2 only, ...`) holds no command."""
    colons = [i for i, w in enumerate(words) if w.endswith(":")]
    rest = words[colons[-1] + 1:] if colons else []
    named = rest[:1] == ["qmor"] and rest[1:2] != [] and rest[1] in cli.COMMANDS
    return rest if named or rest[:1] and rest[0] in LAUNCHERS else []


def parse_words(words: list[str], fragment: bool) -> tuple[str, list[str]] | None:
    """(`qmor` or a script's path, its arguments) when the words run qmor or a script, else None."""
    while words and ASSIGNMENT.match(words[0]):  # HF_HUB_OFFLINE=1 qmor ...
        words = words[1:]
    if not words:
        return None
    if words[0] == "qmor":
        return ("qmor", words[1:]) if words[1:2] not in ([], [MORE]) else None  # `qmor`, `qmor ...`: the tool
    if script(words[0]):  # run as a file; in prose a path alone names the file
        return (script(words[0]), words[1:]) if words[1:] or not fragment else None
    if words[0] not in LAUNCHERS:
        return None
    for i, word in enumerate(words[1:], 1):
        if word == "-m":
            return ("qmor", words[i + 2:]) if words[i + 1:i + 2] == ["qmor"] and words[i + 2:] else None
        if word.endswith(".py"):
            return (script(word), words[i + 1:]) if script(word) else None
    return None


def script(word: str) -> str | None:
    """The path of one of the project's scripts, relative to the repository, or None."""
    path = word.removeprefix("./")
    return path if path.startswith(SCRIPT_DIRS) and path.endswith(".py") else None


def doc_commands() -> list[DocCommand]:
    return [c for page in PAGES for s in snippets(page) for c in doc_commands_in(s)]


# ---- parsing them --------------------------------------------------------------------------------------------------


class Parsed(BaseException):
    """Raised by the first parse of a command's arguments, so nothing after it runs; `error` is None when they
    parse. A BaseException, so that a command's own `except Exception` lets it through."""

    def __init__(self, error: str | None):
        super().__init__(error)
        self.error = error


@dataclass
class Outcome:
    parsed: bool  # whether the command reached its parser
    error: str | None  # the parser's error, or what the command said when it stopped before parsing


def is_placeholder(word: str) -> bool:
    return word == MORE or bool(CAPITALS.match(word))


def option_action(parser: argparse.ArgumentParser, word: str) -> argparse.Action | None:
    """The option a word names, abbreviated as the parser allows it."""
    if not word.startswith("-"):
        return None
    actions = parser._option_string_actions
    if word in actions:
        return actions[word]
    prefixed = {actions[o] for o in actions if o.startswith(word)} if parser.allow_abbrev else set()
    return prefixed.pop() if len(prefixed) == 1 else None


def sample(parser: argparse.ArgumentParser, action: argparse.Action | None, word: str) -> str:
    """A value the action accepts in place of a placeholder; any other word as written."""
    if action is None or not is_placeholder(word):
        return word
    convert = parser._registry_get("type", action.type, action.type) or str
    for candidate in (word, *map(str, action.choices or ()), "1"):
        try:
            value = convert(candidate)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            continue
        if not action.choices or value in action.choices:
            return candidate
    return word


def fill(parser: argparse.ArgumentParser, argv: list[str], fragment: bool) -> list[str]:
    """The arguments with each placeholder replaced by a value its option accepts; a `...` that is not an option's
    value stands for more options and is dropped. A fragment's last option gets a value when it lacks one."""
    out, action, given = [], None, 0  # the option taking values, and how many it has
    for word in argv:
        named, eq, value = word.partition("=")
        option = option_action(parser, named)
        if option is not None:
            out.append(f"{named}={sample(parser, option, value)}" if eq else word)
            action, given = (None if eq or option.nargs == 0 else option), 0
        elif word != MORE or action is not None:
            out.append(sample(parser, action, word))
            given += 1
            if action is not None and action.nargs in (None, "?", given):
                action = None
    if fragment and action is not None and given == 0 and action.nargs not in ("?", "*"):
        out.append(sample(parser, action, "VALUE"))
    return out


def capture_parse(monkeypatch, fragment: bool) -> None:
    """Make the first parse of any argparse parser raise Parsed with its outcome."""
    real = argparse.ArgumentParser.parse_known_args

    def refuse(message: str):
        raise Parsed(message)

    def first_parse(parser, args=None, namespace=None):
        args = fill(parser, list(sys.argv[1:] if args is None else args), fragment)
        if fragment:  # a span names some flags of a command, not all it needs
            for action in parser._actions:
                action.required = False
        parser.error = refuse
        try:
            _, extra = real(parser, args, namespace)
        except SystemExit as e:  # --help, --version
            raise Parsed(f"exit status {e.code}" if e.code else None) from None
        except Exception as e:  # an action's own check, such as an option given under two of its names
            raise Parsed(str(e)) from None
        raise Parsed(unrecognized(parser, extra) if extra else None)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", first_parse)


def unrecognized(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    close = difflib.get_close_matches(extra[0].split("=")[0], parser._option_string_actions, n=1)
    return f"unrecognized arguments: {' '.join(extra)}" + (f"; did you mean {close[0]}?" if close else "")


def script_main(monkeypatch, path: Path):
    """A script's main(), loaded as the shell would run the file (its folder first on sys.path) but not run."""
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(f"doc_command_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # where its dataclasses look themselves up
    spec.loader.exec_module(module)
    return getattr(module, "main", None)


def parse_only(monkeypatch, command: DocCommand) -> Outcome:
    """Call the command as the shell would, up to its parse: qmor through its command table, a script through its
    main with sys.argv set."""
    if command.target == "qmor":
        main, argv = cli.main, command.argv
    else:
        path = ROOT / command.target
        if not path.is_file():
            return Outcome(False, f"there is no {command.target}")
        main, argv = script_main(monkeypatch, path), command.argv
        if main is None:
            return Outcome(False, f"{command.target} has no main() to read its options from")
        monkeypatch.setattr(sys, "argv", [str(path), *argv])
    capture_parse(monkeypatch, command.fragment)
    said = io.StringIO()
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        try:
            status = main(argv) if inspect.signature(main).parameters else main()
        except Parsed as p:
            return Outcome(True, p.error)
        except SystemExit as e:
            status = e.code
    return Outcome(False, said.getvalue().strip() or f"it ended with {status!r} before parsing its options")


def problem(monkeypatch, command: DocCommand) -> str | None:
    """What is wrong with a documented command, naming its page, line and text; None when nothing is."""
    outcome = parse_only(monkeypatch, command)
    if command.refused:
        if outcome.error and command.refused in outcome.error:
            return None
        return (f"{command.where()}\n  documented as refused for {command.refused}, but "
                f"{outcome.error or 'it parses'}")
    if outcome.parsed and outcome.error is None:
        return None
    return f"{command.where()}\n  {outcome.error}"


# ---- the tests -----------------------------------------------------------------------------------------------------

COMMANDS = doc_commands()


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.page.name}:{c.line}" for c in COMMANDS])
def test_every_documented_command_parses(command, monkeypatch):
    found = problem(monkeypatch, command)
    if found:
        pytest.fail(found, pytrace=False)


def test_every_qmor_command_is_documented_with_a_command_line():
    shown = {c.argv[0] for c in COMMANDS if c.target == "qmor"}
    assert set(cli.COMMANDS) <= shown


PAGE = """\
Intro with `qmor chat --adapter` and `qmor export`, and a message: `stopped; continue with: qmor train --resume
--output runs/NAME`; prose `error: qmor runs FSDP2 only` and `scripts/plan.py` alone.

```bash
COMMON="--model tiny --max-steps 3"
HF_HUB_OFFLINE=1 qmor train $COMMON --lr 1e-3 \\
    --max-len N   # a comment: qmor plan --max-len N
python3 -m venv .venv && . .venv/bin/activate && accelerate launch --num_processes 2 -m qmor train ...
torchrun --nproc_per_node 2 scripts/finetune_4bit.py --model <your model> --dataset ... | tee log
```

    python scripts/export_fp16.py runs/NAME --output merged/NAME

| input | what happens |
|---|---|
| `qmor plan --seq 4096` | `error: --seq is now --max-len` |
| `qmor chat` alone | `error: pass --adapter or --base-model` |
"""


def test_commands_are_found_as_the_shell_reads_them(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    found = [(c.line, c.target, c.argv, c.fragment, c.refused) for s in snippets(page) for c in doc_commands_in(s)]
    assert found == [
        (1, "qmor", ["chat", "--adapter"], True, None),
        (1, "qmor", ["export"], True, None),
        (1, "qmor", ["train", "--resume", "--output", "runs/NAME"], True, None),
        (6, "qmor", ["train", "--model", "tiny", "--max-steps", "3", "--lr", "1e-3", "--max-len", "N"], False, None),
        (6, "qmor", ["plan", "--max-len", "N"], True, None),
        (8, "qmor", ["train", "..."], False, None),
        (9, "scripts/finetune_4bit.py", ["--model", "PLACEHOLDER", "--dataset", "..."], False, None),
        (12, "scripts/export_fp16.py", ["runs/NAME", "--output", "merged/NAME"], False, None),
        (16, "qmor", ["plan", "--seq", "4096"], True, "--seq"),
        (17, "qmor", ["chat"], True, None),
    ]


@pytest.mark.parametrize("argv,fragment,error", [
    (["train", "--max-len", "N", "--family", "F", "--lr", "..."], False, None),  # placeholders take typed values
    (["train", "--model", "x", "..."], False, None),  # more options
    (["export", "--format"], True, None),  # a span names a flag of a command
    (["export", "runs/x", "--output", "y", "--format", "zip"], False, "invalid choice: 'zip'"),
    (["export", "runs/x"], False, "the following arguments are required: --output"),
    (["chat", "--temperature", "warm"], True, "invalid float value: 'warm'"),
    (["train", "--max-len", "N", "--sequence-length", "9"], False, "unrecognized arguments: --sequence-length 9"),
    (["train", "--lr", "1e-3", "--learning-rate", "2e-3"], False, "--lr and --learning-rate set the same option"),
    (["trian"], False, "unknown command 'trian'"),
])
def test_a_stale_command_fails_naming_its_page_line_and_text(argv, fragment, error, monkeypatch):
    command = DocCommand(PAGES[0], 7, "qmor " + " ".join(argv), "qmor", argv, fragment, None)
    found = problem(monkeypatch, command)
    if error is None:
        assert found is None
    else:
        assert found.startswith(f"README.md:7: qmor {' '.join(argv)}\n") and error in found, found


def test_a_script_is_parsed_by_its_own_parser(monkeypatch):
    command = DocCommand(PAGES[0], 3, "", "scripts/bench_train.py", ["--seqs", "N", "--bogus"], False, None)
    assert "unrecognized arguments: --bogus" in problem(monkeypatch, command)
    missing = DocCommand(PAGES[0], 3, "", "scripts/nothing_here.py", [], False, None)
    assert "there is no scripts/nothing_here.py" in problem(monkeypatch, missing)


def test_a_documented_refusal_must_still_be_refused(monkeypatch):
    refused = DocCommand(PAGES[0], 5, "qmor plan --seq 4096", "qmor", ["plan", "--seq", "4096"], True, "--seq")
    assert problem(monkeypatch, refused) is None
    accepted = DocCommand(PAGES[0], 5, "qmor plan --max-len 4096", "qmor", ["plan", "--max-len", "4096"], True,
                          "--max-len")
    assert "documented as refused for --max-len, but it parses" in problem(monkeypatch, accepted)
