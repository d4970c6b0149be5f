"""Resumable checkpoints: written atomically, found and checked at start, pruned to the newest complete ones.

    output_dir/checkpoints/step_N/
        state/              model and optimizer, sharded: every rank writes its own part, in its strategy's format
                            (torch.distributed.checkpoint for none/ddp/fsdp2, DeepSpeed's own for zero3)
        rng/rank_R.json     each rank's RNG states: python, numpy, torch CPU and CUDA
        trainer_state.json  TrainerState: the step, the strategy and world size, the run's identity (see
                            sftdist.run.identity), the resolved config, the W&B run id, the curriculum's report
        hf/                 what an export needs besides the weights: config, generation config with the stop tokens,
                            tokenizer with its chat template, sftdist_training.json
        curriculum_buckets.npy  with a curriculum: the difficulty bucket of every sample (a resume never recomputes)
        COMPLETE            written last, listing every file and its size: a directory without it is torn

All ranks write into ``checkpoints/.tmp-step_N`` and fsync what they wrote; rank 0 then renames it to ``step_N``,
fsyncs the parent, and writes the marker. A kill at any moment leaves the earlier checkpoints as they were, plus at
most one torn directory, which resuming skips with a warning naming it. Older checkpoints are deleted only after a
newer one is complete, so the one a run resumed from survives until there is a better one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sftdist.errors import InputError
from sftdist.parallel import Strategy
from sftdist.run.layout import CHECKPOINTS_DIR, CURRICULUM_FILE, MARKER, RNG_DIR, STATE_DIR, STATE_FILE
from sftdist.run.state import TrainerState
from sftdist.run.storage import WriteError, write_error

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(InputError):
    """A checkpoint that cannot be used: the message names it and says why."""


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step}"


# ---- writing -------------------------------------------------------------------------------------------------------


def save_checkpoint(
    root: Path,
    strategy: Strategy,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: TrainerState,
    write_main_files: Callable[[Path], list[Path]],
    keep: int,
    needed: int | None = None,
    protect: int | None = None,
) -> Path:
    """Write ``root/step_<step>`` atomically (a collective: every rank calls it), then prune (:func:`prune`).
    Returns the checkpoint's path. A failure on any rank stops every rank with an error, none left waiting; one the
    file system caused (space, permissions, a mount) is a WriteError naming it (with ``needed``, the bytes the
    checkpoint needs, for space), and the torn directory is removed: its space comes back, the checkpoints before it
    are untouched."""
    step = trainer_state.step
    tmp, final = root / f".tmp-step_{step}", step_dir(root, step)

    def prepare() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / RNG_DIR).mkdir(parents=True)

    def write() -> None:
        written = strategy.save_state(model, optimizer, tmp / STATE_DIR)  # what DCP writes, it has fsynced
        _write_json(tmp / RNG_DIR / f"rank_{strategy.rank}.json", capture_rng())
        if strategy.is_main:
            _write_json(tmp / STATE_FILE, dataclasses.asdict(trainer_state))
            written += write_main_files(tmp)
        for path in written:
            _fsync(path)

    def publish() -> None:
        _publish(tmp, final, step)
        prune(root, keep, step, protect)

    try:
        _together(strategy, prepare if strategy.is_main else None, "preparing")
        _together(strategy, write, "writing")
        _together(strategy, publish if strategy.is_main else None, "publishing")
    except BaseException as err:  # (torch.distributed.checkpoint's CheckpointException is a BaseException)
        if strategy.is_main:  # the torn directory, renamed into place or not
            shutil.rmtree(tmp, ignore_errors=True)
            if final.exists() and not (final / MARKER).is_file():
                shutil.rmtree(final, ignore_errors=True)
        refused = write_error("the checkpoint", final, err, needed, under=root)
        if refused is not None:
            advice = "free space" if refused.space else "fix that"
            raise WriteError(
                f"{refused}; the checkpoints before it are untouched: {advice}, then the same command resumes"
            ) from err
        raise
    return final


def _together(strategy: Strategy, action: Callable[[], None] | None, what: str) -> None:
    """Run ``action`` (None: nothing to do on this rank), then agree: when it failed on any rank, every rank
    raises (rather than wait in a collective that the failed rank never reaches)."""
    error = None
    try:
        if action is not None:
            action()
    except Exception as err:  # noqa: BLE001 - re-raised below, after the others were told
        error = err
    (failures,) = strategy.all_sum([float(error is not None)])
    if error is not None:
        raise error
    if failures:
        raise CheckpointError(f"checkpoint: another rank failed while {what} the checkpoint (its error says why)")


def _publish(tmp: Path, final: Path, step: int) -> None:
    """Rename the fully written temporary directory into place, then mark it complete (rank 0 only)."""
    for directory in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
        _fsync(directory)  # the entries of every file, whoever wrote it
    if final.exists():  # a torn directory of an earlier attempt at this step
        shutil.rmtree(final)
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    tmp.rename(final)
    _fsync(final.parent)
    _write_json(final / MARKER, {"step": step, "files": files})
    _fsync(final)


def prune(root: Path, keep: int, newest: int, protect: int | None = None) -> None:
    """After ``step_<newest>`` was completed: keep it and the ``keep - 1`` newest complete checkpoints before it,
    and ``step_<protect>`` (the best one, checkpoint.keep_best); remove older ones, torn or corrupt ones before it,
    and every checkpoint after it (of a timeline this run left: it resumed from an older one), so that
    ``resume=auto`` only ever finds this run's own."""
    doomed, kept = [], 0
    for s, path in reversed(list_checkpoints(root)):
        if s > newest:
            doomed.append(path)
        elif problem(path) is None and kept < keep:
            kept += 1
        elif s == protect and problem(path) is None:
            continue
        else:
            doomed.append(path)
    doomed += list(root.glob(".tmp-step_*"))
    for path in doomed:
        log.info("checkpoint: removing %s", path)
        shutil.rmtree(path, ignore_errors=True)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- finding -------------------------------------------------------------------------------------------------------


