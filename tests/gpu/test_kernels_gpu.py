"""The chunked loss on a GPU: against the plain path in fp32 and bf16 (a Llama-3-sized vocabulary), and a real
training step with each loss giving the same first loss."""

from __future__ import annotations

import pytest
import torch

from helpers import compose, read_metrics
from sftdist.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from sftdist.training import Trainer


@pytest.mark.parametrize("chunk", [None, 256])  # (None: one chunk of 2048 tokens on a GPU; 256: eight, summed)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_the_plain_path_on_cuda(dtype, chunk):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(2048, 512, device="cuda", generator=g).requires_grad_()
    w = (torch.randn(128256, 512, device="cuda", generator=g) / 512**0.5).requires_grad_()
    t = torch.randint(0, 128256, (2048,), device="cuda", generator=g)
    t[:700] = -100
    exact = linear_cross_entropy_reference(h.double(), w.double(), t)
    grads_exact = torch.autograd.grad(exact, (h, w))
    plain = linear_cross_entropy_reference(h, w, t, dtype)
    grads_plain = torch.autograd.grad(plain, (h, w))
    chunked = linear_cross_entropy(h, w, t, dtype, chunk=chunk)
    grads_chunked = torch.autograd.grad(chunked, (h, w))
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
    assert rel(chunked, exact) <= max(2 * rel(plain, exact), 1e-6)
    for c, p, e in zip(grads_chunked, grads_plain, grads_exact):
        assert rel(c, e) <= max(1.5 * rel(p, e), 1e-5)


def test_a_cuda_step_has_the_same_loss_chunked_or_naive(tmp_path):
    losses = {}
    for impl in ("chunked", "naive"):
        with Trainer(
            compose(
                f"output_dir={tmp_path / impl}",
                "device=cuda",
                "precision=bf16",
                f"train.loss_impl={impl}",
                "train.max_steps=2",
                "eval.every_steps=0",
                "wandb.mode=disabled",
            )
        ) as trainer:
            assert trainer.runner.loss_impl == impl
            trainer.fit()
        losses[impl] = [m["train/loss"] for m in read_metrics(tmp_path / impl)]
    assert losses["chunked"] == pytest.approx(losses["naive"], rel=1e-2)
