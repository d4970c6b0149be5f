"""A non-editable install (a wheel) carries the configs, kernels and demo assets inside the package,
and sftdist-train runs from any directory with it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

from helpers import REPO

SOURCES = ("pyproject.toml", "README.md", "sftdist", "conf", "kernels")


def test_wheel_installs_and_trains_from_another_directory(tmp_path):
    src = tmp_path / "src"  # build from a copy: nothing is written into the checkout
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, src / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    wheel = next((tmp_path / "dist").glob("sftdist-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "sftdist/conf/sft.yaml",
        "sftdist/conf/model/tiny.yaml",
        "sftdist/conf/strategy/none.yaml",
        "sftdist/conf/curriculum/three_phase.yaml",
        "sftdist/kernels/__init__.py",
        "sftdist/assets/demo_tokenizer/tokenizer.json",
        "sftdist/assets/demo_tokenizer/chat_template.jinja",
    ):
        assert required in names, required
    assert not any(n.split("/")[0] in ("conf", "kernels") for n in names)  # no top-level `kernels` package
    # every module of the package: a subpackage missing from pyproject's list would import from the checkout here
    # (the editable install's finder), and fail for a user
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "sftdist").rglob("*.py")}
    assert modules <= names, sorted(modules - names)

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import sys, sftdist, sftdist.train, sftdist.training.trainer as t; "
        "assert sftdist.__file__.startswith(sys.argv[1]) and t.__file__.startswith(sys.argv[1]), t.__file__; "
        "sys.argv = ['sftdist-train'] + sys.argv[2:]; sftdist.train.main()"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(site),
            "output_dir=run",
            "train.max_steps=2",
            "eval.every_steps=0",
            "wandb.mode=disabled",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (elsewhere / "run" / "final" / "model.safetensors").is_file()
