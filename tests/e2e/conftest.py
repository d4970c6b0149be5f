"""What several e2e modules read: the default demo, trained once per session (test_cli checks it as the command's
contract, test_train_demo what it learned and wrote)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def default_demo(tmp_path_factory):
    """``make demo``'s run: sftdist-train with no overrides but where it writes, W&B offline. (output_dir, process)"""
    tmp_path = tmp_path_factory.mktemp("default-demo")
    out = tmp_path / "run"
    exe = shutil.which("sftdist-train", path=os.path.dirname(sys.executable)) or "sftdist-train"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run(
        [exe, f"output_dir={out}", "wandb.mode=offline"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc
