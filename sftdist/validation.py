"""The one validation pass at the entry: what the schema's types cannot say. Hydra has already refused unknown
keys and values of the wrong type while composing; this checks choices (each declared once, with its field, by
``sftdist.config.choice``), ranges and combinations, and names the key and the value in one line.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import TYPE_CHECKING, Any

from sftdist.errors import ConfigError

if TYPE_CHECKING:
    from sftdist.config import (
        CurriculumConfig,
        DataConfig,
        EvalConfig,
        LoRAConfig,
        ModelConfig,
        SFTConfig,
        StrategyConfig,
        TrainConfig,
    )

TEMPLATE_ARGUMENTS = ("messages", "tools", "documents", "add_generation_prompt")  # what each render sets itself


def _choice(key: str, value: str, available: tuple[str, ...]) -> None:
    if value not in available:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(available)}")


def _positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value!r} must be {bound}")


def _between(key: str, value: float, low: float, high: float, *, high_open: bool = False) -> None:
    if not (low <= value < high if high_open else low <= value <= high):
        raise ConfigError(f"{key}={value!r} must be in [{low}, {high}{')' if high_open else ']'}")


def _not_empty(key: str, value: str | None) -> None:
    if value is not None and not value.strip():
        raise ConfigError(f"{key} is an empty string: give a path, or leave it unset (null)")


def _check_choices(node: Any, prefix: str = "") -> None:
    """Every field declared with ``choice(...)`` in the schema, at any depth (lists of sources included)."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), prefix + f.name
        if "choices" in f.metadata:
            _choice(key, value, f.metadata["choices"])
        elif dataclasses.is_dataclass(value):
            _check_choices(value, f"{key}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check_choices(item, f"{key}[{i}].")


def _check_deprecated(cfg: SFTConfig) -> None:
    if not cfg.model.gradient_checkpointing:
        return
    if cfg.model.activation_checkpointing == "selective":
        raise ConfigError(
            "model.gradient_checkpointing=true (activation_checkpointing=full) contradicts "
            "model.activation_checkpointing=selective: set one of them"
        )
    warnings.warn(
        "model.gradient_checkpointing=true is deprecated: it is model.activation_checkpointing=full (set that)",
        FutureWarning,
        stacklevel=2,
    )


def _validate_curriculum(c: CurriculumConfig) -> None:
    for key in ("thresholds", "quantiles"):
        values = list(getattr(c, key))
        if len(values) != 2 or values != sorted(values) or len(set(values)) < 2:
            raise ConfigError(
                f"curriculum.{key}={values}: give two increasing numbers (the easy|medium and medium|hard edges)"
            )
    if not all(0 < q < 1 for q in c.quantiles):
        raise ConfigError(f"curriculum.quantiles={list(c.quantiles)}: quantiles lie strictly between 0 and 1")
    if c.name == "none":
        return
    if not c.phases:
        raise ConfigError(f"curriculum={c.name} needs curriculum.phases: a list of {{until, easy, medium, hard}}")
    previous = 0.0
    for i, phase in enumerate(c.phases):
        weights = {"easy": phase.easy, "medium": phase.medium, "hard": phase.hard}
        negative = [k for k, w in weights.items() if w < 0]
        if negative:
            raise ConfigError(f"curriculum.phases[{i}].{negative[0]}={weights[negative[0]]!r} must be >= 0")
        if abs(sum(weights.values()) - 1.0) > 1e-6:
            raise ConfigError(f"curriculum.phases[{i}]: the weights {weights} sum to {sum(weights.values()):g}, not 1")
        if not previous < phase.until <= 1.0:
            raise ConfigError(
                f"curriculum.phases[{i}].until={phase.until!r}: phase ends must increase, within "
                f"(0, 1] (the previous ends at {previous})"
            )
        previous = phase.until
    if previous != 1.0:
        raise ConfigError(
            f"curriculum.phases[{len(c.phases) - 1}].until={previous!r}: the last phase must end at "
            "1.0 (the end of train.max_steps)"
        )


def _validate_context_parallel(cfg: SFTConfig) -> None:
    cp = cfg.strategy.context_parallel
    _positive("strategy.context_parallel", cp)
    if cp == 1:
        return
    if cfg.strategy.name == "none":
        raise ConfigError(
            f"strategy.context_parallel={cp} needs several processes: pick a distributed strategy (strategy=ddp|fsdp2|"
            "zero3)"
        )
    if not cfg.data.packing:
        raise ConfigError(f"strategy.context_parallel={cp} shards packed rows: it needs data.packing=true")
    if cfg.model.attn_impl not in ("auto", "sdpa"):
        raise ConfigError(
            f"model.attn_impl={cfg.model.attn_impl!r} has no context-parallel form yet: with "
            f"strategy.context_parallel={cp}, attention is sdpa's (model.attn_impl=auto or sdpa)"
        )


def _validate_strategy(s: StrategyConfig) -> None:
    """An option of another strategy, set away from its default, would be silently ignored: refuse it."""
    _positive("strategy.timeout_minutes", s.timeout_minutes)
    defaults = type(s)()
    for f in dataclasses.fields(s):
        key, owner = f.name, f.metadata.get("strategy")
        if owner is not None and s.name != owner and getattr(s, key) != getattr(defaults, key):
            raise ConfigError(
                f"strategy.{key}={getattr(s, key)!r} applies to strategy={owner} only (this run uses strategy={s.name})"
            )
    for key in ("reduce_bucket_size", "prefetch_bucket_size"):
        _positive(f"strategy.{key}", getattr(s, key))
    _positive("strategy.param_persistence_threshold", s.param_persistence_threshold, allow_zero=True)
    _not_empty("strategy.deepspeed_config", s.deepspeed_config)


def _validate_train(t: TrainConfig) -> None:
    for key in ("global_batch_size", "micro_batch_tokens", "log_every_steps"):
        _positive(f"train.{key}", getattr(t, key))
    _positive("train.skip_nonfinite_steps", t.skip_nonfinite_steps, allow_zero=True)
    for key in ("max_steps", "epochs", "lr", "peak_tflops"):
        if getattr(t, key) is not None:
            _positive(f"train.{key}", getattr(t, key))
    if t.max_steps is not None and t.epochs is not None:
        raise ConfigError(
            f"train.max_steps={t.max_steps} and train.epochs={t.epochs} are both set: the run's length is one of them "
            "(a recipe that sets train.max_steps: add train.max_steps=null)"
        )
    if t.max_steps is None and t.epochs is None:
        from sftdist.config import DEFAULT_MAX_STEPS

        t.max_steps = DEFAULT_MAX_STEPS
    check_stop_after_step(t)
    _positive("train.weight_decay", t.weight_decay, allow_zero=True)
    _positive("train.max_grad_norm", t.max_grad_norm, allow_zero=True)
    _positive("train.adam_eps", t.adam_eps)
    _between("train.min_lr_ratio", t.min_lr_ratio, 0.0, 1.0)
    _between("train.warmup_ratio", t.warmup_ratio, 0.0, 1.0)
    _between("train.adam_beta1", t.adam_beta1, 0.0, 1.0, high_open=True)
    _between("train.adam_beta2", t.adam_beta2, 0.0, 1.0, high_open=True)


def check_stop_after_step(t: TrainConfig) -> None:
    """(again once train.epochs is turned into steps)"""
    if t.stop_after_step is not None and t.max_steps is None:
        _positive("train.stop_after_step", t.stop_after_step)
    elif t.stop_after_step is not None and not 0 < t.stop_after_step <= t.max_steps:
        raise ConfigError(f"train.stop_after_step={t.stop_after_step} must be in [1, train.max_steps={t.max_steps}]")


def _validate_model(m: ModelConfig) -> None:
    _not_empty("model.name_or_path", m.name_or_path)
    _not_empty("model.tokenizer", m.tokenizer)
    for key in (
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "intermediate_size",
        "max_position_embeddings",
        "rope_theta",
    ):
        _positive(f"model.{key}", getattr(m, key))
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}")
    _validate_lora(m.lora)


