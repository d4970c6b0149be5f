"""sftdist.model.lora: the config's checks, the adapters' seeded first values, the weights a strategy loads, the merge
against peft's own, the adapter file's layout, and where QLoRA is refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from helpers import compose
from sftdist.errors import ConfigError
from sftdist.model import build_model, build_tokenizer, model_weights
from sftdist.model.lora import (
    ADAPTER_WEIGHTS,
    base_name,
    check_qlora,
    initial_adapter,
    is_adapter,
    merge,
    write_adapter,
)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.lora.r=0", "model.lora.r=0 must be > 0"),
        ("model.lora.alpha=-1", "model.lora.alpha=-1.0 must be > 0"),
        ("model.lora.dropout=1.0", r"model.lora.dropout=1.0 must be in \[0.0, 1.0\)"),
        ("model.lora.target_modules=[]", "give module names"),
        ("model.lora.target_modules=[all-linear,q_proj]", "all-linear already names every linear layer"),
        ("model.lora.load_in_4bit=true", "needs model.lora.enabled=true"),
    ],
)
def test_bad_lora_settings_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        compose(override)


@pytest.fixture(scope="module")
def lora_cfg():
    return compose("model.lora.enabled=true", "model.lora.r=4")


@pytest.fixture(scope="module")
def tokenizer(lora_cfg):
    return build_tokenizer(lora_cfg.model, lora_cfg.data)[0]


def test_first_values_come_from_the_seed_and_the_name_alone():
    name = "model.layers.0.self_attn.q_proj.lora_A.default.weight"
    a = initial_adapter(name, (4, 256), seed=0)
    assert torch.equal(a, initial_adapter(name, (4, 256), seed=0))
    assert not torch.equal(a, initial_adapter(name, (4, 256), seed=1))
    assert not torch.equal(a, initial_adapter(name.replace("q_proj", "k_proj"), (4, 256), seed=0))
    assert a.abs().max() <= 1 / 16 and a.abs().max() > 0.9 / 16  # peft's uniform(+-1/sqrt(in_features))
    assert torch.equal(initial_adapter(name.replace("lora_A", "lora_B"), (256, 4), seed=0), torch.zeros(256, 4))


def test_a_model_built_whole_and_one_loaded_by_a_strategy_start_from_the_same_weights(lora_cfg, tokenizer):
    model = build_model(lora_cfg.model, tokenizer, lora_cfg.seed)
    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if p.requires_grad} == {n for n in params if is_adapter(n)}
    assert sum(is_adapter(n) for n in params) == 4 * 7 * 2  # every linear layer of the 4 blocks, A and B
    assert "lm_head.weight" in params and not params["lm_head.weight"].requires_grad  # (not the output head)
    weights = model_weights(lora_cfg.model, tokenizer, lora_cfg.seed, list(params))  # what fsdp2 and zero3 load
    assert set(params) <= weights.names
    assert all(torch.equal(weights.get(n, p.shape), p) for n, p in params.items())


def test_the_merge_is_peft_s_own(lora_cfg, tokenizer):
    model = build_model(lora_cfg.model, tokenizer, lora_cfg.seed)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_()  # (zero at first: the merge would be the base)
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if is_adapter(n)}
    base = {base_name(n): p.detach() for n, p in model.named_parameters() if not is_adapter(n)}
    merged = merge(_weights(base), list(base), adapters, lora_cfg.model.lora)
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight"):
            expected = module.base_layer.weight + module.get_delta_weight("default")
            torch.testing.assert_close(merged[f"{name}.weight"], expected, rtol=0, atol=1e-6)
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])
    with pytest.raises(ValueError, match="the base model does not have"):
        merge(_weights(base), ["model.norm.weight"], adapters, lora_cfg.model.lora)


def _weights(state: dict[str, torch.Tensor]):
    from sftdist.model import ModelWeights

    return ModelWeights.from_state_dict(state)


def test_the_adapter_file_is_laid_out_as_peft_saves_it(lora_cfg, tmp_path):
    adapters = {"model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.ones(4, 8)}
    write_adapter(tmp_path, adapters, lora_cfg.model.lora, None)
    saved = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    assert list(saved) == ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]


def test_qlora_is_refused_where_it_cannot_run(lora_cfg):
    lora = compose("model.lora.enabled=true", "model.lora.load_in_4bit=true").model.lora
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        check_qlora(lora, "some/model", "none", torch.device("cpu"))
    with pytest.raises(ConfigError, match="strategy=none or ddp; with strategy=fsdp2"):
        check_qlora(lora, "some/model", "fsdp2", torch.device("cuda"))
    with pytest.raises(ConfigError, match="set model.name_or_path"):
        check_qlora(lora, None, "ddp", torch.device("cuda"))
    check_qlora(lora_cfg.model.lora, None, "zero3", torch.device("cpu"))  # plain LoRA: nothing to check


def test_mfu_counts_no_weight_gradient_for_the_frozen_base(lora_cfg, tokenizer):
    from sftdist.metrics.flops import ModelDims

    model = build_model(lora_cfg.model, tokenizer, lora_cfg.seed)
    dims = ModelDims.of(model)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embedding = model.get_input_embeddings().weight.numel()
    assert dims.matmul_params == sum(p.numel() for p in model.parameters()) - embedding
    assert dims.frozen_params == dims.matmul_params - trained
    attention = 6 * dims.layers * dims.width * 100 * 100
    assert dims.flops([100]) == 100 * (6 * trained + 4 * dims.frozen_params) + attention


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("model.lora.target_modules=[embed_tokens]",), "model.embed_tokens is a Embedding, not a linear layer"),
        (("model.lora.target_modules=[lm_head]", "model.tie_word_embeddings=true"), "lm_head shares its weight"),
    ],
)
def test_adapters_on_anything_but_a_plain_linear_layer_are_refused(tokenizer, overrides, message):
    cfg = compose("model.lora.enabled=true", *overrides)
    with pytest.raises(ConfigError, match=message):
        build_model(cfg.model, tokenizer, cfg.seed)


def test_an_untied_output_head_may_be_adapted(tokenizer):
    cfg = compose("model.lora.enabled=true", "model.lora.target_modules=[lm_head]")
    model = build_model(cfg.model, tokenizer, cfg.seed)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "lm_head.lora_A.default.weight",
        "lm_head.lora_B.default.weight",
    ]
