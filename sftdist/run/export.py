"""The Hugging Face export: ``final/`` at the end of a run, and ``sftdist-export CHECKPOINT OUT`` for any checkpoint.

Both take the same path: the full weights on CPU plus a *meta* directory (the model config with the dtype the
model came in, the generation config with the stop tokens, the tokenizer with its chat template, and
``sftdist_training.json``), which every checkpoint carries under ``hf/``. Every tensor is checked against the
model the config describes (present, non-empty, of its shape) before anything is written: an empty or truncated
export (the ZeRO-3 empty-save bug) never ships. Weights are written as safetensors, sharded with an index above
``max_shard_size``, into a temporary sibling that is renamed into place.

A LoRA run (``model.lora.enabled``) exports its adapter in peft's format to ``final/`` (OUT), and the base model
with the adapter merged in to ``final_merged/`` (OUT_merged) unless ``model.lora.merged_export=false`` (or
``--no-merged``): the base's weights are read again from ``model.name_or_path`` (or rebuilt from the seed, for the
tiny demo model), since its checkpoints hold the adapters only.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import pickle
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from sftdist.config import ModelConfig
from sftdist.model.lora import is_adapter, merge, write_adapter
from sftdist.run.layout import HF_DIR, MERGED_SUFFIX, STATE_DIR, TRAINING_INFO
from sftdist.run.state import TrainerState

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "5GB"


class ExportError(ValueError):
    """Weights that do not match the model their config describes."""


def write_hf_meta(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: Path,
    dtype: torch.dtype,
    eos_token_ids: list[int] | None,
    training_info: dict[str, Any],
) -> None:
    """Everything of a Hugging Face directory but the weights: config (in ``dtype``), generation config stopping at
    ``eos_token_ids``, tokenizer and chat template, and ``training_info`` as ``sftdist_training.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    if hasattr(config, "quantization_config"):  # (QLoRA's 4-bit base: an export is never quantized)
        del config.quantization_config
    config.save_pretrained(str(out_dir))
    if getattr(model, "generation_config", None) is not None:
        generation_config = copy.deepcopy(model.generation_config)
        if eos_token_ids:
            generation_config.eos_token_id = eos_token_ids[0] if len(eos_token_ids) == 1 else list(eos_token_ids)
        generation_config.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / TRAINING_INFO).write_text(json.dumps(training_info, indent=2, sort_keys=True) + "\n")


def stop_token_ids(tokenizer: Any, end_of_turn_ids: dict[str, int], current: Any) -> list[int] | None:
    """The generation config's stop tokens (``current``: an id, a list or None) plus the special (or added) tokens
    that end the trained assistant turns (``end_of_turn_ids``: the data report's count of each turn's last token),
    when together they end at least 90% of the turns, each one at least 1% of those: one end-of-turn marker, or the
    headers that follow an answer where the template writes none (GLM-4.5's ``<|user|>`` and ``<|observation|>``);
    or None to leave them as they are."""
    ends = Counter({int(k): v for k, v in end_of_turn_ids.items()})
    if not ends:
        return None
    special = [t for t in ends if t in tokenizer.all_special_ids or t in tokenizer.added_tokens_decoder]
    covered = sum(ends[t] for t in special)
    if covered < 0.9 * sum(ends.values()):
        token, count = ends.most_common(1)[0]
        log.warning(
            "assistant turns do not end with special tokens (%.0f%% do; the most common end, %r, ends %.0f%%): the "
            "model may not learn to stop; check the chat template's end-of-turn marker",
            100 * covered / sum(ends.values()),
            tokenizer.convert_ids_to_tokens(token),
            100 * count / sum(ends.values()),
        )
        return None
    current = [] if current is None else [current] if isinstance(current, int) else list(current)
    # the special ends in order of use, each ending at least 1% of the turns (not a stray token of a few)
    new = [t for t, n in ends.most_common() if t in special and t not in current and n >= 0.01 * covered]
    if new:
        log.info(
            "generation stops at %s too: they end the trained assistant turns", tokenizer.convert_ids_to_tokens(new)
        )
    return [*current, *new]


