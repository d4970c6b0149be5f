"""The typed schema of every config group: the one statement of every default and every choice list (``choice``).

The YAML files under ``conf/`` state only what a group option sets on purpose. Hydra rejects an unknown key or a
value of the wrong type while composing (naming the key); ``sftdist.validation.validate`` then checks what types
cannot. Each field is documented once, here; the README's reference table repeats the names and the defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, get_args, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, ValidationError

from sftdist.data.formats import FORMATS as RECORD_FORMATS
from sftdist.errors import ConfigError
from sftdist.validation import validate

ATTENTION_BACKENDS = ("flash_attn", "torch_varlen", "flex", "sdpa")  # sftdist.model.attention; auto tries this order
SCORERS = ("length", "turns", "model_loss")  # curriculum difficulty from the data or the model (besides meta)


def choice(*choices: str, strategy: str | None = None) -> Any:
    """A field that takes one of ``choices``, the first its default (validation checks it, naming the key): the one
    statement of the list. ``strategy``: as ``only_for``."""
    return field(default=choices[0], metadata={"choices": choices, **({"strategy": strategy} if strategy else {})})


def only_for(strategy: str, default: Any) -> Any:
    """A strategy.* option of one strategy only: set away from its default under another strategy, it would be
    silently ignored, so validation refuses it."""
    return field(default=default, metadata={"strategy": strategy})


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
    activation_checkpointing: str = choice("none", "full", "selective")
    gradient_checkpointing: bool = False  # deprecated: the older spelling of activation_checkpointing=full
    compile: bool = False  # torch.compile each decoder block (the first steps compile; later ones run faster)
    attn_impl: str = choice("auto", *ATTENTION_BACKENDS)  # packed attention (auto: the first that runs)
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
    format: str = choice("auto", *RECORD_FORMATS)
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
    format: str = choice("auto", *RECORD_FORMATS)  # format of data.path
    split: str = "train"  # the split of a saved DatasetDict at data.path
    sources: List[SourceConfig] = field(default_factory=list)  # several sources with weights, instead of path
    # Temperature T of the mixture of several sources: each one's share of the training stream is proportional to
    # weight * n ** (1 / T) (n: its training records); 1 keeps the records' own proportions, 2 or more lifts rare
    # sources, a very large T gives every source the same share
    mixing_temperature: float = 1.0
    prepared: Optional[str] = None  # a directory written by sftdist-prepare: train on it, skip preparation
    chat_template: Optional[str] = None  # Jinja file that replaces the tokenizer's chat template
    # Arguments of the chat template, passed to every render ({enable_thinking: false}, {reasoning_effort: low}, ...);
    # saved in final/sftdist_training.json: a server must pass the same (its requests' chat_template_kwargs)
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)
    # The empty think block a template writes on answers without reasoning (Qwen3, GLM-4.5): mask keeps it as context
    # (the model is not taught to skip thinking), train supervises it
    empty_think: str = choice("mask", "train")
    packing: bool = True  # true: whole samples packed into rows, varlen attention; false: padded rows
    max_length: int = 1024  # longest sample in tokens; longer conversations follow data.truncation
    # drop: reject over-long conversations; truncate: keep what fits (turn-aware)
    truncation: str = choice("drop", "truncate")
    max_rejected_fraction: float = 0.05  # stop before training when more of the records are invalid
    num_proc: int = 0  # processes that encode; 0 picks by data size and cores
    cache: bool = True  # reuse prepared data keyed by a fingerprint of files, tokenizer, template and settings
    cache_dir: Optional[str] = None  # default: $SFTDIST_CACHE_DIR, else ~/.cache/sftdist
    demo_size: int = 2000  # conversations generated for the demo when no path or sources are set
    filters: FiltersConfig = field(default_factory=FiltersConfig)


# train.max_steps when neither it nor train.epochs is set
DEFAULT_MAX_STEPS = 200
# train.lr when unset, by the run's kind (the README's "Learning rate" cites the evidence): the tiny demo model trains
# from scratch; a pretrained model is fine-tuned whole, or through LoRA adapters
DEFAULT_LR = {"the tiny demo model": 1.0e-3, "full fine-tuning": 2.0e-5, "LoRA": 2.0e-4}


def run_kind(cfg: SFTConfig) -> str:
    """Which of DEFAULT_LR's kinds a run is."""
    if cfg.model.name_or_path is None:
        return "the tiny demo model"
    return "LoRA" if cfg.model.lora.enabled else "full fine-tuning"


