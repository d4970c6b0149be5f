"""The config: every shipped option composes and validates, and bad input fails naming the key."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hydra.errors import ConfigCompositionException

from helpers import REPO, compose
from sftdist.config import ConfigError, SFTConfig, unknown_key

CONF = REPO / "conf"


def _group_options():
    """The options of the groups that mirror the schema (recipe/ holds whole runs: tests/unit/test_recipes.py)."""
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name in SFTConfig.__dataclass_fields__):
        for option in sorted(group.glob("*.yaml")):
            yield group.name, option.stem


def test_defaults_compose_to_the_demo():
    cfg = compose()
    assert isinstance(cfg, SFTConfig)
    assert (cfg.model.name, cfg.data.name, cfg.strategy.name, cfg.curriculum.name) == ("tiny", "demo", "none", "none")
    assert cfg.model.name_or_path is None and cfg.data.path is None


@pytest.mark.parametrize("group,option", list(_group_options()))
def test_every_shipped_option_composes_and_validates(group, option):
    cfg = compose(f"{group}={option}")
    assert getattr(cfg, group).name == option


def test_three_phase_yaml_holds_the_mission_schedule():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from omegaconf import OmegaConf

    from sftdist.config import register_configs

    register_configs()
    with initialize_config_module(config_module="sftdist.conf", version_base="1.3"):
        raw = hydra_compose(config_name="sft", overrides=["curriculum=three_phase"])
    phases = OmegaConf.to_container(raw.curriculum.phases)
    assert [(p["until"], p["easy"], p["medium"], p["hard"]) for p in phases] == [
        (0.2, 0.9, 0.1, 0.0),
        (0.6, 0.3, 0.5, 0.2),
        (1.0, 0.1, 0.4, 0.5),
    ]


# Every override key of DESIGN.md's contract exists from now on (some accept only their first value).
CONTRACT_OVERRIDES = [
    "output_dir=/tmp/x",
    "model=tiny",
    "model.name_or_path=/tmp/m",
    "data=demo",
    "data.path=/tmp/d.jsonl",
    "data.format=auto",
    "data.format=messages",
    "data.format=alpaca",
    "data.format=sharegpt",
    "data.truncation=truncate",
    "data.max_rejected_fraction=0.2",
    "data.chat_template=/tmp/t.jinja",
    "strategy=none",
    "train.max_steps=7",
    "train.global_batch_size=4",
    "train.micro_batch_tokens=2048",
    "train.lr=2e-5",
    "seed=3",
    "precision=fp32",
    "precision=bf16",
    "data.packing=false",
    "data.packing=true",
    "curriculum=none",
    "curriculum=three_phase",
    "curriculum.difficulty=length",
    "checkpoint.every_steps=0",
    "checkpoint.every_steps=10",
    "resume=/tmp/ckpt",
    "model.trust_remote_code=true",
    "checkpoint.keep=3",
    "resume=auto",
    "resume=never",
    "wandb.mode=offline",
    "wandb.mode=online",
    "wandb.mode=disabled",
    "eval.every_steps=5",
]


@pytest.mark.parametrize("override", CONTRACT_OVERRIDES)
def test_contract_override_keys_exist(override):
    key, value = override.split("=", 1)
    cfg = compose(override)
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    if dataclasses.is_dataclass(node):
        assert node.name == value
    else:
        assert str(node).lower() == value.lower() or float(node) == float(value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.chat_template_kwargs={enable_thinking: false}"],
        ["data.chat_template_kwargs.enable_thinking=false"],
        ["++data.chat_template_kwargs={enable_thinking: false}"],
    ],
)
def test_chat_template_arguments_are_a_mapping_of_the_user_s_own_keys(overrides):
    assert compose(*overrides).data.chat_template_kwargs == {"enable_thinking": False}
    assert compose().data.chat_template_kwargs == {}
    # a recipe's arguments and the command line's add up, as Hydra merges mappings; ~KEY removes one
    both = ["data.chat_template_kwargs={reasoning_effort: low}", "data.chat_template_kwargs={enable_thinking: false}"]
    assert compose(*both).data.chat_template_kwargs == {"reasoning_effort": "low", "enable_thinking": False}
    assert compose(*both, "~data.chat_template_kwargs.reasoning_effort").data.chat_template_kwargs == {
        "enable_thinking": False
    }


@pytest.mark.parametrize(
    "override,message",
    [
        ("precision=fp16", "precision='fp16' is not one of: fp32, bf16"),
        ("wandb.mode=sometimes", "wandb.mode='sometimes' is not one of"),
        ("strategy.name=megatron", "strategy.name='megatron' is not one of"),
        (
            "strategy.cpu_offload=true",
            "strategy.cpu_offload=True applies to strategy=fsdp2 only (this run uses strategy=none)",
        ),
        ("strategy=fsdp2  strategy.offload_params=true", "strategy.offload_params=True applies to strategy=zero3 only"),
        ("strategy=zero3  strategy.grad_sync=last", "strategy.grad_sync='last' applies to strategy=fsdp2 only"),
        ("strategy=fsdp2  strategy.grad_sync=never", "strategy.grad_sync='never' is not one of: every, last"),
        ("train.loss_impl=fused", "train.loss_impl='fused' is not one of: auto, chunked, naive"),
        (
            "model.activation_checkpointing=some",
            "model.activation_checkpointing='some' is not one of: none, full, selective",
        ),
        (
            "model.gradient_checkpointing=true  model.activation_checkpointing=selective",
            "model.gradient_checkpointing=true (activation_checkpointing=full) contradicts "
            "model.activation_checkpointing=selective",
        ),
        ("strategy=zero3  strategy.reduce_bucket_size=0", "strategy.reduce_bucket_size=0 must be > 0"),
        ("train.peak_tflops=0", "train.peak_tflops=0.0 must be > 0"),
        ("train.max_steps=0", "train.max_steps=0 must be > 0"),
        ("train.lr=-1", "train.lr=-1.0 must be > 0"),
        ("train.epochs=0", "train.epochs=0.0 must be > 0"),
        ("checkpoint.keep_best=loss", "checkpoint.keep_best='loss' must be an eval metric (eval/loss, ...)"),
        ("checkpoint.export_best=true", "checkpoint.export_best=True needs checkpoint.keep_best: the eval metric"),
        ("train.early_stopping_patience=3", "train.early_stopping_patience=3 needs checkpoint.keep_best"),
        ("checkpoint.keep_best=eval/loss  eval.every_steps=0", "checkpoint.keep_best='eval/loss' needs evals"),
        ("train.skip_nonfinite_steps=-1", "train.skip_nonfinite_steps=-1 must be >= 0"),
        ("data.mixing_temperature=0", "data.mixing_temperature=0.0 must be > 0"),
        ("train.max_steps=5  train.epochs=1", "train.max_steps=5 and train.epochs=1.0 are both set"),
        ("train.epochs=1  train.stop_after_step=0", "train.stop_after_step=0 must be > 0"),
        ("train.warmup_ratio=1.5", "train.warmup_ratio=1.5 must be in [0.0, 1.0]"),
        ("train.adam_beta2=1.0", "train.adam_beta2=1.0 must be in [0.0, 1.0)"),
        ("seed=-1", "seed=-1 must be >= 0"),
        ("model.rope_theta=-5", "model.rope_theta=-5.0 must be > 0"),
        ("model.name_or_path=''", "model.name_or_path is an empty string"),
        ("data.path=' '", "data.path is an empty string"),
        ("data.max_length=8192", "data.max_length=8192 is larger than train.micro_batch_tokens=4096"),
        ("model.num_heads=3", "model.hidden_size=256 is not divisible by model.num_heads=3"),
        ("eval.holdout_records=0", "eval.every_steps=50 needs eval.holdout_records > 0"),
        (
            "data.chat_template_kwargs={tools: [], enable_thinking: false}",
            "data.chat_template_kwargs.tools: sftdist sets messages, tools, documents, add_generation_prompt itself",
        ),
        ("+model.bar=2", "unknown key model.bar"),
        ("+bar=2", "unknown key bar"),
    ],
)
def test_bad_values_fail_naming_key_and_value(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose(*override.split("  "))


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.foo=1", "train.foo"),
        ("train.max_steps=abc", "train.max_steps"),
        ("precision=[1]", "precision"),
        ("data.packing=maybe", "data.packing"),
    ],
)
def test_unknown_keys_and_wrong_types_fail_at_composition(override, key):
    with pytest.raises(ConfigCompositionException) as info:
        compose(*override.split("  "))
    text = str(info.value) + str(info.value.__cause__)
    assert key.split(".")[-1] in text and override in text


def test_an_unset_lr_is_the_default_for_the_runs_kind_and_a_set_one_is_used_as_given():
    assert compose().train.lr == 1e-3  # the tiny demo model, from scratch (its plan line says so: test_train_demo)
    assert compose("model.name_or_path=/models/m").train.lr == 2e-5
    assert compose("model.name_or_path=/models/m", "model.lora.enabled=true").train.lr == 2e-4
    assert compose("model.name_or_path=/models/m", "train.lr=1e-3").train.lr == 1e-3
    assert compose("model.lora.enabled=true", "train.lr=0.5").train.lr == 0.5


def test_the_run_length_is_max_steps_or_epochs_and_200_steps_without_either():
    assert compose().train.max_steps == 200
    assert compose("train.max_steps=7").train.max_steps == 7
    by_epochs = compose("train.epochs=1.5").train
    assert by_epochs.max_steps is None and by_epochs.epochs == 1.5  # counted by the trainer, once the data is known


def test_an_override_of_an_unknown_key_is_named_with_the_nearest_key():
    assert unknown_key("train.global_batch_sizee") == (
        "unknown key train.global_batch_sizee (did you mean train.global_batch_size?)"
    )
    assert unknown_key("model.lora.rr") == "unknown key model.lora.rr (did you mean model.lora.r?)"
    assert unknown_key("recipee", groups=("recipe",)) == "unknown key recipee (did you mean recipe?)"
    assert unknown_key("zzz") == "unknown key zzz; the README lists every key"
    for known in ("train.lr", "model.lora.r", "model", "data.sources", "data.chat_template_kwargs.enable_thinking"):
        assert unknown_key(known) is None, known
    assert unknown_key("recipe", groups=("recipe",)) is None


def _schema_keys(schema=SFTConfig, prefix=""):
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _schema_keys(type(default), f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_readme_documents_every_config_key():
    readme = (REPO / "README.md").read_text()
    missing = [key for key in _schema_keys() if f"`{key}`" not in readme]
    assert not missing, f"README's configuration reference lacks: {missing}"


def _flat(node, prefix=""):
    """{"train.lr": 0.001, ...} of a nested dict (lists are values)."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# What a group option is for: the values it sets on purpose, away from the schema's defaults.
