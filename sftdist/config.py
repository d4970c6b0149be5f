"""The typed schema of every config group, and the one validation pass at the entry.

Hydra YAML under ``conf/`` holds the values; these dataclasses are the schema. Hydra rejects an
unknown key or a value of the wrong type while composing (naming the key); :func:`validate` then
checks what types cannot: choices, ranges and combinations, and names the key and value too.
Each field is documented once, here; the README's reference table repeats the names.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, get_args, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, ValidationError

from sftdist.errors import ConfigError


@dataclass
class LoRAConfig:
    # Train low-rank adapters (peft's LoRA) on a frozen base model instead of every weight: the optimizer and the
    # checkpoints hold the adapters only. The run exports the adapter (final/) and the merged model (final_merged/).
    enabled: bool = False
    r: int = 16  # the adapters' rank
    alpha: float = 32.0  # the update is scaled by alpha / r
    dropout: float = 0.05  # dropout on the adapters' input (0 makes runs on any number of processes equal)
    # Module names (or suffixes) to adapt; all-linear: every linear layer of the decoder blocks (not the output head)
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    merged_export: bool = True  # also write the base with the adapter merged in (final_merged/, sftdist-export)
    # QLoRA: the frozen base in 4-bit NF4 (bitsandbytes; CUDA only, strategy none or ddp, a model.name_or_path)
    load_in_4bit: bool = False


@dataclass
class ModelConfig:
    name: str = "tiny"  # a label for logs and W&B
    name_or_path: Optional[str] = None  # local Hugging Face model directory; unset builds the tiny demo model
    tokenizer: Optional[str] = None  # tokenizer directory; default: name_or_path, else the bundled demo tokenizer
    trust_remote_code: bool = False  # run Python code shipped in the model directory (auto_map); only code you trust
    # Recompute activations in backward: full (every decoder block: least memory, ~30% more compute) | selective
    # (keep the matrix products' outputs, recompute the cheap element-wise ops: less memory for ~5% more compute)
    activation_checkpointing: str = "none"  # none | full | selective
    gradient_checkpointing: bool = False  # the older spelling of activation_checkpointing=full
    compile: bool = False  # torch.compile each decoder block (the first steps compile; later ones run faster)
    attn_impl: str = "auto"  # packed attention: auto | flash_attn | torch_varlen | flex | sdpa
    # Architecture of the tiny Llama-shaped demo model (ignored when name_or_path is set).
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 688
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class SourceConfig:
    path: str = "???"  # a data file, a directory or glob of them (shards), or a saved Hugging Face dataset directory
    format: str = "auto"  # auto | messages | alpaca | sharegpt | prompt_completion
    split: str = "train"  # the split of a saved DatasetDict
    weight: float = 1.0  # sampling weight: 2.0 uses each record twice, 0.5 a seeded half of them
    name: Optional[str] = None  # label in reports and meta.source; default: the file name without suffix


@dataclass
class FiltersConfig:
    exact_dedup: bool = True  # drop repeats of a conversation (lower-cased, white space collapsed)
    near_dedup: bool = False  # drop near-repeats (MinHash over word 5-grams, LSH), first one kept
    near_dedup_threshold: float = 0.85  # estimated Jaccard similarity at or above which two records are near-repeats
    repetition: bool = True  # drop responses dominated by repeated n-grams (degenerate loops)
    repetition_max_fraction: float = (
        0.5  # the share of a response's word 3-grams that repeat, above which it is dropped
    )
    short_response: bool = False  # drop records whose shortest trained response is too short
    min_response_chars: int = 2  # with short_response: fewer non-space characters is too short
    decontaminate: Optional[str] = None  # eval data file (any supported format): drop records sharing an n-gram with it
    decontaminate_ngram: int = 13  # word n-gram length for decontamination (13 as in the GPT-3 paper)


@dataclass
class DataConfig:
    name: str = "demo"  # a label for logs and W&B
    # One source: a .jsonl/.json(.gz|.zst)/.parquet file, a directory or glob of them (shards, as one source), or a
    # saved Hugging Face dataset directory; unset (and no sources) generates the demo
    path: Optional[str] = None
    format: str = "auto"  # format of data.path: auto | messages | alpaca | sharegpt | prompt_completion
    split: str = "train"  # the split of a saved DatasetDict at data.path
    sources: List[SourceConfig] = field(default_factory=list)  # several sources with weights, instead of path
    prepared: Optional[str] = None  # a directory written by sftdist-prepare: train on it, skip preparation
    chat_template: Optional[str] = None  # Jinja file that replaces the tokenizer's chat template
    # Arguments of the chat template, passed to every render ({enable_thinking: false}, {reasoning_effort: low}, ...);
    # saved in final/sftdist_training.json: a server must pass the same (its requests' chat_template_kwargs)
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)
    # The empty think block a template writes on answers without reasoning (Qwen3, GLM-4.5): mask keeps it as context
    # (the model is not taught to skip thinking), train supervises it
    empty_think: str = "mask"
    packing: bool = True  # true: whole samples packed into rows, varlen attention; false: padded rows
    max_length: int = 1024  # longest sample in tokens; longer conversations follow data.truncation
    truncation: str = "drop"  # drop: reject over-long conversations; truncate: keep what fits (turn-aware)
    max_rejected_fraction: float = 0.05  # stop before training when more of the records are invalid
    num_proc: int = 0  # processes that encode; 0 picks by data size and cores
    cache: bool = True  # reuse prepared data keyed by a fingerprint of files, tokenizer, template and settings
    cache_dir: Optional[str] = None  # default: $SFTDIST_CACHE_DIR, else ~/.cache/sftdist
    demo_size: int = 2000  # conversations generated for the demo when no path or sources are set
    filters: FiltersConfig = field(default_factory=FiltersConfig)


@dataclass
class TrainConfig:
    max_steps: int = 200  # optimizer steps
    global_batch_size: int = 16  # samples (conversations, or a conversation's serving-exact samples) per step
    micro_batch_tokens: int = 4096  # token budget of one micro-batch, padding included
    lr: float = 1.0e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    warmup_ratio: float = 0.05  # fraction of max_steps with linear warm-up
    weight_decay: float = 0.0  # AdamW decoupled weight decay on matrices (not norms or biases)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    max_grad_norm: float = 1.0  # clip the global gradient norm to this; 0 turns clipping off
    log_every_steps: int = 1  # metrics cadence (the first and last steps are always logged)
    peak_tflops: Optional[float] = None  # per-GPU peak for train/mfu; default: known GPUs' dense bf16 peak
    stop_after_step: Optional[int] = None  # stop with a checkpoint after this step (one job of a longer run)
    # The loss: auto (chunked where the model allows it) | chunked (the output head on supervised tokens only, a
    # chunk at a time: the full logits never exist) | naive (the model's logits, then cross-entropy)
    loss_impl: str = "auto"


@dataclass
class StrategyConfig:
    name: str = "none"  # none | ddp | fsdp2 | zero3
    timeout_minutes: int = 60  # collective timeout (rank 0 prepares the data while the others wait)
    # fsdp2 (torch.distributed.fsdp.fully_shard per decoder layer and the root)
    reshard_after_forward: bool = True  # free gathered layer weights after forward (ZeRO-3-like); false: ZeRO-2-like
    cpu_offload: bool = False  # keep sharded parameters, gradients and optimizer state on CPU
    # Reduce-scatter gradients after every micro-batch (every: least memory) or only after a step's last one
    # (last: one reduction per step, unsharded gradients held meanwhile)
    grad_sync: str = "every"
    # zero3 (DeepSpeed stage 3; its config generated from these, deepspeed_config merged on top)
    overlap_comm: bool = True  # overlap gradient reduction with backward
    reduce_bucket_size: int = 50_000_000  # elements per gradient reduce bucket
    prefetch_bucket_size: int = 50_000_000  # elements of parameters prefetched ahead of use
    param_persistence_threshold: int = 100_000  # parameters smaller than this stay gathered
    offload_optimizer: bool = False  # optimizer state and fp32 master weights on CPU
    offload_params: bool = False  # parameters on CPU between uses
    deepspeed_config: Optional[str] = None  # a DeepSpeed JSON whose keys override the generated config


@dataclass
class PhaseConfig:
    until: float = 1.0  # phase ends at this fraction of train.max_steps
    easy: float = 0.0  # sampling weights of the difficulty buckets in this phase (they sum to 1)
    medium: float = 0.0
    hard: float = 0.0


@dataclass
class CurriculumConfig:
    name: str = "none"  # none (uniform) | three_phase (the mixture of each step follows curriculum.phases)
    phases: List[PhaseConfig] = field(default_factory=list)  # phase ends increase and end at 1.0
    difficulty: str = "meta"  # meta (the record's own label) | length | turns | model_loss
    thresholds: List[float] = field(default_factory=lambda: [1.0, 2.0])  # meta: a number below the first is easy...
    quantiles: List[float] = field(default_factory=lambda: [1 / 3, 2 / 3])  # bucket edges for length/turns/model_loss
    on_missing: str = "fallback"  # meta: an unlabelled record is scored by curriculum.fallback | reject: left out
    fallback: str = "length"  # length | turns | model_loss
    on_empty: str = "error"  # error | renormalise: a phase that draws from an empty bucket


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # a resumable checkpoint every N steps and at the last; 0: only when stopped by a signal
    keep: int = 2  # newest complete checkpoints kept; the one resumed from stays until a newer one is complete
    stop_timeout_s: float = 300.0  # after a stop signal, exit anyway (status 128 + signal) if not stopped by then


@dataclass
class EvalSourceConfig:
    path: str = "???"  # an eval data file (jsonl, json, parquet or dataset dir), never trained on
    format: str = "auto"  # auto | messages | alpaca | sharegpt | prompt_completion
    split: str = "train"  # the split of a saved DatasetDict (its test split, say)
    name: Optional[str] = None  # its metrics are eval/<name>/loss; default: the file name without suffix


@dataclass
class ProbesConfig:
    # Generation probes at every eval: greedy answers to fixed prompts, checked for format (see the README).
    path: Optional[str] = None  # probe file (jsonl); unset: the demo's own set for the demo, else held-out prompts
    num: int = 32  # without a file: probes from the first `num` held-out conversations; 0 turns probes off
    max_new_tokens: int = 128  # generation limit per probe (a response that reaches it did not stop)
    batch_size: int = 8  # probes generated together; batches are dealt to the ranks whole
    repetition_ngram: int = 3  # eval/repetition_rate counts repeated word n-grams of this n within a response
    length_factor: float = 3.0  # held-out probes: the response's word count within this factor of the reference's


@dataclass
class EvalConfig:
    every_steps: int = 50  # held-out loss every N steps and at the last step; 0 turns eval off
    holdout_records: int = 64  # records set aside from the training data for eval (chosen by seed)
    before_training: bool = True  # also evaluate once before the first step (logged at step 0): the baseline
    sources: List[EvalSourceConfig] = field(default_factory=list)  # extra eval sets: eval/<name>/loss
    probes: ProbesConfig = field(default_factory=ProbesConfig)


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto | offline | online | disabled; auto: online if a W&B key is configured, else offline
    project: str = "sftdist"
    entity: Optional[str] = None
    name: Optional[str] = None  # run name; default: the output_dir's folder name
    tags: List[str] = field(default_factory=list)
    init_timeout_s: float = 60.0  # online start-up longer than this (no network, a bad key): warn, log offline


@dataclass
class SFTConfig:
    output_dir: str = "outputs/sft"  # everything a run writes goes under it
    seed: int = 0  # model init and data order
    precision: str = "fp32"  # fp32 | bf16 (bf16 autocast over fp32 master weights)
    device: str = "auto"  # auto | cpu | cuda
    resume: str = "auto"  # auto: the newest complete checkpoint in output_dir, if any | never | PATH (a checkpoint)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


SCHEMA_NAME = "sft_schema"


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (``conf/sft.yaml`` lists it in its defaults)."""
    from hydra.core.config_store import ConfigStore

    schema = OmegaConf.structured(SFTConfig)
    # a mapping of the user's own keys: `data.chat_template_kwargs={...}` adds them without Hydra's `++`
    OmegaConf.set_struct(schema.data.chat_template_kwargs, False)
    ConfigStore.instance().store(name=SCHEMA_NAME, node=schema)