@dataclass
class TrainConfig:
    # Optimizer steps; unset: from train.epochs, or DEFAULT_MAX_STEPS (200) when that is unset too
    max_steps: Optional[int] = None
    # Passes over the training set (after filters and hold-out, with source weights) instead of max_steps: the steps
    # are ceil(epochs * training samples / global_batch_size), counted at start and logged
    epochs: Optional[float] = None
    global_batch_size: int = 16  # samples (conversations, or a conversation's serving-exact samples) per step
    micro_batch_tokens: int = 4096  # token budget of one micro-batch, padding included
    lr: Optional[float] = None  # peak learning rate; unset: DEFAULT_LR for the run's kind (logged, with the reason)
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
    # A step whose loss or gradient norm is not finite is left out (not applied, counted, its samples logged); more
    # than this many in a row stop the run with a checkpoint (0: stop at the first)
    skip_nonfinite_steps: int = 5
    # Stop when this many evals in a row have not improved checkpoint.keep_best's metric by more than
    # early_stopping_min_delta (0: never); the run ends with a checkpoint and exit status 0
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    # The loss: auto (chunked where the model allows it) | chunked (the output head on supervised tokens only, a
    # chunk at a time: the full logits never exist) | naive (the model's logits, then cross-entropy)
    loss_impl: str = choice("auto", "chunked", "naive")


@dataclass
class StrategyConfig:
    name: str = choice("none", "ddp", "fsdp2", "zero3")
    timeout_minutes: int = 60  # collective timeout (rank 0 prepares the data while the others wait)
    # Context parallelism: each packed row split over this many consecutive ranks (1: off; it divides the world
    # size); their attention gathers the group's keys and values (sftdist.parallel.context; model.attn_impl=sdpa)
    context_parallel: int = 1
    # fsdp2 (torch.distributed.fsdp.fully_shard per decoder layer and the root)
    # Free gathered layer weights after forward (ZeRO-3-like); false: keep them until backward (ZeRO-2-like)
    reshard_after_forward: bool = only_for("fsdp2", True)
    cpu_offload: bool = only_for("fsdp2", False)  # keep sharded parameters, gradients and optimizer state on CPU
    # Reduce-scatter gradients after every micro-batch (every: least memory) or only after a step's last one
    # (last: one reduction per step, unsharded gradients held meanwhile)
    grad_sync: str = choice("every", "last", strategy="fsdp2")
    # zero3 (DeepSpeed stage 3; its config generated from these, deepspeed_config merged on top)
    overlap_comm: bool = only_for("zero3", True)  # overlap gradient reduction with backward
    reduce_bucket_size: int = only_for("zero3", 50_000_000)  # elements per gradient reduce bucket
    prefetch_bucket_size: int = only_for("zero3", 50_000_000)  # elements of parameters prefetched ahead of use
    param_persistence_threshold: int = only_for("zero3", 100_000)  # parameters smaller than this stay gathered
    offload_optimizer: bool = only_for("zero3", False)  # optimizer state and fp32 master weights on CPU
    offload_params: bool = only_for("zero3", False)  # parameters on CPU between uses
    # A DeepSpeed JSON whose keys override the generated config
    deepspeed_config: Optional[str] = only_for("zero3", None)


@dataclass
class PhaseConfig:
    until: float = 1.0  # phase ends at this fraction of train.max_steps
    easy: float = 0.0  # sampling weights of the difficulty buckets in this phase (they sum to 1)
    medium: float = 0.0
    hard: float = 0.0


