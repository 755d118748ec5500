"""qmor's module graph can be read from the top of its files: every module imports in a fresh interpreter, the
module-level imports between qmor's and the app's modules form no cycle (imports for type hints count), every import
goes down the layers (LAYERS), and an import of a qmor module inside a function says why it is not at the top (a
comment on its line, or above the block of imports it belongs to)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qmor"
APPS = ROOT / "apps"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted([*PACKAGE.rglob("*.py"), *APPS.rglob("*.py")])}
# bottom to top: a module may import from its own layer and the ones below, never from one above. Each entry lists
# the modules of a layer by name prefix (a package's modules, or one module)
LAYERS = [
    ("errors", ("qmor.errors", "qmor.files", "qmor.version", "qmor.hints")),  # no qmor import but each other
    ("config", ("qmor.config",)),
    ("adapters", ("qmor.adapters",)),
    ("model", ("qmor.model",)),
    ("data", ("qmor.data",)),
    ("plan", ("qmor.plan",)),
    ("training", ("qmor.training",)),
    ("export", ("qmor.export",)),
    ("chat", ("qmor.chat",)),
    ("eval", ("qmor.eval",)),  # measures chat's replies and the exports
    ("commands", ("qmor.flags", "qmor.commands", "qmor.cli", "qmor.__main__", "qmor")),  # "qmor": the public API
    ("apps", ("apps", "qmor.commands.app")),  # `qmor app` starts the app
]


def layer(module: str) -> int:
    """The index in LAYERS of `module`'s layer (the longest prefix that names it)."""
    found = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
             if module == prefix or module.startswith(prefix + ".")]
    assert found, f"{module} is in no layer of LAYERS: add it"
    return max(found)[1]


def qmor_targets(node: ast.Import | ast.ImportFrom, importer: str) -> list[str]:
    """The qmor modules one import statement names (`from qmor import x` names the module qmor.x when there is
    one, else the package qmor itself)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: resolved against the importing module's package
            package = importer.split(".")
            if MODULES[importer].name != "__init__.py":
                package = package[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    found = []
    for name in names:
        while name and name not in MODULES:  # `import qmor.a.b` where b is no module: the longest module prefix
            name = name.rpartition(".")[0]
        if name:
            found.append(name)
    return found


def imports(module: str) -> tuple[set[str], list[tuple[int, list[str]]]]:
    """(qmor modules `module` imports at its top, those for type hints included; [(line, targets)] of qmor imports
    inside functions)."""
    tree = ast.parse(MODULES[module].read_text())
    top: set[str] = set()
    inner: list[tuple[int, list[str]]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            targets = qmor_targets(node, module)
            if targets and in_function:
                inner.append((node.lineno, targets))
            elif targets:
                top.update(targets)
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(tree, False)
    return top, inner


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it is cycle-free

    def walk(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := walk(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := walk(start, [start])):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_the_import_reader_sees_every_form():
    node = ast.parse("from qmor.model import load, __version__\nimport qmor.adapters.mora\nfrom . import files").body
    assert qmor_targets(node[0], "qmor.chat") == ["qmor.model.load", "qmor.model"]
    assert qmor_targets(node[1], "qmor.chat") == ["qmor.adapters.mora"]
    assert qmor_targets(node[2], "qmor.chat") == ["qmor.files"]


def test_module_level_imports_form_no_cycle():
    graph = {module: imports(module)[0] for module in MODULES}
    assert graph["qmor.model.load"] >= {"qmor.model.loftq", "qmor.model.files", "qmor.model.support"}  # real imports
    assert "qmor.adapters.config" in graph["qmor.adapters.attach"] and "apps.paths" in graph["apps.ui"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_layer_of_a_module_is_its_longest_prefix():
    assert [LAYERS[layer(m)][0] for m in ("qmor", "qmor.config", "qmor.commands.eval", "qmor.eval.runner", "apps.ui")] \
        == ["commands", "config", "commands", "eval", "apps"]


def test_every_import_goes_down_the_layers():
    upward = []
    for module in MODULES:
        top, inner = imports(module)
        for target in sorted(top | {t for _, targets in inner for t in targets}):
            if layer(target) > layer(module):
                upward.append(f"{module} ({LAYERS[layer(module)][0]}) imports {target} ({LAYERS[layer(target)][0]})")
    assert not upward, "imports from a lower layer to a higher one: " + "; ".join(upward)


def explained(lines: list[str], lineno: int) -> bool:
    """Whether the import on line `lineno` (1-based) carries a comment, or belongs to a block of imports under one."""
    above = lineno - 2
    while above >= 0 and lines[above].strip().startswith(("from ", "import ")):
        above -= 1
    return "#" in lines[lineno - 1] or (above >= 0 and lines[above].strip().startswith("#"))


def test_the_comment_rule():
    lines = ["def f():", "    # why", "    from qmor import a", "    from qmor import b", "    x = 1",
             "    from qmor import c", "    from qmor import d  # why"]
    assert [explained(lines, n) for n in (3, 4, 6, 7)] == [True, True, False, True]


def test_qmor_imports_inside_functions_say_why():
    unexplained = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for lineno, targets in imports(module)[1]:
            if not explained(lines, lineno):
                unexplained.append(f"{path.relative_to(ROOT)}:{lineno} imports {', '.join(targets)}")
    assert not unexplained, "imports inside functions without a comment saying why: " + "; ".join(unexplained)


def test_every_module_imports_in_a_fresh_interpreter():
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('ok')"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # importing __main__ runs the program; the app's modules import gradio (its own tests import them)
    modules = [m for m in MODULES if m.split(".")[0] == "qmor" and not m.endswith(".__main__")]
    done = subprocess.run([sys.executable, "-c", code, *modules], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