def _validate_lora(lora: LoRAConfig) -> None:
    _positive("model.lora.r", lora.r)
    _positive("model.lora.alpha", lora.alpha)
    _between("model.lora.dropout", lora.dropout, 0.0, 1.0, high_open=True)
    if not lora.target_modules or any(not str(t).strip() for t in lora.target_modules):
        raise ConfigError(
            f"model.lora.target_modules={list(lora.target_modules)}: give module names (or suffixes such as "
            "q_proj), or [all-linear]"
        )
    if "all-linear" in lora.target_modules and len(lora.target_modules) > 1:
        raise ConfigError(
            f"model.lora.target_modules={list(lora.target_modules)}: all-linear already names every linear layer; "
            "give it alone or list the modules"
        )
    if lora.load_in_4bit and not lora.enabled:
        raise ConfigError("model.lora.load_in_4bit=true is QLoRA: it needs model.lora.enabled=true")


def _validate_data(d: DataConfig) -> None:
    for key in ("path", "chat_template", "prepared", "cache_dir"):
        _not_empty(f"data.{key}", getattr(d, key))
    if sum(x is not None and x != [] for x in (d.path, d.sources, d.prepared)) > 1:
        raise ConfigError("set one of data.path, data.sources and data.prepared, not several")
    _positive("data.mixing_temperature", d.mixing_temperature)
    for i, source in enumerate(d.sources):
        _not_empty(f"data.sources[{i}].path", source.path)
        _positive(f"data.sources[{i}].weight", source.weight)
    _validate_template_kwargs(d.chat_template_kwargs)
    _positive("data.max_length", d.max_length)
    _positive("data.demo_size", d.demo_size)
    _positive("data.num_proc", d.num_proc, allow_zero=True)
    _between("data.max_rejected_fraction", d.max_rejected_fraction, 0.0, 1.0)
    f = d.filters
    _between("data.filters.near_dedup_threshold", f.near_dedup_threshold, 0.0, 1.0)
    _between("data.filters.repetition_max_fraction", f.repetition_max_fraction, 0.0, 1.0)
    _positive("data.filters.min_response_chars", f.min_response_chars, allow_zero=True)
    _not_empty("data.filters.decontaminate", f.decontaminate)
    _positive("data.filters.decontaminate_ngram", f.decontaminate_ngram)


