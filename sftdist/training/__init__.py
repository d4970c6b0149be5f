"""Training: the loop (``Trainer``) and the components it asks at each step."""

from sftdist.training.optim import build_optimizer, lr_at
from sftdist.training.trainer import Trainer

__all__ = ["Trainer", "build_optimizer", "lr_at"]
