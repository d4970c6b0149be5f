"""The loss is the token mean of the whole step however it is cut; the LR schedule's shape."""

from __future__ import annotations

import math

import pytest
import torch

from sftdist.config import TrainConfig
from sftdist.training import lr_at
from sftdist.training.loss import cross_entropy_sum, step_normalised_loss


def _batch(rows, width, vocab, supervised_frac, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, width, vocab, generator=g)
    targets = torch.randint(0, vocab, (rows, width), generator=g)
    targets[torch.rand(rows, width, generator=g) > supervised_frac] = -100
    return logits, targets


def test_cross_entropy_sum_ignores_unsupervised_targets():
    logits, targets = _batch(2, 5, 11, 0.5, 0)
    keep = targets != -100
    expected = -torch.log_softmax(logits, -1)[keep].gather(-1, targets[keep][:, None]).sum()
    assert torch.allclose(cross_entropy_sum(logits, targets), expected)


def test_step_loss_is_the_token_mean_of_the_step_not_a_mean_of_means():
    # Two micro-batches with very different supervised counts, as a short and a long batch would have.
    (l1, t1), (l2, t2) = _batch(1, 40, 13, 0.9, 1), _batch(3, 4, 13, 0.2, 2)
    n = int((t1 != -100).sum() + (t2 != -100).sum())
    step = step_normalised_loss(cross_entropy_sum(l1, t1), n) + step_normalised_loss(cross_entropy_sum(l2, t2), n)
    pooled = torch.nn.functional.cross_entropy(
        torch.cat([l1.flatten(0, 1), l2.flatten(0, 1)]), torch.cat([t1.flatten(), t2.flatten()]), ignore_index=-100
    )
    assert torch.allclose(step, pooled, rtol=1e-6)
    mean_of_means = (
        cross_entropy_sum(l1, t1) / (t1 != -100).sum() + cross_entropy_sum(l2, t2) / (t2 != -100).sum()
    ) / 2
    assert not torch.allclose(mean_of_means, pooled, rtol=1e-3)  # the common bug is measurably different


def test_lr_warms_up_then_follows_a_cosine_to_the_floor():
    cfg = TrainConfig(max_steps=100, lr=1.0, warmup_ratio=0.1, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 11 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0) and lrs[9] < lrs[10] and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 45 / 89)))


def test_lr_without_warmup_starts_at_the_peak():
    cfg = TrainConfig(max_steps=3, lr=2.0, warmup_ratio=0.0, min_lr_ratio=0.5)
    assert [lr_at(s, cfg) for s in range(3)] == pytest.approx([2.0, 1.5, 1.0])