OPTION_VALUES = {("curriculum", "three_phase"): {"curriculum.phases"}}


def test_the_yaml_files_state_only_what_an_option_is_for():
    """Every default is stated once, in the schema: sft.yaml holds the defaults list and Hydra's settings only, and a
    group option sets its name and what OPTION_VALUES says it is for, nothing else (a default restated in a YAML
    file would silently win over the schema's once the two drift apart)."""
    from omegaconf import OmegaConf

    top = OmegaConf.to_container(OmegaConf.load(CONF / "sft.yaml"))
    assert set(top) == {"defaults", "hydra"}, sorted(top)
    for group, option in _group_options():
        values = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
        allowed = {f"{group}.name"} | OPTION_VALUES.get((group, option), set())
        assert set(_flat(values, f"{group}.")) == allowed, f"{group}/{option}.yaml"
        assert values["name"] == option


def test_a_choice_is_declared_once_with_its_field_and_its_default_is_one_of_them():
    schema = SFTConfig()
    declared = {}

    def walk(node, prefix=""):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if "choices" in f.metadata:
                assert value in f.metadata["choices"], prefix + f.name
                declared[prefix + f.name] = f.metadata["choices"]
            elif dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")

    walk(schema)
    assert declared["model.attn_impl"] == ("auto", "flash_attn", "torch_varlen", "flex", "sdpa")
    assert declared["strategy.name"] == ("none", "ddp", "fsdp2", "zero3")
    for group in ("strategy", "curriculum"):  # every choice has its group option, and no option lacks a choice
        assert set(declared[f"{group}.name"]) == {o for g, o in _group_options() if g == group}


def test_the_readme_states_the_schema_defaults():
    """The configuration reference's default column is the schema's default, for every key."""
    from omegaconf import OmegaConf

    schema = _flat(dataclasses.asdict(SFTConfig()))
    rows = re.findall(r"^\| `([\w.]+)` \| ([^|]+) \|", (REPO / "README.md").read_text(), flags=re.MULTILINE)
    documented = {key: cell.strip() for key, cell in rows if key in schema}
    assert set(documented) == set(schema)
    wrong = []
    for key, cell in documented.items():
        value = None if cell == "unset" else OmegaConf.to_container(OmegaConf.create(f"v: {cell.strip('`')}"))["v"]
        if value != schema[key]:
            wrong.append(f"{key}: README {cell}, schema {schema[key]!r}")
    assert not wrong, wrong


def test_gradient_checkpointing_still_means_full_and_says_it_is_deprecated():
    from sftdist.model.build import activation_checkpointing

    with pytest.warns(FutureWarning, match="model.gradient_checkpointing=true is deprecated.*activation_checkpointing"):
        cfg = compose("model.gradient_checkpointing=true")
    assert activation_checkpointing(cfg.model) == "full"
