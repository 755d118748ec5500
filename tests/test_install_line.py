"""One install line: the README's first command is the reference. .ci/run installs the same packages in the same
order, and no other page of the README or docs/ carries a copy of its own (they point to the README)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# how a copy of the install instructions starts: the project itself, or torch, which must come first
COPY = re.compile(r"pip install (-e|torch)\b")


def reference() -> str:
    """The first command line of the README's first bash block."""
    block = README.read_text().split("```bash\n", 1)[1]
    return next(line for line in block.splitlines() if line and not line.startswith("#"))


def pip_steps(line: str) -> list[str]:
    return [step.strip() for step in line.split("&&") if step.strip().startswith("pip install")]


def ci_steps() -> list[str]:
    steps = []
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        step = re.sub(r"^python -m pip install (-q )?", "pip install ", line.split("  #")[0].strip())
        if step.startswith("pip install") and step != "pip install --upgrade pip":
            steps.append(step)
    return steps


def test_ci_installs_what_the_readme_installs():
    assert pip_steps(reference()), "the README's first command installs nothing"
    assert ci_steps() == pip_steps(reference())


def test_no_other_copy_of_the_install_line():
    ref = reference()
    copies = [f"{page.relative_to(ROOT)}:{n}: {line}"
              for page in [README, *sorted((ROOT / "docs").glob("*.md"))]
              for n, line in enumerate(page.read_text().splitlines(), 1)
              if COPY.search(line) and line != ref and "`error:" not in line]  # a quoted message's own fix
    assert copies == [], "point to the README's first command instead"
