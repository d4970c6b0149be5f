"""What a resumed run must share with the run that wrote its checkpoint, and what it may change.

A checkpoint records the run's *identity*: the config keys that define the model, the data and the sample stream,
plus content hashes (the data fingerprint, the chat template, the tokenizer, the training rows after the eval
hold-out and the source weights; with LoRA, the base model's files, which are read again on resume). Resuming with
any of them changed would silently train something else than the run that was interrupted, so it is refused at
start, naming each key with both values. A moved data file is not
a change: path keys may differ when every content hash is the same.

Everything else may change and is logged: ``train.max_steps`` (extend a run: the LR schedule is recomputed for the
new length from the current step on), ``train.lr`` and the other optimizer settings (they apply from the resumed
step on), ``train.micro_batch_tokens``, ``precision``, logging, eval cadence (``eval.every_steps`` between non-zero
values; turning eval off would change the hold-out and is refused), ``checkpoint.*``, ``wandb.*``, ``strategy``
within one checkpoint format, and the number of processes (for none/ddp/fsdp2).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from sftdist.config import MODEL_EXECUTION_KEYS, SFTConfig
from sftdist.model import model_identity
from sftdist.run.checkpoint import CheckpointError, checkpoints_dir, resolve_resume
from sftdist.run.state import TrainerState

if TYPE_CHECKING:
    from sftdist.data.report import DataReport

log = logging.getLogger(__name__)

# Config keys (prefixes) that define the run being resumed, and the ones under them that do not.
_IDENTITY = ("model.", "data.", "seed", "train.global_batch_size", "curriculum.")
_NOT_IDENTITY = (
    *(f"model.{key}" for key in MODEL_EXECUTION_KEYS),
    "data.name",
    "data.num_proc",
    "data.cache",
    "data.cache_dir",
    "data.max_rejected_fraction",
)
# Where the inputs are, not what they are: may change when the content hashes below are unchanged.
_PATHS = ("data.path", "data.prepared", "data.chat_template", "data.filters.decontaminate", "data.sources[")
BASE_MODEL = "base model files"  # (LoRA) the base's files, sizes and times: sftdist.model.model_identity
_CONTENT = ("data fingerprint", "chat template sha256", "tokenizer sha256", "training rows sha256", BASE_MODEL)


def flat_config(cfg: SFTConfig) -> dict[str, Any]:
    """The resolved config as ``{"train.lr": 0.001, "data.sources[0].path": ..., ...}`` (JSON values)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
            for i, value in enumerate(node):
                walk(value, f"{prefix}[{i}]")
        else:
            out[prefix] = node

    walk(json.loads(json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg)))), "")
    return out


def _is_identity(key: str) -> bool:
    prefixes = tuple(k for k in _IDENTITY if k.endswith("."))
    return key not in _NOT_IDENTITY and (key in _IDENTITY or key.startswith(prefixes))


def run_identity(cfg: SFTConfig, data_report: DataReport) -> dict[str, Any]:
    """The keys and content hashes a resumed run must share with the run that wrote the checkpoint."""
    identity = {k: v for k, v in flat_config(cfg).items() if _is_identity(k)}
    identity["eval.holdout_records"] = data_report.records_eval  # as used: eval.every_steps=0 holds none out
    identity["data fingerprint"] = data_report.fingerprint
    identity["chat template sha256"] = data_report.template_hash
    identity["tokenizer sha256"] = data_report.tokenizer_hash
    identity["training rows sha256"] = data_report.train_rows_hash
    if cfg.model.lora.enabled:  # a LoRA checkpoint holds the adapters only: the base, read again, must be the same
        identity[BASE_MODEL] = model_identity(cfg.model, cfg.seed)
    return identity


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each difference that makes a resume wrong (none: the run may resume)."""
    current = json.loads(json.dumps(current))
    # A key the checkpoint lacks came after it was written: its run had the key's default
    saved = {**{k: v for k, v in _schema_defaults().items() if k in current}, **saved}
    changed = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if not any(k in _CONTENT for k in changed):  # the same data wherever it lives now
        moved = [k for k in changed if k.startswith(_PATHS)]
        if moved:
            log.warning("resuming with moved inputs (their content is unchanged): %s", _describe(moved, saved, current))
        changed = [k for k in changed if k not in moved]
    return [_describe([k], saved, current) for k in changed]


@functools.cache
def _schema_defaults() -> dict[str, Any]:
    return flat_config(SFTConfig())


def refused_changes(old: SFTConfig, new: SFTConfig) -> list[str]:
    """``key old -> new`` for each config key that a resume from ``old``'s checkpoints would refuse in ``new``
    (checked before any data is read: content hashes are not compared here)."""
    a, b = flat_config(old), flat_config(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and _is_identity(k)]
    return [_describe([k], a, b) for k in keys]


def allowed_changes(saved_config: dict[str, Any], current_config: dict[str, Any]) -> str:
    """The config keys that differ from the checkpointed run's and may (``key old -> new, ...``), for the log."""
    current_config = json.loads(json.dumps(current_config))
    changed = [
        k
        for k in sorted(set(saved_config) | set(current_config))
        if saved_config.get(k) != current_config.get(k) and not _is_identity(k) and not k.startswith(_PATHS)
    ]
    return _describe(changed, saved_config, current_config)