@dataclass
class CurriculumConfig:
    # none (uniform) | three_phase (the mixture of each step follows curriculum.phases)
    name: str = choice("none", "three_phase")
    phases: List[PhaseConfig] = field(default_factory=list)  # phase ends increase and end at 1.0
    difficulty: str = choice("meta", *SCORERS)  # meta: the record's own label; else a scorer
    thresholds: List[float] = field(default_factory=lambda: [1.0, 2.0])  # meta: a number below the first is easy...
    quantiles: List[float] = field(default_factory=lambda: [1 / 3, 2 / 3])  # bucket edges for length/turns/model_loss
    # meta: an unlabelled record is scored by curriculum.fallback (fallback), or left out and counted (reject)
    on_missing: str = choice("fallback", "reject")
    fallback: str = choice(*SCORERS)
    on_empty: str = choice("error", "renormalise")  # a phase that draws from an empty bucket


@dataclass
class CheckpointConfig:
    # A resumable checkpoint every N steps and at the last; 0: only at a stop (a signal, an early stop, too many
    # non-finite steps) and at a best step (keep_best)
    every_steps: int = 500
    keep: int = 2  # newest complete checkpoints kept; the one resumed from stays until a newer one is complete
    stop_timeout_s: float = 300.0  # after a stop signal, exit anyway (status 128 + signal) if not stopped by then
    # An eval metric (eval/loss, eval/format_pass_rate, eval/<name>/loss, ...): the step where it is best is
    # checkpointed and that checkpoint kept beside the newest ones while it is the best
    keep_best: Optional[str] = None
    keep_best_mode: str = choice("min", "max")  # whether lower or higher is better
    export_best: bool = False  # final/ from the best checkpoint instead of the last step


@dataclass
class EvalSourceConfig:
    path: str = "???"  # an eval data file (jsonl, json, parquet or dataset dir), never trained on
    format: str = choice("auto", *RECORD_FORMATS)
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
    # auto: online if a W&B key is configured, else offline
    mode: str = choice("auto", "offline", "online", "disabled")
    project: str = "sftdist"
    entity: Optional[str] = None
    name: Optional[str] = None  # run name; default: the output_dir's folder name
    tags: List[str] = field(default_factory=list)
    init_timeout_s: float = 60.0  # online start-up longer than this (no network, a bad key): warn, log offline


@dataclass
class SFTConfig:
    output_dir: str = "outputs/sft"  # everything a run writes goes under it
    seed: int = 0  # model init and data order
    precision: str = choice("fp32", "bf16")  # bf16: autocast over fp32 master weights
    device: str = choice("auto", "cpu", "cuda")
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


def _keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key of ``schema``, nested groups included (``train.lr``, ``model.lora.r``, ...)."""
    keys = []
    hints = get_type_hints(schema)
    for f in dataclasses.fields(schema):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _keys(hints[f.name], f"{prefix}{f.name}.")
    return keys


def unknown_key(key: str, groups: tuple[str, ...] = ()) -> str | None:
    """None when the dotted ``key`` of a ``key=value`` override is in the schema (or is a config group in
    ``groups``); else the one-line error, with the nearest key when one is close."""
    node: Any = SFTConfig
    parts = key.split(".")
    for part in parts:
        hints = get_type_hints(node)
        names = {f.name for f in dataclasses.fields(node)}
        if part not in names:
            break
        node = hints[part]
        if not dataclasses.is_dataclass(node):  # a value (or a list or mapping of them): the rest is its own
            return None
    else:
        return None
    if len(parts) == 1 and key in groups:
        return None
    near = difflib.get_close_matches(key, [*_keys(SFTConfig), *groups], n=1, cutoff=0.6)
    return f"unknown key {key}" + (f" (did you mean {near[0]}?)" if near else "; the README lists every key")


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
