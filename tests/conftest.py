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