def _describe(keys: list[str], old: dict[str, Any], new: dict[str, Any]) -> str:
    unset = "<unset>"
    return ", ".join(f"{k} {old.get(k, unset)!r} -> {new.get(k, unset)!r}" for k in keys)


def check_resumable(state: TrainerState, path: Path, identity: dict[str, Any], cfg: SFTConfig, strategy: Any) -> None:
    """Refuse (CheckpointError naming why and what to do) a resume from ``path`` that would not continue the run
    that wrote it; log the changes that are allowed."""
    fresh = "start a new run instead (another output_dir, or resume=never, which removes these checkpoints)"
    export = f"or export it (sftdist-export {path} OUT) and start a new run from it (model.name_or_path=OUT)"
    differences = identity_differences(state.identity, identity)
    if differences:
        raise CheckpointError(
            f"{path} belongs to a different run; resuming it with these changes would train "
            f"something else: {'; '.join(differences)}. Resume with the checkpoint's values, or {fresh}"
        )
    saved = state.strategy
    if saved["format"] != strategy.checkpoint_format:
        raise CheckpointError(
            f"{path} was written by strategy={saved['name']} ({saved['format']} format), which "
            f"strategy={strategy.name} cannot load ({strategy.checkpoint_format} format): resume with "
            f"strategy={saved['name']}, {export}"
        )
    if not strategy.reshards and state.world_size != strategy.world_size:
        raise CheckpointError(
            f"{path} was written by strategy={saved['name']} on {state.world_size} processes, and its format "
            f"({saved['format']}) loads on {state.world_size} only (this run has {strategy.world_size}): resume "
            f"on {state.world_size} processes, {export}"
        )
    if state.step > cfg.train.max_steps:
        raise CheckpointError(
            f"{path} is at step {state.step}, past train.max_steps={cfg.train.max_steps}: "
            f"raise train.max_steps, or {fresh}"
        )
    changed = allowed_changes(state.config, flat_config(cfg))
    if changed and strategy.is_main:
        log.info("resuming %s with changed settings: %s", path, changed)
    if state.world_size != strategy.world_size and strategy.is_main:
        log.info("resuming %s, written on %d processes, on %d (resharded)", path, state.world_size, strategy.world_size)


def find_checkpoint(
    cfg: SFTConfig, output_dir: Path, identity: dict[str, Any], strategy: Any
) -> tuple[Path | None, TrainerState | None]:
    """The checkpoint a run continues from (``cfg.resume``) and its trainer state, or (None, None): rank 0 finds and
    reads it, every rank follows, or stops with rank 0's reason. One of another run, or that this topology cannot
    load, is refused naming why (:func:`check_resumable`)."""
    found: Any = None
    if strategy.is_main:
        try:
            path = resolve_resume(cfg.resume, output_dir)
            found = (str(path), TrainerState.read(path)) if path is not None else None
        except CheckpointError as err:
            found = err
    found = strategy.broadcast_object(found)
    if isinstance(found, CheckpointError):
        raise found
    if found is None:
        return None, None
    path, state = Path(found[0]), found[1]
    check_resumable(state, path, identity, cfg, strategy)
    return path, state


def continued_wandb_run(resume_from: Path | None, state: TrainerState | None, output_dir: Path) -> str | None:
    """The W&B run id a resumed run continues: the checkpoint's, where it is this output_dir's own; None for a fresh
    run, or one branched off another run's checkpoint (resume=PATH elsewhere: a W&B run of its own)."""
    if resume_from is None or state is None or resume_from.parent.resolve() != checkpoints_dir(output_dir).resolve():
        return None
    return state.wandb_run_id