def _step_of(name: str) -> int | None:
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Every ``step_N`` directory under ``root``, complete or not, oldest first."""
    if not root.is_dir():
        return []
    found = [(_step_of(p.name), p) for p in root.iterdir() if p.is_dir()]
    return sorted((s, p) for s, p in found if s is not None)


def problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from (torn, unreadable, a file missing or cut short), or
    None when it is complete."""
    marker = path / MARKER
    if not marker.is_file():
        return f"it has no {MARKER} marker (its write was interrupted)"
    try:
        files = json.loads(marker.read_text())["files"]
        state = json.loads((path / STATE_FILE).read_text())
        missing = [k for k in ("step", "world_size", "strategy", "identity", "config") if k not in state]
        if missing:
            return f"its {STATE_FILE} lacks {', '.join(missing)}"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {MARKER} marker or {STATE_FILE} is unreadable ({type(err).__name__}: {err})"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes where {size} were written"
    return None


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``; each newer one that is torn or unreadable is skipped with a
    warning naming it and why."""
    for tmp in sorted(root.glob(".tmp-step_*")) if root.is_dir() else []:
        log.warning("checkpoint: ignoring %s, a checkpoint whose write was interrupted", tmp)
    for _, path in reversed(list_checkpoints(root)):
        why = problem(path)
        if why is None:
            return path
        log.warning("checkpoint: skipping %s: %s", path, why)
    return None


def resolve_resume(resume: str, output_dir: str | Path, key: str = "resume") -> Path | None:
    """The checkpoint a run continues from: ``auto`` the newest complete one in ``output_dir`` (None while there is
    none), ``never`` None, else ``resume`` itself: a checkpoint directory, or a run directory (its newest complete
    checkpoint). ``key`` names the setting in errors."""
    if resume == "never":
        return None
    if resume == "auto":
        root = checkpoints_dir(output_dir)
        found = latest_checkpoint(root)
        marked = [p for _, p in list_checkpoints(root) if (p / MARKER).is_file()]
        if found is None and marked:  # completed once, unreadable now: never start over on top of them
            names = ", ".join(p.name for p in marked)
            raise CheckpointError(
                f"{root} holds checkpoints that were completed but cannot be read now ({names}; the warnings above "
                "say why): repair or remove them, or start over with resume=never"
            )
        return found
    path = Path(resume).expanduser()
    if (path / MARKER).exists() or (path / STATE_FILE).exists() or _step_of(path.name) is not None:
        why = problem(path) if path.is_dir() else "no such directory"
        if why is not None:
            raise CheckpointError(f"{key}={resume!r} is not a usable checkpoint: {why}")
        return path
    if checkpoints_dir(path).is_dir():
        found = latest_checkpoint(checkpoints_dir(path))
        if found is None:
            raise CheckpointError(f"{key}={resume!r}: no complete checkpoint in {checkpoints_dir(path)}")
        return found
    raise CheckpointError(
        f"{key}={resume!r} is neither a checkpoint (a checkpoints/step_N directory with its {MARKER} marker) nor a "
        "run directory with checkpoints/"
    )


# ---- loading -------------------------------------------------------------------------------------------------------


def read_curriculum(checkpoint: Path | None, state: TrainerState | None) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The curriculum buckets of every sample and their report, as ``checkpoint`` keeps them (None: no checkpoint)."""
    if checkpoint is None or state is None:
        return None
    return np.load(checkpoint / CURRICULUM_FILE, allow_pickle=False), state.curriculum["report"]


def load_checkpoint(path: Path, strategy: Strategy, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the model and optimizer state (resharded by the strategy where it can) and this rank's RNG states.

    The optimizer's hyperparameters stay this run's (a changed ``train.weight_decay`` or beta applies from here on);
    its state (moments, step counts) comes from the checkpoint.
    """
    hyperparameters = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        strategy.load_state(model, optimizer, path / STATE_DIR)
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        raise CheckpointError(
            f"{path}: cannot load its model and optimizer state ({type(err).__name__}: {str(err)[:500]})"
        ) from err
    for group, saved in zip(optimizer.param_groups, hyperparameters):
        group.update(saved)
    rng = path / RNG_DIR / f"rank_{strategy.rank}.json"
    if TrainerState.read(path).world_size == strategy.world_size and rng.is_file():
        restore_rng(json.loads(rng.read_text()))
    else:  # the sample stream does not depend on them; only dropout would draw differently
        log.info("checkpoint: written on another number of processes; RNG states start from the seed")


# ---- RNG states ----------------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as JSON-able values."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    out: dict[str, Any] = {
        "python": [version, list(state), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # (this rank's device: the one it draws on)
        out["cuda"] = torch.cuda.get_rng_state().tolist()
    return out


def restore_rng(states: dict[str, Any]) -> None:
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if "cuda" in states and torch.cuda.is_available():
        state = states["cuda"]
        if state and isinstance(state[0], list):  # (written before: every visible GPU's, by index; this rank's is its
            state = state[torch.cuda.current_device() % len(state)]  # device's, where it still has that index)
        torch.cuda.set_rng_state(torch.tensor(state, dtype=torch.uint8))
