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


def test_clipping_scales_gradients_to_the_max_norm_and_reports_the_norm_before(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    strategy = build_strategy(StrategyConfig(name="none"), "cpu")
    model = torch.nn.Linear(3, 2)
    for p, g in zip(model.parameters(), (torch.full((2, 3), 2.0), torch.full((2,), 2.0))):
        p.grad = g.clone()
    norm = strategy.clip_grad_norm(model, max_norm=1.0)
    assert norm == pytest.approx(2.0 * 8 ** 0.5)
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert float(clipped) == pytest.approx(1.0, rel=1e-5)
    assert strategy.clip_grad_norm(model, max_norm=0.0) == pytest.approx(1.0, rel=1e-5)  # 0: measure only


def test_weight_decay_applies_to_matrices_only():
    from sftdist.config import TrainConfig
    from sftdist.trainer import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = build_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # linear bias, norm weight and bias
