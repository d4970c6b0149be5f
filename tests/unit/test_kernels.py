"""The chunked output head + cross-entropy (sftdist.kernels) against the plain path, and the loss head that puts it
inside a model's forward (sftdist.training.loss)."""

from __future__ import annotations

import pytest
import torch

from helpers import compose
from sftdist.errors import ConfigError
from sftdist.kernels.linear_cross_entropy import chunk_size, linear_cross_entropy, linear_cross_entropy_reference
from sftdist.training.loss import (
    chunked_loss_problem,
    cross_entropy_sum,
    install_loss_head,
    loss_impl,
    supervised_targets,
)


def _inputs(n, vocab, hidden, supervised, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g, dtype=dtype) / hidden**0.5).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[torch.randperm(n, generator=g)[supervised:]] = -100
    return h, w, targets


def _loss_and_grads(fn, h, w, targets, **kwargs):
    loss = fn(h, w, targets, **kwargs)
    if not loss.requires_grad:  # nothing supervised through the plain path: no graph at all
        return loss, torch.zeros_like(h), torch.zeros_like(w)
    grad_h, grad_w = torch.autograd.grad(loss * 0.5, (h, w))  # an incoming gradient other than 1
    return loss, grad_h, grad_w


@pytest.mark.parametrize("supervised", [0, 1, 37, 96])
@pytest.mark.parametrize("chunk", [None, 1, 7, 96, 1000])
def test_chunked_equals_the_plain_path_in_fp32_gradients_too(supervised, chunk):
    h, w, targets = _inputs(96, 300, 24, supervised)
    ref = _loss_and_grads(linear_cross_entropy_reference, h, w, targets)
    got = _loss_and_grads(linear_cross_entropy, h, w, targets, chunk=chunk)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if supervised == 0:
        assert got[0].detach().item() == 0.0 and not got[1].any() and not got[2].any()


def test_bf16_is_as_close_to_fp32_as_the_plain_bf16_path():
    h, w, targets = _inputs(256, 1000, 64, 200)
    exact = _loss_and_grads(linear_cross_entropy_reference, h, w, targets)
    plain = _loss_and_grads(linear_cross_entropy_reference, h, w, targets, compute_dtype=torch.bfloat16)
    chunked = _loss_and_grads(linear_cross_entropy, h, w, targets, compute_dtype=torch.bfloat16, chunk=32)
    for c, p, e in zip(chunked, plain, exact):
        assert c.dtype == e.dtype  # the inputs' dtypes; only the products ran in bf16
        err_c, err_p = float((c - e).norm() / e.norm()), float((p - e).norm() / e.norm())
        assert err_c <= 1.5 * err_p + 1e-6, (err_c, err_p)
        assert err_c < 2e-2  # bf16's 8 bits of mantissa


def test_bf16_inputs_give_bf16_gradients():
    h, w, targets = _inputs(64, 100, 16, 50, dtype=torch.bfloat16)
    loss, grad_h, grad_w = _loss_and_grads(linear_cross_entropy, h, w, targets)
    assert loss.dtype == torch.float32 and grad_h.dtype == grad_w.dtype == torch.bfloat16


def test_without_gradients_nothing_is_kept():
    h, w, targets = _inputs(50, 80, 8, 30)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, targets, chunk=8)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, linear_cross_entropy_reference(h, w, targets).detach())


def test_chunk_sizes():
    assert chunk_size(16384, 128256, 4096) == 512  # 16k tokens, Llama 3's vocabulary: logits about the hidden size
    assert chunk_size(4096, 49152, 576) == 512  # no smaller than 2**25 logits: each chunk rewrites the weight gradient
    assert chunk_size(3, 100000, 8) == 3 and chunk_size(5, 10, 100) == 5 and chunk_size(0, 10, 10) == 1
    # On a GPU each chunk's products must outweigh its pass over the fp32 weight gradient: 4096 tokens at least
    assert chunk_size(16384, 128256, 4096, "cuda") == 4096  # 4 chunks, not 32
    assert chunk_size(8192, 262144, 4096, "cuda") == 4096  # (Gemma's vocabulary: 2**30 logits)
    assert chunk_size(8192, 2**20, 4096, "cuda") == 1024  # no more than 2**30 logits for the floor's sake
    assert chunk_size(2**20, 128256, 4096, "cuda") == 2**15 and chunk_size(100, 128256, 4096, "cuda") == 100
    with pytest.raises(ValueError, match=r"hidden \(N, H\), weight \(V, H\) and targets \(N,\)"):
        linear_cross_entropy(torch.zeros(4, 3), torch.zeros(5, 2), torch.zeros(4, dtype=torch.long))


def _tiny_model(**config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return LlamaForCausalLM(LlamaConfig(**{**base, **config}))


@pytest.mark.parametrize("tied", [False, True])
def test_the_loss_head_inside_the_model_forward_equals_logits_then_cross_entropy(tied):
    model = _tiny_model(tie_word_embeddings=tied)
    input_ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(2))
    targets[:, :12] = -100
    targets[2] = -100  # a row with nothing to learn

    logits = model(input_ids=input_ids).logits
    plain = cross_entropy_sum(logits, targets)
    plain_grads = torch.autograd.grad(plain, list(model.parameters()))
    install_loss_head(model)
    index = (targets.flatten() != -100).nonzero()[:, 0]
    with supervised_targets(model, targets, index):
        chunked = model(input_ids=input_ids).logits
    assert chunked.dim() == 0
    chunked_grads = torch.autograd.grad(chunked, list(model.parameters()))
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=0)
    for a, b in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # Outside the block the head is the plain linear map again (generation, export).
    torch.testing.assert_close(model(input_ids=input_ids).logits, logits)


def test_models_whose_logits_are_not_the_head_output_are_found():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    assert chunked_loss_problem(_tiny_model()) is None
    gemma = Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
        )
    )
    assert (
        chunked_loss_problem(gemma)
        == "Gemma2ForCausalLM post-processes its logits (config.final_logit_softcapping=30.0)"
    )
    assert loss_impl("auto", gemma, lambda: (1.0, 1.0)) == (
        "naive",
        "train.loss_impl=auto: naive, since Gemma2ForCausalLM post-processes its logits "
        "(config.final_logit_softcapping=30.0)",
    )
    with pytest.raises(ConfigError, match=r"train.loss_impl=chunked: Gemma2ForCausalLM post-processes its logits"):
        loss_impl("chunked", gemma, lambda: (1.0, 1.0))


def test_a_forward_that_changes_the_logits_unannounced_is_caught_by_the_check():
    # What a remote-code model scaling its logits in forward looks like: the two ways disagree.
    model = _tiny_model()
    assert loss_impl("auto", model, lambda: (10.0, 10.000001))[0] == "chunked"
    impl, why = loss_impl("auto", model, lambda: (10.0, 20.0))
    assert impl == "naive" and "does not return the head's output as logits (CE 10 naive, 20)" in why
    with pytest.raises(ConfigError, match="does not return the head's output as logits"):
        loss_impl("chunked", model, lambda: (10.0, 20.0))
    assert loss_impl("naive", model, lambda: pytest.fail("naive needs no check")) == ("naive", "train.loss_impl=naive")


def test_the_trainer_picks_chunked_for_llama_and_says_so(tmp_path):
    from sftdist.training import Trainer

    trainer = Trainer(compose(f"output_dir={tmp_path}", "wandb.mode=disabled", "data.demo_size=100"))
    try:
        assert (trainer.runner.loss_impl, trainer.runner.loss_why) == (
            "chunked",
            "the output head on supervised tokens only, in chunks",
        )
    finally:
        trainer.close()
