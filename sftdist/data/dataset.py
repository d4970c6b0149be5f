"""A run's samples: the prepared table split into train and eval records, the sources' weights applied, each
sample read from the table when the step sampler asks for it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from sftdist.config import DataConfig, EvalConfig
from sftdist.data.pipeline import prepare
from sftdist.data.prepared import check_compatible, load_prepared
from sftdist.data.report import DataReport, log_notes
from sftdist.data.sources import source_weights
from sftdist.data.template import IGNORE_INDEX
from sftdist.errors import DataError


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids: the token itself where supervised, -100 elsewhere
    meta: dict[str, Any]

    @property
    def num_supervised(self) -> int:
        """Tokens that are next-token targets: the first token is never predicted."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


class EncodedSet:
    """A view of the prepared table: sample ``i`` is table row ``rows[i]`` (rows repeat for weights > 1)."""

    def __init__(self, table: Any, rows: np.ndarray):
        self.table, self.rows = table, np.asarray(rows, dtype=np.int64)
        self._lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def source_names(self) -> np.ndarray:
        """The data source of every sample (data.sources' names)."""
        return np.asarray(self.table.data.column("source").to_pylist())[self.rows]

    def __getitem__(self, i: int) -> Sample:
        row = self.table[int(self.rows[i])]
        return Sample(row["input_ids"], row["labels"], json.loads(row["meta"]))

    @property
    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            self._lengths = self.table.data.column("length").to_numpy()[self.rows]
        return self._lengths


def _weighted(rows: np.ndarray, weight: float, rng: np.random.Generator) -> np.ndarray:
    """Each row ``floor(weight)`` times, plus a seeded ``frac(weight)`` share of them once more."""
    whole, frac = int(weight), weight - int(weight)
    extra = rng.permutation(rows)[: int(round(frac * len(rows)))]
    return np.sort(np.concatenate([np.repeat(rows, whole), extra]))


def mixing_weights(weights: dict[str, float], records: dict[str, int], temperature: float) -> dict[str, float]:
    """Each source's weight with temperature ``T`` applied: its share of the training stream becomes proportional to
    ``weight * n ** (1 / T)`` (``n``: its training records) instead of ``weight * n``, and the weighted records of an
    epoch stay as many as at ``T = 1`` (which changes nothing)."""
    if temperature == 1:
        return dict(weights)
    scaled = {name: weights[name] * n ** (1 / temperature - 1) if n else 0.0 for name, n in records.items()}
    total = sum(scaled[name] * n for name, n in records.items())
    scale = sum(weights[name] * n for name, n in records.items()) / total if total else 1.0
    return {name: w * scale for name, w in scaled.items()}


def split_and_weight(
    table: Any, weights: dict[str, float], num_eval: int, seed: int, temperature: float = 1.0
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(train rows with source weights applied, eval rows, the weights applied): the eval records are chosen by seed
    before weighting, so no weighted copy of an eval record is trained on. Records, not rows: the samples of a record
    (``part``) go to the same side together, and are weighted together. ``temperature``: see
    :func:`mixing_weights`."""
    part = table.data.column("part").to_numpy()
    starts = np.flatnonzero(part == 0)  # the first row of each record
    sizes = np.diff(np.append(starts, len(part)))
    n = len(starts)
    if num_eval >= n:
        raise DataError(
            f"eval.holdout_records={num_eval} leaves no training data: only {n} usable records; "
            "lower eval.holdout_records or set eval.every_steps=0"
        )
    perm = np.random.default_rng([seed, 1]).permutation(n)
    eval_records, train_mask = np.sort(perm[:num_eval]), np.ones(n, dtype=bool)
    train_mask[eval_records] = False
    names = np.asarray(table.data.column("source").take(starts).to_pylist())
    rng = np.random.default_rng([seed, 3])
    records = {name: np.flatnonzero(train_mask & (names == name)) for name in dict.fromkeys(names.tolist())}
    applied = mixing_weights(
        {name: weights.get(name, 1.0) for name in records}, {k: len(v) for k, v in records.items()}, temperature
    )
    train = [_weighted(rows, applied[name], rng) for name, rows in records.items()]
    train_records = np.sort(np.concatenate(train)) if train else np.zeros(0, np.int64)
    return _rows_of(train_records, starts, sizes), _rows_of(eval_records, starts, sizes), applied


def _rows_of(records: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The table rows of records (each its samples, in order)."""
    counts = sizes[records]
    offsets = np.repeat(starts[records] - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
    return (np.arange(int(counts.sum())) + offsets).astype(np.int64)


def build_datasets(
    cfg: DataConfig, eval_cfg: EvalConfig, tokenizer: Any, template: str, seed: int
) -> tuple[EncodedSet, EncodedSet, DataReport]:
    """(train samples, eval samples, report) for a run: from data.prepared, the cache, or prepared now."""
    if cfg.prepared is not None:  # weights as sftdist-prepare was configured
        table, manifest = load_prepared(cfg.prepared)
        check_compatible(manifest, cfg.prepared, tokenizer, template, cfg)
        report = log_notes(DataReport.from_json(manifest["report"]))
        weights = {name: s["weight"] for name, s in report.sources.items()}
    else:  # weights are not part of the fingerprint: this run's
        table, report = prepare(cfg, tokenizer, template, seed)
        weights = source_weights(cfg)
        report.sources = {k: {**v, "weight": weights.get(k, v["weight"])} for k, v in report.sources.items()}
    num_eval = eval_cfg.holdout_records if eval_cfg.every_steps > 0 else 0
    train_rows, eval_rows, applied = split_and_weight(table, weights, num_eval, seed, cfg.mixing_temperature)
    source_of = np.asarray(table.data.column("source").to_pylist())[train_rows]
    for name, source in report.sources.items():  # the realised mixture of an epoch
        source["mixing_weight"] = round(applied.get(name, 0.0), 6)
        source["train_samples"] = int((source_of == name).sum())
        source["train_share"] = round(source["train_samples"] / max(1, len(train_rows)), 6)
    record_of = np.cumsum(table.data.column("part").to_numpy() == 0) - 1  # (a row's record)
    report.records_train = int(len(np.unique(record_of[train_rows]))) if len(train_rows) else 0
    report.records_eval = int(len(np.unique(record_of[eval_rows]))) if len(eval_rows) else 0
    report.train_samples_per_epoch = int(len(train_rows))
    # What the sample stream draws from: a resumed run must draw from the very same rows (sftdist.run.identity).
    report.train_rows_hash = hashlib.sha256(np.asarray(train_rows, dtype=np.int64).tobytes()).hexdigest()[:16]
    return EncodedSet(table, train_rows), EncodedSet(table, eval_rows), report