FORMATS = ("auto", "messages", "alpaca", "sharegpt", "prompt_completion")  # auto and sftdist.data.formats.FORMATS
SCORERS = ("length", "turns", "model_loss")  # curriculum difficulty from the data or the model (besides meta)
LOSS_IMPLS = ("auto", "chunked", "naive")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
# model.* keys that say how the model runs, not what it is: they may change between a run and its resume.
MODEL_EXECUTION_KEYS = (
    "name",
    "gradient_checkpointing",
    "activation_checkpointing",
    "compile",
    "attn_impl",
    "trust_remote_code",
    "lora.merged_export",
)


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


def _not_empty(key: str, value: Optional[str]) -> None:
    if value is not None and not value.strip():
        raise ConfigError(f"{key} is an empty string: give a path, or leave it unset (null)")


def _validate_features(cfg: SFTConfig) -> None:
    """Choices, including values that a later version implements."""
    _choice("precision", cfg.precision, ("fp32", "bf16"))
    _choice("device", cfg.device, ("auto", "cpu", "cuda"))
    _choice("strategy.name", cfg.strategy.name, ("none", "ddp", "fsdp2", "zero3"))
    _validate_strategy(cfg.strategy)
    _choice("curriculum.name", cfg.curriculum.name, ("none", "three_phase"))
    _validate_curriculum(cfg.curriculum)
    _choice("data.format", cfg.data.format, FORMATS)
    _choice("data.truncation", cfg.data.truncation, ("drop", "truncate"))
    _choice("data.empty_think", cfg.data.empty_think, ("mask", "train"))
    for i, source in enumerate(cfg.data.sources):
        _choice(f"data.sources[{i}].format", source.format, FORMATS)
    _choice("wandb.mode", cfg.wandb.mode, ("auto", "offline", "online", "disabled"))
    _choice("model.attn_impl", cfg.model.attn_impl, ("auto", "flash_attn", "torch_varlen", "flex", "sdpa"))
    _choice("model.activation_checkpointing", cfg.model.activation_checkpointing, ACTIVATION_CHECKPOINTING)
    if cfg.model.gradient_checkpointing and cfg.model.activation_checkpointing == "selective":
        raise ConfigError(
            "model.gradient_checkpointing=true (activation_checkpointing=full) contradicts "
            "model.activation_checkpointing=selective: set one of them"
        )
    _choice("train.loss_impl", cfg.train.loss_impl, LOSS_IMPLS)
    _choice("strategy.grad_sync", cfg.strategy.grad_sync, ("every", "last"))
    _not_empty("resume", cfg.resume)


