"""trainer_state.json, typed: what a resume and ``sftdist-export`` read of a checkpoint.

The JSON keys are the dataclass's field names, as every earlier version wrote them, so older checkpoints still
resume; keys this version no longer reads (``lr``, ``sampler``) are ignored.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftdist.run.layout import STATE_FILE


@dataclass
class TrainerState:
    """Rank 0 writes it into each checkpoint."""

    step: int
    world_size: int
    strategy: dict[str, str]  # {"name", "format"}: which strategies can load the state/ folder
    identity: dict[str, Any]  # what makes it this run (sftdist.run.identity.run_identity)
    config: dict[str, Any]  # the resolved config, flattened (sftdist.run.identity.flat_config)
    wandb_run_id: str | None = None  # the W&B run that a resume in the same output_dir continues
    curriculum: dict[str, Any] | None = None  # {"name", "report"}; the buckets themselves are CURRICULUM_FILE
    sftdist_version: str = ""
    skipped_steps: int = 0  # steps left out for a non-finite loss or gradient norm, and how many of the last in a row
    nonfinite_in_a_row: int = 0
    best_step: int | None = None  # checkpoint.keep_best: the best step so far, its value, evals since (early stopping)
    best_value: float | None = None
    evals_since_best: int = 0
    best_of: str | None = None  # what the best is by: "<metric> <mode>" (checkpoint.keep_best, keep_best_mode)

    @classmethod
    def read(cls, checkpoint: Path) -> TrainerState:
        """The state of ``checkpoint`` (files of earlier versions also hold ``lr`` and ``sampler``, never read)."""
        raw = json.loads((checkpoint / STATE_FILE).read_text())
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})
