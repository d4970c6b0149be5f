"""The difficulty bucket of every sample (``curriculum.difficulty``), and the report of the buckets.

- ``meta``: the record's own label, ``difficulty`` in its metadata: ``easy`` / ``medium`` / ``hard``, or a number
  cut at ``curriculum.thresholds``. A record without one is scored by ``curriculum.fallback``
  (``curriculum.on_missing=fallback``) or left out of training, counted (``reject``).
- ``length``: supervised tokens; ``turns``: assistant turns; ``model_loss``: the base model's token-mean loss
  (sftdist.curriculum.model_loss). Each is cut into buckets at ``curriculum.quantiles`` (tertiles) of the training rows.

Buckets are computed per row of the prepared table (so the eval rows get one too: ``eval/loss_<bucket>``), from
the training rows' distribution.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sftdist.config import CurriculumConfig, SFTConfig
from sftdist.curriculum.sampler import BUCKETS, CurriculumSampler, check_schedule, config_phases
from sftdist.data.batching import StepSampler
from sftdist.data.dataset import EncodedSet
from sftdist.errors import DataError

MISSING = -1


def meta_buckets(metas: list[dict[str, Any]], thresholds: list[float]) -> np.ndarray:
    """The bucket of each record's ``difficulty`` (a bucket name, or a number cut at ``thresholds``), or MISSING."""
    out = np.full(len(metas), MISSING, dtype=np.int8)
    for i, meta in enumerate(metas):
        label = meta.get("difficulty")
        if isinstance(label, str) and label.strip().lower() in BUCKETS:
            out[i] = BUCKETS.index(label.strip().lower())
        elif isinstance(label, (int, float)) and not isinstance(label, bool) and np.isfinite(label):
            out[i] = int(np.searchsorted(thresholds, label, side="right"))
    return out


def assistant_turns(table: Any) -> np.ndarray:
    """Assistant turns of each row's conversation."""
    convs = table.data.column("conv").to_pylist()
    return np.array([sum(m["role"] == "assistant" for m in json.loads(c)["messages"]) for c in convs], dtype=float)


def cut(scores: np.ndarray, train_rows: np.ndarray, quantiles: list[float]) -> tuple[np.ndarray, list[float]]:
    """(bucket of every row, the edges): edges at ``quantiles`` of the training rows' scores; a score at an edge
    goes to the bucket below it (with few distinct scores, such as turns, ties stay together: one turn is easy)."""
    edges = np.quantile(scores[train_rows], quantiles).tolist() if len(train_rows) else [0.0] * len(quantiles)
    return np.searchsorted(edges, scores, side="left").astype(np.int8), edges


def assign_buckets(
    table: Any,
    train_rows: np.ndarray,
    cfg: CurriculumConfig,
    model_losses: Callable[[], np.ndarray],
) -> tuple[np.ndarray, dict[str, Any]]:
    """(bucket of every table row, MISSING for a row the curriculum leaves out; a report). ``model_losses`` is
    called only when the scorer (or the fallback) needs the base model's loss of every row."""
    scorers = {
        "length": lambda: table.data.column("num_supervised").to_numpy().astype(float),
        "turns": lambda: assistant_turns(table),
        "model_loss": model_losses,
    }
    report: dict[str, Any] = {"difficulty": cfg.difficulty}
    if cfg.difficulty == "meta":
        metas = [json.loads(m) for m in table.data.column("meta").to_pylist()]
        buckets = meta_buckets(metas, list(cfg.thresholds))
        missing = buckets == MISSING
        report["unlabelled"] = int(missing[train_rows].sum())
        if missing.any() and cfg.on_missing == "fallback":
            scored, edges = cut(scorers[cfg.fallback](), train_rows, list(cfg.quantiles))
            buckets = np.where(missing, scored, buckets).astype(np.int8)
            report["fallback"] = {"scorer": cfg.fallback, "edges": edges}
        elif missing.any():
            report["rejected"] = {"no_difficulty": report["unlabelled"]}
    else:
        buckets, report["edges"] = cut(scorers[cfg.difficulty](), train_rows, list(cfg.quantiles))
    return buckets, report


