"""Strategy selection and the one-process strategy; rank assignment of micro-batches."""

from __future__ import annotations

import pytest
import torch

from helpers import compose
from sftdist.data.batching import assign_to_ranks, build_micro_batches
from sftdist.data.dataset import Sample
from sftdist.errors import ConfigError
from sftdist.parallel import build_strategy, resolve_device
from sftdist.parallel.base import clip_and_norm


def test_strategy_none_refuses_a_multi_process_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        ValueError, match="strategy=none trains in one process, but this was launched with WORLD_SIZE=2"
    ):
        build_strategy(compose())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "zero3"])
def test_a_distributed_strategy_without_torchrun_says_how_to_launch(monkeypatch, strategy):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(
        ConfigError,
        match=rf"strategy={strategy} needs a process group, but this process was not "
        rf"started by torchrun .*torchrun --nproc_per_node=N -m sftdist.train",
    ):
        build_strategy(compose(f"strategy={strategy}"))


def test_strategy_none_on_cpu(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    strategy = build_strategy(compose("device=cpu"))
    assert strategy.device == torch.device("cpu") and strategy.is_main and strategy.world_size == 1
    assert strategy.all_sum([7, 2.5]) == [7, 2.5] and strategy.grad_divisor == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="device='cuda' but this torch build sees no CUDA device"):
        resolve_device("cuda")


def test_clipping_scales_gradients_to_the_max_norm_and_reports_the_norm_before():
    model = torch.nn.Linear(3, 2)
    for p, g in zip(model.parameters(), (torch.full((2, 3), 2.0), torch.full((2,), 2.0))):
        p.grad = g.clone()
    norm = clip_and_norm(list(model.parameters()), max_grad_norm=1.0)
    assert norm == pytest.approx(2.0 * 8**0.5)
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert float(clipped) == pytest.approx(1.0, rel=1e-5)
    assert clip_and_norm(list(model.parameters()), max_grad_norm=0.0) == pytest.approx(1.0, rel=1e-5)  # measure only


def test_weight_decay_applies_to_matrices_only():
    from sftdist.config import TrainConfig
    from sftdist.training import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = build_optimizer(model, TrainConfig(weight_decay=0.1, lr=1e-3)).param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # linear bias, norm weight and bias


def test_micro_batches_are_dealt_evenly_in_count_and_balanced_in_cost():
    costs = [10, 9, 8, 7, 6, 5, 1]
    ranks = assign_to_ranks(costs, 3)
    assert sorted(len(r) for r in ranks) == [2, 2, 3]  # ceil(7 / 3) = 3 micro-steps on every rank
    assert sorted(g for r in ranks for g in r) == list(range(7))  # each exactly once
    loads = [sum(costs[g] for g in r) for r in ranks]
    assert max(loads) - min(loads) <= 4  # LPT: 10+5+1, 9+6, 8+7
    assert assign_to_ranks([5.0], 4) == [[0], [], [], []]


def _sample(n: int, k: int) -> Sample:
    ids = list(range(k, k + n))
    return Sample(ids, [-100] + ids[1:], {})


@pytest.mark.parametrize("packing", [True, False])
def test_every_rank_gets_the_same_number_of_micro_batches_and_together_the_whole_step(packing):
    samples = [_sample(n, i) for i, n in enumerate([30, 5, 17, 8, 22, 3, 11])]
    whole = build_micro_batches(samples, 32, pad_id=0, packing=packing)
    shares = [build_micro_batches(samples, 32, 0, packing, rank=r, world_size=3) for r in range(3)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == -(-len(whole) // 3)
    assert sum(mb.num_tokens for s in shares for mb in s) == sum(mb.num_tokens for mb in whole) == 96
    assert sum(mb.num_supervised for s in shares for mb in s) == sum(mb.num_supervised for mb in whole)
    empties = [mb for s in shares for mb in s if mb.num_tokens == 0]
    assert all(mb.num_supervised == 0 and (mb.targets == -100).all() and mb.packed == packing for mb in empties)


def test_model_weights_read_one_tensor_at_a_time_and_refuse_another_shape(tmp_path):
    from safetensors.torch import save_file

    from sftdist.model import ModelWeights

    save_file({"a": torch.ones(2, 3, dtype=torch.bfloat16), "b": torch.zeros(4)}, str(tmp_path / "model.safetensors"))
    weights = ModelWeights.from_safetensors(tmp_path)
    assert weights.names == {"a", "b"} and weights.get("a").dtype == torch.float32
    assert torch.equal(weights.get("a", torch.Size([2, 3])), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"a: the checkpoint's tensor is \(2, 3\), the model's \(3, 2\)"):
        weights.get("a", torch.Size([3, 2]))
    assert ModelWeights.from_safetensors(tmp_path / "nothing-here") is None
