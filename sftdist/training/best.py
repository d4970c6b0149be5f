"""The best checkpoint and early stopping, by one eval metric (``checkpoint.keep_best``, ``checkpoint.keep_best_mode``).

An eval that improves the metric by more than ``train.early_stopping_min_delta`` makes its step the best: it is
checkpointed then (whatever the cadence), and that checkpoint is never pruned while it is the best. With
``train.early_stopping_patience`` N, N evals in a row without such an improvement end the run (with a checkpoint, exit
status 0). The eval before training is the baseline: it names no best (it has no checkpoint). Every rank computes the
same (the eval metrics are summed over all ranks), and a resume restores the counts (trainer_state.json).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from sftdist.config import SFTConfig
from sftdist.errors import ConfigError

log = logging.getLogger(__name__)


class BestCheckpoint:
    def __init__(
        self,
        cfg: SFTConfig,
        step: int | None = None,
        value: float | None = None,
        evals_since: int = 0,
        of: str | None = None,
    ):
        """``step``, ``value``, ``evals_since``: what a checkpoint held, the best by ``of`` (a resumed run goes on
        from them, unless it watches another metric or mode: then it starts afresh)."""
        self.metric, self.mode = cfg.checkpoint.keep_best, cfg.checkpoint.keep_best_mode
        self.patience, self.min_delta = cfg.train.early_stopping_patience, cfg.train.early_stopping_min_delta
        self.step, self.value, self.evals_since = (step, value, evals_since) if of == self.of else (None, None, 0)

    @property
    def of(self) -> str | None:
        """What the best is by: the metric and the mode (kept in checkpoints)."""
        return None if self.metric is None else f"{self.metric} {self.mode}"

    def update(self, done_steps: int, metrics: dict[str, Any]) -> bool:
        """After the eval of ``done_steps`` (0: the baseline): whether this step is now the best."""
        if self.metric is None:
            return False
        if self.metric not in metrics:
            logged = ", ".join(sorted(k for k in metrics if k.startswith("eval/")))
            raise ConfigError(f"checkpoint.keep_best={self.metric!r} is not an eval metric this run logs: {logged}")
        value = float(metrics[self.metric])
        if done_steps == 0 or not math.isfinite(value):  # (no checkpoint of the baseline; a nan is never best)
            return False
        sign = 1.0 if self.mode == "min" else -1.0
        if self.value is None or sign * (self.value - value) > self.min_delta:
            self.step, self.value, self.evals_since = done_steps, value, 0
            return True
        self.evals_since += 1
        return False

    @property
    def stop_early(self) -> bool:
        """Whether ``train.early_stopping_patience`` evals in a row have not improved the metric."""
        return bool(self.patience) and self.evals_since >= self.patience

    def said(self) -> dict[str, Any]:
        """What the step's metrics row says of it (the report marks the best step)."""
        return {} if self.step is None else {"checkpoint/best_step": self.step, "checkpoint/best": self.value}

    def log_stop(self, done_steps: int) -> None:
        log.info(
            "early stopping after step %d: %s has not improved by more than %g in %d evals (best %.6g at step %d)",
            done_steps, self.metric, self.min_delta, self.evals_since, self.value, self.step,
        )  # fmt: skip
