"""The CUDA backends (flash_attn when installed, torch_varlen, compiled flex) against the per-sample forwards:
bf16 packed forwards within bf16 tolerance of the reference; flex's gradients (no CPU backward) in fp32."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from sftdist.model.attention import apply_packed_attention, available, packed_attention_kwargs

LENGTHS = [37, 120, 5, 64, 250]
ARCHS = [("llama", {}), ("qwen2", {}), ("mistral", {"sliding_window": 16})]


def _tiny(arch: str, **extra):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[arch]
    config = config_cls(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        attn_implementation="sdpa",
        **extra,
    )
    torch.manual_seed(0)
    return model_cls(config).cuda()


def _inputs():
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 512, (1, n), generator=g).cuda() for n in LENGTHS]
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32).cuda()
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])[None].cuda()
    return seqs, cu, position_ids


def _packed_logits(model, backend, seqs, cu, position_ids):
    packed = copy.deepcopy(model)
    apply_packed_attention(packed, backend)
    return packed(
        input_ids=torch.cat(seqs, 1),
        position_ids=position_ids,
        use_cache=False,
        **packed_attention_kwargs(cu, max(LENGTHS)),
    ).logits


@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen", "flex"])
@pytest.mark.parametrize("arch,extra", ARCHS, ids=[a for a, _ in ARCHS])
def test_cuda_backends_match_the_reference_in_bf16(backend, arch, extra):
    if backend == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    reason = available(backend, torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    model = _tiny(arch, **extra).to(torch.bfloat16).eval()
    seqs, cu, position_ids = _inputs()
    with torch.no_grad():
        reference = torch.cat([model(input_ids=s, use_cache=False).logits for s in seqs], 1).float()
        reference_packed = _packed_logits(model, "sdpa", seqs, cu, position_ids).float()
        logits = _packed_logits(model, backend, seqs, cu, position_ids).float()
    scale = reference.abs().max()
    assert (reference_packed - reference).abs().max() / scale < 2e-2  # the reference itself, in bf16
    assert (logits - reference).abs().max() / scale < 2e-2, (logits - reference).abs().max() / scale


@pytest.mark.parametrize("arch,extra", ARCHS, ids=[a for a, _ in ARCHS])
def test_flex_gradients_match_the_reference_on_cuda(arch, extra):
    model = _tiny(arch, **extra).float()
    seqs, cu, position_ids = _inputs()
    grads = {}
    for backend in ("sdpa", "flex"):
        packed = copy.deepcopy(model)
        apply_packed_attention(packed, backend)
        logits = packed(
            input_ids=torch.cat(seqs, 1),
            position_ids=position_ids,
            use_cache=False,
            **packed_attention_kwargs(cu, max(LENGTHS)),
        ).logits
        logits.float().logsumexp(-1).sum().backward()
        grads[backend] = {k: p.grad for k, p in packed.named_parameters()}
    for name, g in grads["sdpa"].items():
        assert torch.allclose(grads["flex"][name], g, atol=1e-4, rtol=1e-3), name


def test_packed_demo_training_on_cuda_uses_a_varlen_backend(tmp_path):
    from helpers import compose, read_metrics
    from sftdist.training import Trainer

    with Trainer(
        compose(
            f"output_dir={tmp_path}",
            "device=cuda",
            "precision=bf16",
            "train.max_steps=20",
            "eval.every_steps=0",
            "wandb.mode=disabled",
        )
    ) as trainer:
        assert trainer.runner.attention in ("flash_attn", "torch_varlen", "flex")
        trainer.fit()
    metrics = read_metrics(tmp_path)
    assert metrics[-1]["train/loss"] < 0.5 * metrics[0]["train/loss"]
