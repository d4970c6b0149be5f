"""A process started in the repository root imports the installed packages, never a folder of the checkout that
shares their name: `python -m ...`, `python script.py` and pytest all put the root (or the script's folder) first
on sys.path, and transformers imports Hugging Face's `kernels` package when its model code is imported."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

from helpers import REPO, python_in_root

# The folders a process of ours may have first on sys.path: the root (python -m, python -c, pytest's rootdir),
# tests/ (pytest's pythonpath), each tests/ folder (pytest puts a test module's folder first, and
# tests/bench/*.py run as scripts), and the folders holding launched scripts.
PATH_FOLDERS = [
    REPO,
    REPO / "tests",
    *sorted(p for p in (REPO / "tests").iterdir() if p.is_dir() and p.name not in ("data", "__pycache__")),
    REPO / "launch",
    REPO / "slurm",
]
# What those folders may hold that imports under its own name: sftdist, Hydra's configs, the test helpers, test
# modules, benchmarks. Anything new here must be a name no dependency or standard module uses.
OURS = {"sftdist", "conf", "conftest", "helpers", "launching", "slurm_jobs", "scenarios"}
OURS_PREFIXES = ("test_", "bench_")

# The top-level names of every installed distribution, read from the files each one installed (the same answer on
# every Python; importlib.metadata.packages_distributions differs between versions), and the standard library.
_INSTALLED_NAMES = """
import importlib.metadata, inspect, json, sys
names = set(sys.stdlib_module_names)
for dist in importlib.metadata.distributions():
    if dist.metadata["Name"] == "sftdist":  # (its editable install lists the checkout's own files)
        continue
    for file in dist.files or ():
        top = file.parts[0]
        name = top if len(file.parts) > 1 else inspect.getmodulename(top)
        if name and name.isidentifier() and not name.startswith("__") and not top.endswith((".dist-info", ".data")):
            names.add(name)
"""


def _of_the_checkout(path: str) -> bool:
    """A path of the checkout's own files (the .venv inside it, where make puts it, is not)."""
    return Path(path).is_relative_to(REPO) and not Path(path).is_relative_to(sys.prefix)


def test_transformers_model_code_and_sftdist_import_in_the_repository_root():
    proc = python_in_root(
        "import importlib.util, json, sys\n"
        "import transformers.models.llama.modeling_llama, sftdist.kernels.linear_cross_entropy, sftdist.training\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(json.dumps([sys.path[0], sftdist.kernels.__file__, spec and spec.origin]))"
    )
    first, ours, theirs = json.loads(proc.stdout)
    assert first == ""  # the working directory (the root) is first on sys.path, as for any `python -c` or `-m`
    assert Path(ours).is_relative_to(REPO / "kernels")  # the editable install maps sftdist.kernels to kernels/
    # `import kernels` is Hugging Face's package (transformers 5.25 depends on it), or none of our code where absent
    assert theirs is None or not _of_the_checkout(theirs), theirs


def test_no_folder_of_the_checkout_shadows_a_dependency_or_the_standard_library():
    """Every top-level name an installed distribution provides (transformers, kernels, deepspeed, ...) and every
    standard-library module resolves outside the checkout, with all of PATH_FOLDERS on sys.path."""
    proc = python_in_root(
        _INSTALLED_NAMES + "import importlib.util\n"
        "found = {}\n"
        "for name in sorted(names):\n"
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


def test_the_folders_on_the_import_path_hold_only_our_own_names():
    """The other way round, for dependencies not installed here (the bench, qlora and gpu extras, or a future one):
    whatever in PATH_FOLDERS imports under its own name is a name of ours, chosen not to collide."""
    importable = set()
    for folder in PATH_FOLDERS:
        for entry in folder.iterdir():
            name = inspect.getmodulename(entry.name) if entry.is_file() else entry.name
            if entry.is_dir() and not (entry / "__init__.py").exists():
                continue  # a plain folder: a namespace portion, which any installed package of its name outranks
            if name and name.isidentifier():
                importable.add(name)
    strangers = {n for n in importable if n not in OURS and not n.startswith(OURS_PREFIXES)}
    assert not strangers, strangers
    assert {"sftdist", "conf", "helpers"} <= importable


def test_the_kernels_folder_holds_no_importable_top_level_package():
    """kernels/ keeps the kernel sources in a folder named `sftdist.kernels`, which no import statement can reach
    as `kernels.<name>`: where Hugging Face's package is not installed, `import kernels` is an empty namespace."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    children = [p.name for p in (REPO / "kernels").iterdir() if p.name not in ("__pycache__", "README.md")]
    assert children == ["sftdist.kernels"]
    assert not any(inspect.getmodulename(p.name) for p in (REPO / "kernels").iterdir() if p.is_file())