def bucket_report(
    buckets: np.ndarray, train_rows: np.ndarray, eval_rows: np.ndarray, sources: list[str]
) -> dict[str, Any]:
    """Training samples per bucket (per source too) and eval samples per bucket."""

    def sizes(rows: np.ndarray) -> dict[str, int]:
        counts = Counter(int(b) for b in buckets[rows] if b != MISSING)
        return {name: counts.get(b, 0) for b, name in enumerate(BUCKETS)}

    by_source = {}
    names = np.asarray(sources)
    for source in dict.fromkeys(sources):
        by_source[source] = sizes(train_rows[names[train_rows] == source])
    return {"train": sizes(train_rows), "eval": sizes(eval_rows), "by_source": by_source}


@dataclass
class SamplerPlan:
    """What a run's step sampler draws from, and the curriculum's buckets (all None without a curriculum)."""

    sampler: StepSampler | CurriculumSampler
    train_set: EncodedSet  # the training set the sampler draws from (a curriculum may leave unlabelled rows out)
    eval_buckets: np.ndarray | None = None  # the bucket of each eval row
    row_buckets: np.ndarray | None = None  # the bucket of every row of the table (a checkpoint keeps them)
    report: dict[str, Any] | None = None  # the data report's "curriculum" part


def build_sampler(
    cfg: SFTConfig,
    train_set: EncodedSet,
    eval_set: EncodedSet,
    model_losses: Callable[[], np.ndarray],
    saved: tuple[np.ndarray, dict[str, Any]] | None = None,
) -> SamplerPlan:
    """The step sampler: uniform (curriculum=none), or the curriculum's, with the training set it draws from, the
    buckets and their report.

    ``saved``: the buckets and report of the checkpoint being resumed (never recomputed: a model_loss recomputed
    elsewhere could move a sample across an edge by a rounding). ConfigError/DataError name what is wrong.
    """
    if cfg.curriculum.name == "none":
        return SamplerPlan(StepSampler(len(train_set), cfg.train.global_batch_size, cfg.seed), train_set)
    c, t = cfg.curriculum, cfg.train
    row_buckets, report = (
        saved if saved is not None else assign_buckets(train_set.table, train_set.rows, c, model_losses)
    )
    if len(row_buckets) != len(train_set.table):
        raise DataError(
            f"the checkpoint's curriculum buckets cover {len(row_buckets)} samples, the data "
            f"{len(train_set.table)}: resume with the data it was written with"
        )
    keep = row_buckets[train_set.rows] != MISSING
    if not keep.all():  # curriculum.on_missing=reject: left out of training, counted
        left_out = int((~keep).sum())
        if left_out / len(keep) > cfg.data.max_rejected_fraction:
            raise DataError(
                f"{left_out} of {len(keep)} training samples have no difficulty label "
                f"(curriculum.on_missing=reject), more than data.max_rejected_fraction="
                f"{cfg.data.max_rejected_fraction}: label them, or set curriculum.on_missing=fallback"
            )
        train_set = EncodedSet(train_set.table, train_set.rows[keep])
    sources = train_set.table.data.column("source").to_pylist()
    report = {**report, **bucket_report(row_buckets, train_set.rows, eval_set.rows, sources)}
    sizes = [report["train"][name] for name in BUCKETS]
    phases = config_phases(c.phases)
    phases, warnings = check_schedule(phases, sizes, t.global_batch_size, t.max_steps, c.on_empty == "renormalise")
    if len(eval_set):
        warnings += [
            f"no held-out sample is {name}: eval/loss_{name} is not logged"
            for name, n in report["eval"].items()
            if n == 0
        ]
    report["warnings"] = warnings
    sampler = CurriculumSampler(row_buckets[train_set.rows], phases, t.global_batch_size, t.max_steps, cfg.seed)
    return SamplerPlan(sampler, train_set, row_buckets[eval_set.rows], row_buckets, report)