def _validate_template_kwargs(kwargs: dict) -> None:
    taken = sorted(set(kwargs) & set(TEMPLATE_ARGUMENTS))
    if taken:
        raise ConfigError(
            f"data.chat_template_kwargs.{taken[0]}: sftdist sets {', '.join(TEMPLATE_ARGUMENTS)} itself at each "
            "render; give the template's own arguments only (enable_thinking, reasoning_effort, ...)"
        )
    try:
        json.dumps(kwargs, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"data.chat_template_kwargs={kwargs!r}: the values must be plain data ({err})") from err


def _validate_eval_extras(e: EvalConfig) -> None:
    for i, source in enumerate(e.sources):
        _not_empty(f"eval.sources[{i}].path", source.path)
    p = e.probes
    _not_empty("eval.probes.path", p.path)
    _positive("eval.probes.num", p.num, allow_zero=True)
    for key in ("max_new_tokens", "batch_size", "repetition_ngram"):
        _positive(f"eval.probes.{key}", getattr(p, key))
    if p.length_factor < 1:
        raise ConfigError(f"eval.probes.length_factor={p.length_factor!r} must be >= 1")


def validate(cfg: SFTConfig) -> SFTConfig:
    """Check what types cannot; raise ConfigError naming the key and value. Returns cfg."""
    _check_choices(cfg)
    _check_deprecated(cfg)
    _not_empty("resume", cfg.resume)
    _validate_strategy(cfg.strategy)
    _validate_curriculum(cfg.curriculum)
    _validate_train(cfg.train)
    _validate_model(cfg.model)
    _validate_data(cfg.data)
    d = cfg.data
    if d.max_length > cfg.train.micro_batch_tokens:
        raise ConfigError(
            f"data.max_length={d.max_length} is larger than train.micro_batch_tokens={cfg.train.micro_batch_tokens}: "
            "every sample must fit in one micro-batch; raise train.micro_batch_tokens or lower data.max_length"
        )
    _positive("eval.every_steps", cfg.eval.every_steps, allow_zero=True)
    _positive("eval.holdout_records", cfg.eval.holdout_records, allow_zero=True)
    _validate_eval_extras(cfg.eval)
    _positive("wandb.init_timeout_s", cfg.wandb.init_timeout_s)
    if cfg.eval.every_steps and not cfg.eval.holdout_records:
        raise ConfigError(
            f"eval.every_steps={cfg.eval.every_steps} needs eval.holdout_records > 0 (records set aside for eval); "
            "set eval.every_steps=0 to turn eval off"
        )
    _validate_best(cfg)
    _validate_context_parallel(cfg)
    _positive("checkpoint.every_steps", cfg.checkpoint.every_steps, allow_zero=True)
    _positive("checkpoint.keep", cfg.checkpoint.keep)
    _positive("checkpoint.stop_timeout_s", cfg.checkpoint.stop_timeout_s)
    _positive("seed", cfg.seed, allow_zero=True)
    if not cfg.output_dir.strip():
        raise ConfigError("output_dir is empty: set output_dir=PATH")
    _resolve_defaults(cfg)
    return cfg


def _validate_best(cfg: SFTConfig) -> None:
    c, t = cfg.checkpoint, cfg.train
    _positive("train.early_stopping_patience", t.early_stopping_patience, allow_zero=True)
    _positive("train.early_stopping_min_delta", t.early_stopping_min_delta, allow_zero=True)
    if c.keep_best is not None and not c.keep_best.startswith("eval/"):
        raise ConfigError(f"checkpoint.keep_best={c.keep_best!r} must be an eval metric (eval/loss, ...)")
    for key, needs_best in (
        ("train.early_stopping_patience", t.early_stopping_patience),
        ("checkpoint.export_best", c.export_best),
    ):
        if needs_best and c.keep_best is None:
            raise ConfigError(f"{key}={needs_best!r} needs checkpoint.keep_best: the eval metric to watch (eval/loss)")
    if c.keep_best is not None and not cfg.eval.every_steps:
        raise ConfigError(f"checkpoint.keep_best={c.keep_best!r} needs evals: set eval.every_steps")


def _resolve_defaults(cfg: SFTConfig) -> None:
    """train.lr by the run's kind, when unset (the plan line says it, sftdist.training.steplog). (train.max_steps unset
    without train.epochs is DEFAULT_MAX_STEPS, set in _validate_train; with epochs, the trainer counts the steps once
    the data is prepared.)"""
    from sftdist.config import DEFAULT_LR, run_kind

    if cfg.train.lr is None:
        cfg.train.lr = DEFAULT_LR[run_kind(cfg)]
