"""Test session settings, shared fixtures, and the GPU marker."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Nothing may come from a hub in tests, and W&B never leaves the machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)
# Prepared-data cache of this test session (subprocesses inherit it); never the user's ~/.cache.
os.environ["SFTDIST_CACHE_DIR"] = tempfile.mkdtemp(prefix="sftdist-test-cache-")


def pytest_collection_modifyitems(config, items):
    """Everything under tests/gpu is marked ``gpu`` and skipped, with the reason, without CUDA."""
    for item in items:
        if "/tests/gpu/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture
def demo_tokenizer():
    from sftdist.data.demo import load_demo_tokenizer

    return load_demo_tokenizer()


@pytest.fixture(autouse=True)
def _no_stop_signal_handler_left():
    """After each test, this process handles SIGTERM/SIGUSR1 as it did before: a Trainer left open (one a test only
    set up, or one whose test failed before ``close()``) would otherwise keep its handler, and a SIGTERM to pytest (a
    CI timeout) would wait for a stop that never comes, then exit 143 with no report."""
    yield
    from sftdist.run.signals import release_all

    release_all()
