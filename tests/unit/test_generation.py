"""Greedy generation for the probes: plain greedy decoding whatever the model's own generation settings, the same
answers batched (left-padded) as alone, and an answer cut at its stop token."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sftdist.metrics.generation import generate_greedy


class _OneProcess:
    rank, world_size = 0, 1

    def all_gather_object(self, obj):
        return [obj]


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def _argmax_loop(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def _generate(model, prompts, stop_ids=(), max_new_tokens=12, batch_size=8):
    return generate_greedy(
        model, _OneProcess(), prompts, stop_ids=list(stop_ids), pad_id=0, max_new_tokens=max_new_tokens,
        batch_size=batch_size, device=torch.device("cpu"), autocast=_no_autocast,
    )  # fmt: skip


class _no_autocast:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_plain_greedy_whatever_the_models_generation_settings():
    model = _model()
    prompts = [[5, 9, 11, 3], [7, 2]]
    expected = [_argmax_loop(model, p, 12) for p in prompts]
    settings = model.generation_config
    settings.repetition_penalty, settings.no_repeat_ngram_size, settings.min_new_tokens = 5.0, 1, 12
    out = _generate(model, prompts)
    assert [g.tokens for g in out] == expected and not any(g.stopped for g in out)
    assert model.generation_config is settings and settings.repetition_penalty == 5.0  # put back as it was


def test_batched_left_padded_answers_equal_single_ones_and_stop_at_the_stop_token():
    model = _model()
    prompts = [[5, 9, 11, 3, 8, 8, 1], [7, 2], [4, 4, 6]]
    alone = [_generate(model, [p])[0].tokens for p in prompts]
    assert [g.tokens for g in _generate(model, prompts, batch_size=2)] == alone
    stop = alone[0][3]
    cut = _generate(model, prompts[:1], stop_ids=[stop])[0]
    assert cut.stopped and cut.tokens == alone[0][: alone[0].index(stop)]