def _validate_curriculum(c: CurriculumConfig) -> None:
    _choice("curriculum.difficulty", c.difficulty, ("meta", *SCORERS))
    _choice("curriculum.fallback", c.fallback, SCORERS)
    _choice("curriculum.on_missing", c.on_missing, ("fallback", "reject"))
    _choice("curriculum.on_empty", c.on_empty, ("error", "renormalise"))
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


_STRATEGY_ONLY = {
    "reshard_after_forward": "fsdp2",
    "cpu_offload": "fsdp2",
    "grad_sync": "fsdp2",
    "overlap_comm": "zero3",
    "reduce_bucket_size": "zero3",
    "prefetch_bucket_size": "zero3",
    "param_persistence_threshold": "zero3",
    "offload_optimizer": "zero3",
    "offload_params": "zero3",
    "deepspeed_config": "zero3",
}


def _validate_strategy(s: StrategyConfig) -> None:
    """An option of another strategy, set away from its default, would be silently ignored: refuse it."""
    _positive("strategy.timeout_minutes", s.timeout_minutes)
    defaults = StrategyConfig()
    for key, owner in _STRATEGY_ONLY.items():
        if s.name != owner and getattr(s, key) != getattr(defaults, key):
            raise ConfigError(
                f"strategy.{key}={getattr(s, key)!r} applies to strategy={owner} only (this run uses strategy={s.name})"
            )
    for key in ("reduce_bucket_size", "prefetch_bucket_size"):
        _positive(f"strategy.{key}", getattr(s, key))
    _positive("strategy.param_persistence_threshold", s.param_persistence_threshold, allow_zero=True)
    _not_empty("strategy.deepspeed_config", s.deepspeed_config)