def export_hf(
    meta_dir: Path,
    state_dict: dict[str, torch.Tensor],
    out_dir: Path,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    trust_remote_code: bool = False,
) -> Path:
    """Write ``out_dir``: the weights of ``state_dict`` (checked, cast to the config's dtype) and the files of
    ``meta_dir`` (:func:`write_hf_meta`). Call on one process, with the full weights on CPU."""
    skeleton = _skeleton(meta_dir, trust_remote_code)
    state_dict = check_weights(skeleton, state_dict)
    dtype = _dtype(getattr(skeleton.config, "dtype", None))
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    with _written(Path(out_dir), meta_dir) as tmp:
        skeleton.save_pretrained(str(tmp), state_dict=state_dict, max_shard_size=max_shard_size)
    return Path(out_dir)


def export_lora(
    meta_dir: Path,
    adapters: dict[str, torch.Tensor],
    out_dir: Path,
    cfg: ModelConfig,
    base_weights: Callable[[list[str]], Any],
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """A LoRA run's export: ``out_dir`` holds the adapter in peft's format (``PeftModel.from_pretrained`` loads it on
    the base model) with the files of ``meta_dir`` but the model config; unless ``model.lora.merged_export=false``,
    ``<out_dir>_merged`` beside it is the Hugging Face directory of the base with the adapter merged in (the base's
    weights from ``base_weights(names)``: sftdist.model.base_model_weights)."""
    adapters = {k: v for k, v in adapters.items() if is_adapter(k)}
    if not adapters:
        raise ExportError("a LoRA export without adapter weights: the checkpoint holds none")
    with _written(Path(out_dir), meta_dir) as tmp:
        write_adapter(tmp, adapters, cfg.lora, cfg.name_or_path)
    if cfg.lora.merged_export:
        skeleton = _skeleton(meta_dir, cfg.trust_remote_code)
        persistent = set(skeleton.state_dict())  # (a tied weight is one parameter, and given once)
        names = [n for n, _ in skeleton.named_parameters()]
        names += [n for n, _ in skeleton.named_buffers() if n in persistent]
        try:
            merged = merge(base_weights(names), names, adapters, cfg.lora)
        except (KeyError, ValueError) as err:
            raise ExportError(f"cannot merge the adapter into the base model: {err}") from err
        export_hf(meta_dir, merged, merged_dir(Path(out_dir)), max_shard_size, cfg.trust_remote_code)
    elif merged_dir(Path(out_dir)).exists():  # an earlier export's: it would pass for this adapter's merge
        log.info("removing %s: an earlier merged export (this one writes the adapter only)", merged_dir(Path(out_dir)))
        shutil.rmtree(merged_dir(Path(out_dir)))
    return Path(out_dir)


def merged_dir(out_dir: Path) -> Path:
    """Where a LoRA export's merged model goes: ``final`` -> ``final_merged``."""
    return out_dir.with_name(f"{out_dir.name}{MERGED_SUFFIX}")


def _skeleton(meta_dir: Path, trust_remote_code: bool) -> torch.nn.Module:
    """The model ``meta_dir``'s config describes, on the meta device: the architecture only (names and shapes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(meta_dir), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


@contextlib.contextmanager
def _written(out_dir: Path, meta_dir: Path) -> Iterator[Path]:
    """A temporary sibling of ``out_dir`` to write into; then the files of ``meta_dir`` but its model config are
    added (tokenizer, chat template, generation config, training info), and it is renamed into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for item in Path(meta_dir).iterdir():
            if item.is_file() and item.name != "config.json":
                shutil.copy2(item, tmp / item.name)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    check_export_template(out_dir)


def check_weights(skeleton: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` if every tensor the model has is there, non-empty and of its shape (a tied weight may be
    given once); else ExportError naming the first offenders."""
    expected = skeleton.state_dict()
    tied = getattr(skeleton, "all_tied_weights_keys", None) or {}  # tied name -> the name it shares with
    problems = [f"unexpected tensor {k}" for k in state_dict if k not in expected]
    for key, ref in expected.items():
        if key not in state_dict:
            if not (key in tied and tied[key] in state_dict):
                problems.append(f"{key} is missing")
        elif state_dict[key].numel() == 0:
            problems.append(f"{key} is empty (the config says shape {tuple(ref.shape)})")
        elif tuple(state_dict[key].shape) != tuple(ref.shape):
            problems.append(f"{key} has shape {tuple(state_dict[key].shape)}; the config says {tuple(ref.shape)}")
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ExportError(f"the weights do not match {type(skeleton).__name__}: {'; '.join(problems[:8])}{more}")
    return state_dict


def _dtype(value: Any) -> torch.dtype:
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def check_export_template(hf_dir: Path) -> bool:
    """Warn (and return False) when the chat template a Hugging Face directory serves with is not the one
    its model was trained with (``sftdist_training.json``): training text and serving text would differ."""
    info_file = Path(hf_dir) / TRAINING_INFO
    if not info_file.is_file():
        return True
    from transformers import AutoTokenizer

    from sftdist.data.template import resolve_chat_template, template_hash

    trained = json.loads(info_file.read_text()).get("template_hash")
    try:
        served = template_hash(resolve_chat_template(AutoTokenizer.from_pretrained(str(hf_dir))))
    except ValueError:
        served = None
    if trained is not None and served != trained:
        log.warning(
            "%s: the tokenizer's chat template (sha256:%s) is not the one the model was trained with "
            "(sha256:%s); the model will be served with prompts it was not trained on",
            hf_dir,
            served,
            trained,
        )
        return False
    return True


def export_checkpoint(
    checkpoint: Path,
    out_dir: Path,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    trust_remote_code: bool = False,
    merged: bool = True,
) -> Path:
    """``sftdist-export``: a checkpoint (or a run directory's newest complete one) -> a Hugging Face directory; a
    LoRA run's: the adapter, and the merged model in ``<out_dir>_merged`` (unless ``merged`` is false, or the run
    set ``model.lora.merged_export=false``)."""
    from sftdist.parallel import full_model_state_dict
    from sftdist.run.checkpoint import resolve_resume

    path = resolve_resume(str(checkpoint), checkpoint, key="checkpoint")
    state = TrainerState.read(path)
    try:
        weights = full_model_state_dict(path / STATE_DIR, state.strategy["format"])
    except (RuntimeError, ValueError, KeyError, OSError, pickle.UnpicklingError) as err:
        raise ExportError(f"{path}: cannot read its weights ({type(err).__name__}: {str(err)[:300]})") from err
    log.info("%s: step %d, %d tensors (%s)", path, state.step, len(weights), state.strategy["format"])
    cfg, seed = _model_config(state.config)
    if not cfg.lora.enabled:
        return export_hf(path / HF_DIR, weights, out_dir, max_shard_size, trust_remote_code)
    from transformers import AutoTokenizer

    from sftdist.model import base_model_weights

    cfg.trust_remote_code = trust_remote_code  # (as for any export: only when asked here)
    cfg.lora.merged_export = cfg.lora.merged_export and merged
    if cfg.lora.merged_export:
        _check_base(path, state, cfg, seed)

    def base(names: list[str]) -> Any:
        return base_model_weights(cfg, AutoTokenizer.from_pretrained(str(path / HF_DIR)), seed, names)

    return export_lora(path / HF_DIR, weights, out_dir, cfg, base, max_shard_size)


def _check_base(path: Path, state: TrainerState, cfg: ModelConfig, seed: int) -> None:
    """The base a LoRA checkpoint's adapter is merged into must be the one it was trained on: ExportError otherwise."""
    from sftdist.model import model_identity
    from sftdist.run.identity import BASE_MODEL

    try:
        current = model_identity(cfg, seed)
    except FileNotFoundError as err:
        raise ExportError(f"{path}: its base model is not where it was trained ({err})") from err
    if state.identity.get(BASE_MODEL) != current:
        raise ExportError(
            f"{path}: the base model's files (model.name_or_path={cfg.name_or_path!r}) changed since this adapter was "
            "trained, so the merge would not be the trained model; export the adapter alone (--no-merged)"
        )


def _model_config(flat: dict[str, Any]) -> tuple[ModelConfig, int]:
    """The model config and seed of a checkpoint's run, from its flat config (sftdist.run.identity.flat_config)."""
    from omegaconf import OmegaConf

    nested = OmegaConf.create()
    for key, value in flat.items():
        if key.startswith("model."):
            OmegaConf.update(nested, key[len("model.") :], value, force_add=True)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), nested)), int(flat.get("seed", 0))
