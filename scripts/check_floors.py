"""Check that qmor runs on the lowest versions pyproject.toml allows.

Builds a throwaway virtual environment with every core dependency pinned to its floor (`name>=X` becomes
`name==X`), installs qmor into it without letting pip change those pins, and runs a smoke subset of the tests plus
a short training run and an export. docs/dependencies.md records what was checked and what fails below each floor.

    python3 scripts/check_floors.py                                  # every floor from pyproject.toml
    python3 scripts/check_floors.py --pin transformers==5.16.1       # one package lower, the rest at their floors
    python3 scripts/check_floors.py --venv /tmp/qmor-floors --keep   # build it there and keep it

torch is installed first and alone (--torch), so that pip never replaces it with another build.
Needs Python 3.11+ (tomllib) to run; the environment it builds uses the same interpreter.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["tests/test_attach.py", "tests/test_load.py", "tests/test_export.py", "tests/test_loss.py",
         "tests/test_data.py", "tests/test_resume.py"]


def key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def floors(extras: list[str]) -> dict[str, str]:
    """package -> `package==floor` for the core dependencies and the named extras (and the extras they name)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs, todo = list(project["dependencies"]), list(extras)
    while todo:
        specs += project["optional-dependencies"][todo.pop()]
    pins = {}
    for spec in specs:
        own = re.fullmatch(rf"{project['name']}\[(.+)\]", spec)  # an extra that names another, e.g. qmor[app]
        if own:
            pins.update(floors(own[1].split(",")))
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([^,;\s]+).*", spec)
        if not m:
            sys.exit(f"{spec!r} in pyproject.toml has no `>=` floor; give every dependency one")
        pins[key(m[1])] = f"{m[1]}=={m[2]}"
    return pins


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", help="environment folder to create (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the environment afterwards")
    p.add_argument("--pin", action="append", default=[], metavar="PKG==VER", help="override one floor")
    p.add_argument("--torch", help="the torch requirement to install first (default: torch at its floor)")
    p.add_argument("--extra", action="append", default=[], help="also pin this extra's floors (app, dev)")
    p.add_argument("--tests", nargs="*", default=SMOKE, help="test files to run")
    args = p.parse_args()

    pins = floors(args.extra)
    for pin in args.pin:
        pins[key(re.split(r"[=<>!~]", pin, maxsplit=1)[0])] = pin
    torch_pin = args.torch or pins["torch"]
    pins.pop("torch", None)
    if args.venv and Path(args.venv).exists():
        sys.exit(f"{args.venv} exists; name a new folder (a reused environment keeps versions from its last run)")
    venv = Path(args.venv or tempfile.mkdtemp(prefix="qmor-floors-"))
    py = str(venv / "bin" / "python")
    # a fresh LoftQ cache, so that the run computes its initialisation on these versions instead of reading one
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "QMOR_CACHE": str(venv / "qmor-cache")}
    try:
        run([sys.executable, "-m", "venv", str(venv)])
        pip = [py, "-m", "pip", "install", "-q"]
        run([*pip, torch_pin])
        # torch stays as installed: pinning it again keeps the resolver from swapping in another build
        installed = subprocess.run([py, "-c", "import torch; print(torch.__version__.split('+')[0])"],
                                   check=True, capture_output=True, text=True).stdout.strip()
        run([*pip, f"torch=={installed}", *pins.values(), "pytest"])
        run([*pip, "--no-deps", "-e", str(ROOT)])
        run([py, "-m", "pip", "check"])
        names = ["torch", *pins]
        run([py, "-c", "import importlib.metadata as m, sys; "
             "[print(f'{n} {m.version(n)}') for n in sys.argv[1:]]", *names])
        if "ruff" in pins:  # lint results move between ruff releases, so its floor is checked too
            run([str(venv / "bin" / "ruff"), "check", "."], cwd=ROOT)
        run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.tests], cwd=ROOT, env=env)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            run([py, "scripts/finetune_4bit.py", "--max-steps", "5", "--num-examples", "16", "--eval-steps", "5",
                 "--save-steps", "5", "--output", str(out)], cwd=ROOT, env=env)
            run([py, "scripts/export_fp16.py", str(out), "--output", str(Path(tmp) / "fp16")], cwd=ROOT, env=env)
    except subprocess.CalledProcessError as e:
        print(f"FAILED: {' '.join(e.cmd)} exited {e.returncode}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(venv, ignore_errors=True)
    print("every check passed on these versions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
