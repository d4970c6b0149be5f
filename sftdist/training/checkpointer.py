"""When and what a run checkpoints: ``checkpoints/step_N`` on the cadence (``checkpoint.every_steps`` and the last
step) and before any early stop, holding everything an exact resume needs (sftdist.run.checkpoint writes it)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from sftdist import __version__
from sftdist.config import SFTConfig
from sftdist.metrics import MetricsLogger
from sftdist.parallel import Strategy
from sftdist.run.checkpoint import checkpoints_dir, save_checkpoint
from sftdist.run.identity import flat_config
from sftdist.run.layout import CURRICULUM_FILE, HF_DIR
from sftdist.run.state import TrainerState
from sftdist.run.storage import low_space_warning, size_of
from sftdist.training.best import BestCheckpoint
from sftdist.training.hf import HFWriter
from sftdist.training.nonfinite import NonFiniteSteps

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(
        self,
        cfg: SFTConfig,
        strategy: Strategy,
        hf: HFWriter,
        identity: dict,
        wandb_run_id: str,
        curriculum_report: dict | None,
        row_buckets: np.ndarray | None,
        metrics: MetricsLogger,
        expected_size: int,
        nonfinite: NonFiniteSteps,
        best: BestCheckpoint,
    ):
        """``expected_size``: the bytes of a checkpoint, until one is written (the one resumed from, or an estimate)."""
        self.cfg, self.strategy, self.hf = cfg, strategy, hf
        self.identity, self.wandb_run_id = identity, wandb_run_id
        self.curriculum_report, self.row_buckets = curriculum_report, row_buckets
        self.metrics, self.size, self.nonfinite, self.best = metrics, expected_size, nonfinite, best
        self.root = checkpoints_dir(cfg.output_dir)

    def due(self, done_steps: int, stopping: bool) -> bool:
        """Whether to checkpoint after ``done_steps`` steps: on the cadence, at the last step, or before a stop."""
        every = self.cfg.checkpoint.every_steps
        return stopping or bool(every and (done_steps % every == 0 or done_steps == self.cfg.train.max_steps))

    def save(self, step: int, model, optimizer) -> Path:
        """``checkpoints/step_<step>`` (a collective: every rank calls it)."""
        state = TrainerState(
            step=step,
            world_size=self.strategy.world_size,
            strategy={"name": self.strategy.name, "format": self.strategy.checkpoint_format},
            identity=self.identity,
            config=flat_config(self.cfg),
            wandb_run_id=self.wandb_run_id,
            # The schedule is the config and the step; the buckets are kept whole (CURRICULUM_FILE)
            curriculum={"name": self.cfg.curriculum.name, "report": self.curriculum_report},
            sftdist_version=__version__,
            skipped_steps=self.nonfinite.skipped,
            nonfinite_in_a_row=self.nonfinite.in_a_row,
            best_step=self.best.step,
            best_value=self.best.value,
            evals_since_best=self.best.evals_since,
            best_of=self.best.of,
        )
        begin = time.perf_counter()
        warning = low_space_warning(self.root, self.size) if self.strategy.is_main else None
        if warning:  # said before the write, which may still fit, and where the run is watched
            log.warning("%s", warning)
            self.metrics.alert("sftdist: disk space", warning)
        path = save_checkpoint(
            self.root,
            self.strategy,
            model,
            optimizer,
            state,
            lambda directory: self._write_main_files(directory, step),
            self.cfg.checkpoint.keep,
            needed=self.size,
            protect=self.best.step,
        )
        if self.strategy.is_main:
            self.size = size_of(path)
            log.info("checkpoint: %s (%.1f s)", path, time.perf_counter() - begin)
        return path

    def _write_main_files(self, checkpoint: Path, step: int) -> list[Path]:
        """What rank 0 alone adds to a checkpoint: the export's meta files, the curriculum's buckets."""
        self.hf.write_meta(checkpoint / HF_DIR, step)
        written = [p for p in (checkpoint / HF_DIR).rglob("*") if p.is_file()]
        if self.row_buckets is not None:
            np.save(checkpoint / CURRICULUM_FILE, self.row_buckets, allow_pickle=False)
            written.append(checkpoint / CURRICULUM_FILE)
        return written
