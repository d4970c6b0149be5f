"""Metrics: trackers (jsonl, W&B)."""

from sftdist.metrics.trackers import MetricsLogger, build_metrics_logger, check_wandb, resolve_wandb_mode

__all__ = ["MetricsLogger", "build_metrics_logger", "check_wandb", "resolve_wandb_mode"]
