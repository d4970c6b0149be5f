"""Strategy selection: one process means one process."""

from __future__ import annotations

import pytest
import torch

from sftdist.config import StrategyConfig
from sftdist.parallel import build_strategy, resolve_device


def test_strategy_none_refuses_a_multi_process_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="strategy=none trains in one process, but this was launched with WORLD_SIZE=2"):
        build_strategy(StrategyConfig(name="none"), "cpu")


def test_strategy_none_on_cpu(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    strategy = build_strategy(StrategyConfig(name="none"), "cpu")
    assert strategy.device == torch.device("cpu") and strategy.is_main and strategy.world_size == 1
    assert strategy.sum_across_ranks(7) == 7


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="device='cuda' but this torch build sees no CUDA device"):
        resolve_device("cuda")