def _validate_train(t: TrainConfig) -> None:
    for key in ("max_steps", "global_batch_size", "micro_batch_tokens", "log_every_steps"):
        _positive(f"train.{key}", getattr(t, key))
    _positive("train.lr", t.lr)
    if t.peak_tflops is not None:
        _positive("train.peak_tflops", t.peak_tflops)
    if t.stop_after_step is not None and not 0 < t.stop_after_step <= t.max_steps:
        raise ConfigError(f"train.stop_after_step={t.stop_after_step} must be in [1, train.max_steps={t.max_steps}]")
    _positive("train.weight_decay", t.weight_decay, allow_zero=True)
    _positive("train.max_grad_norm", t.max_grad_norm, allow_zero=True)
    _positive("train.adam_eps", t.adam_eps)
    _between("train.min_lr_ratio", t.min_lr_ratio, 0.0, 1.0)
    _between("train.warmup_ratio", t.warmup_ratio, 0.0, 1.0)
    _between("train.adam_beta1", t.adam_beta1, 0.0, 1.0, high_open=True)
    _between("train.adam_beta2", t.adam_beta2, 0.0, 1.0, high_open=True)


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


TEMPLATE_ARGUMENTS = ("messages", "tools", "documents", "add_generation_prompt")  # what each render sets itself


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
        _choice(f"eval.sources[{i}].format", source.format, FORMATS)
    p = e.probes
    _not_empty("eval.probes.path", p.path)
    _positive("eval.probes.num", p.num, allow_zero=True)
    for key in ("max_new_tokens", "batch_size", "repetition_ngram"):
        _positive(f"eval.probes.{key}", getattr(p, key))
    if p.length_factor < 1:
        raise ConfigError(f"eval.probes.length_factor={p.length_factor!r} must be >= 1")


