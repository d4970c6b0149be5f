"""Steps whose loss or gradient norm is not finite (a bf16 overflow, one broken record): not applied, counted, named
in the log; more than ``train.skip_nonfinite_steps`` in a row end the run.

Every rank decides alike without a collective of its own: the loss is the sum over all ranks and the gradient norm
the global one. The strategies leave such a step's update out (sftdist.parallel: the optimizer does not step, its
state and the weights stay as they were, the gradients are cleared). The data and the learning rate stay functions
of the step number, so a run with a skipped step equals one whose stream never held that step's batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from sftdist.errors import InputError

log = logging.getLogger(__name__)


class DivergedError(InputError, FloatingPointError):
    """Too many non-finite steps in a row: the message says which and what to change."""


def sample_names(train_set: Any, indices: list[int]) -> list[str]:
    """How the log names a step's samples: the source, the row of the prepared table, and the record's own id."""
    names, sources = [], train_set.source_names()
    for i in indices:
        record_id = train_set[i].meta.get("id")
        row = int(train_set.rows[i])
        names.append(f"{sources[i]} row {row}" + (f" (id {record_id})" if record_id is not None else ""))
    return names


class NonFiniteSteps:
    def __init__(self, allowed_in_a_row: int, skipped: int = 0, in_a_row: int = 0):
        """``skipped`` and ``in_a_row``: the counts a checkpoint held (a resumed run goes on counting)."""
        self.allowed, self.skipped, self.in_a_row = allowed_in_a_row, skipped, in_a_row

    def applied(
        self, step: int, stats: dict[str, float], lr: float, samples: Callable[[], list[str]], is_main: bool
    ) -> bool:
        """Whether 0-based ``step`` was applied: its loss and gradient norm are finite. A skipped one is counted
        and said with its samples (``samples()``: their names)."""
        if math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"]):
            self.in_a_row = 0
            return True
        self.last = stats
        self.skipped += 1
        self.in_a_row += 1
        if is_main:
            log.warning(
                "step %d skipped: the loss is %s and the gradient norm %s (lr %.3g); not applied (%d in a row, %d in "
                "all); its samples: %s",
                step + 1, stats["loss"], stats["grad_norm"], lr, self.in_a_row, self.skipped, ", ".join(samples()),
            )  # fmt: skip
        return False

    @property
    def too_many(self) -> bool:
        return self.in_a_row > self.allowed

    def error(self, step: int, checkpoint: Any) -> DivergedError:
        """The one line that ends the run after 0-based ``step``, with the checkpoint just written."""
        first = step + 2 - self.in_a_row
        what = (
            f"step {step + 1}: the loss is {self.last['loss']} and the gradient norm {self.last['grad_norm']}"
            if self.in_a_row == 1
            else f"steps {first} to {step + 1}: the loss or the gradient norm is not finite, {self.in_a_row} in a row"
        )
        where = f"; {checkpoint} holds the weights of step {first - 1}" if checkpoint is not None else ""
        return DivergedError(
            f"{what} (train.skip_nonfinite_steps={self.allowed}){where}; lower train.lr, or check the data and "
            "precision"
        )
