"""The tree stays clean under the formatter and linter configured in pyproject.toml (ruff, line length 120)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")


@pytest.mark.skipif(RUFF is None, reason="ruff is not installed (the dev extra installs it)")
@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_the_tree_is_clean_under_ruff(command):
    proc = subprocess.run([RUFF, *command, "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


def _architecture_block() -> list[str]:
    text = (REPO / "README.md").read_text().split("## Architecture", 1)[1]
    return text.split("```", 2)[1].splitlines()


def test_the_readme_tree_is_the_package_as_it_is():
    """README's Architecture tree names every module of sftdist/ in its package's entry, and nothing that is gone."""
    lines = _architecture_block()
    sections: dict[str, list[str]] = {}  # "" for sftdist/ itself, "data" for data/, ...
    current, top = None, set()
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if line.strip() == "sftdist/":
            current = ""
        elif indent == 0:
            current = None
        elif indent == 2 and current is not None:
            name = line.split()[0]
            current = name.rstrip("/") if name.endswith("/") else ""
            top |= {name} if current == "" else set()
            sections.setdefault(current, []).append(line)
        elif current is not None:
            sections.setdefault(current, []).append(line)
    package = REPO / "sftdist"
    assert top == {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    folders = {p.name for p in package.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert set(sections) - {""} == folders
    for folder in folders:
        text = " ".join(sections[folder])
        modules = {p.name for p in (package / folder).glob("*.py") if p.name != "__init__.py"}
        named = set(re.findall(r"\b(\w+\.py)\b", text))
        assert modules <= named, f"{folder}/: not in the README tree: {sorted(modules - named)}"
        assert named <= modules, f"{folder}/: in the README tree, not in the package: {sorted(named - modules)}"