def validate(cfg: SFTConfig) -> SFTConfig:
    """Check what types cannot; raise ConfigError naming the key and value. Returns cfg."""
    _validate_features(cfg)
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
    _positive("checkpoint.every_steps", cfg.checkpoint.every_steps, allow_zero=True)
    _positive("checkpoint.keep", cfg.checkpoint.keep)
    _positive("checkpoint.stop_timeout_s", cfg.checkpoint.stop_timeout_s)
    _positive("seed", cfg.seed, allow_zero=True)
    if not cfg.output_dir.strip():
        raise ConfigError("output_dir is empty: set output_dir=PATH")
    return cfg


def _reject_unknown_keys(node: Any, schema: type, prefix: str = "") -> None:
    """Hydra's ``+key=value`` can add keys the schema does not have: refuse them, naming the key."""
    hints = get_type_hints(schema)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key not in fields:
            raise ConfigError(
                f"unknown key {prefix}{key!s}; valid keys{' under ' + prefix[:-1] if prefix else ''}: "
                f"{', '.join(fields)}"
            )
        hint, value = fields[key], node[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, DictConfig):
            _reject_unknown_keys(value, hint, f"{prefix}{key}.")
        elif get_args(hint) and dataclasses.is_dataclass(get_args(hint)[0]) and OmegaConf.is_list(value):
            for i, item in enumerate(value):
                if isinstance(item, DictConfig):
                    _reject_unknown_keys(item, get_args(hint)[0], f"{prefix}{key}[{i}].")


def to_schema(cfg: DictConfig) -> SFTConfig:
    """Hydra's composed DictConfig -> the validated dataclass tree."""
    try:
        _reject_unknown_keys(cfg, SFTConfig)
        obj = OmegaConf.to_object(cfg)
    except (MissingMandatoryValue, ValidationError) as err:
        raise ConfigError(str(err).splitlines()[0]) from err
    if not isinstance(obj, SFTConfig):  # composed without the schema (e.g. a bare compose in a script)
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SFTConfig), cfg))
    return validate(obj)
