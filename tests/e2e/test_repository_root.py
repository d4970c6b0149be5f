"""A process started in the repository root imports the installed packages, never a folder of the checkout that
shares their name: `python -m ...`, `python script.py` and pytest all put the root (or the script's folder) first
on sys.path, and transformers imports Hugging Face's `kernels` package when its model code is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO

# The folders a process of ours may have first on sys.path: the root (python -m, python -c, pytest's rootdir),
# tests/ (pytest's pythonpath), each tests/ folder (pytest puts a test module's folder first, and
# tests/bench/*.py run as scripts), and the folders holding launched scripts.
PATH_FOLDERS = [
    REPO,
    REPO / "tests",
    *sorted(p for p in (REPO / "tests").iterdir() if p.is_dir() and p.name != "data"),
    REPO / "launch",
    REPO / "slurm",
]


def _of_the_checkout(path: str) -> bool:
    """A path of the checkout's own files (the .venv inside it, where make puts it, is not)."""
    return path.startswith(str(REPO)) and not path.startswith(sys.prefix)


def _in_root(code: str, *path_folders) -> subprocess.CompletedProcess:
    """``python -c code`` in the repository root, with ``path_folders`` after the root on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in path_folders)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_transformers_model_code_and_sftdist_import_in_the_repository_root():
    proc = _in_root(
        "import importlib.util, sys\n"
        "import transformers.models.llama.modeling_llama, sftdist.kernels.linear_cross_entropy, sftdist.trainer\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(sys.path[0] == '', sftdist.kernels.__file__, spec and spec.origin)"
    )
    root_first, ours, theirs = proc.stdout.split()
    assert root_first == "True"  # the root is on sys.path, as for any `python -c` or `python -m` started there
    assert ours.startswith(str(REPO / "kernels"))  # the editable install maps sftdist.kernels to kernels/
    # `import kernels` is Hugging Face's package (transformers 5.25 depends on it), or nothing where it is absent
    assert theirs == "None" or not _of_the_checkout(theirs), theirs


def test_no_folder_of_the_checkout_shadows_a_dependency_or_the_standard_library():
    """Every top-level name an installed distribution provides (transformers, kernels, deepspeed, ...) and every
    standard-library module resolves outside the checkout, with all of PATH_FOLDERS on sys.path."""
    proc = _in_root(
        "import importlib.metadata, importlib.util, json, sys\n"
        "names = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)\n"
        "names -= {'sftdist', '__editable___sftdist_0_1_0_finder'}\n"
        "found = {}\n"
        "for name in sorted(n for n in names if n.isidentifier()):\n"
        "    try:\n"
        "        spec = importlib.util.find_spec(name)\n"
        "    except (ImportError, ValueError):\n"
        "        continue\n"
        "    if spec is not None:\n"
        "        found[name] = [spec.origin or '', *(spec.submodule_search_locations or [])]\n"
        "print(json.dumps(found))",
        *PATH_FOLDERS[1:],
    )
    found = json.loads(proc.stdout)
    assert {"transformers", "kernels", "torch", "deepspeed", "datasets", "json", "signal"} <= found.keys()
    shadowed = {name: where for name, where in found.items() if any(map(_of_the_checkout, where))}
    assert not shadowed, shadowed


def test_the_kernels_folder_holds_no_importable_top_level_package():
    """kernels/ keeps the kernel sources in a folder named `sftdist.kernels`, which no import statement can reach
    as `kernels.<name>`: even where Hugging Face's package is not installed, none of our code is `kernels.*`."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    children = [p.name for p in (REPO / "kernels").iterdir() if p.name != "__pycache__"]
    assert children and all(not name.removesuffix(".py").isidentifier() for name in children if name != "README.md")
