"""Records -> canonical conversations -> filters -> encoded samples, every record accounted for.

    records in = records used + records rejected (by reason) + records filtered (by filter)

Rejections are problems with the input (unparsable, wrong shape, the template cannot render or split it,
over-long under ``data.truncation=drop``); when more than ``data.max_rejected_fraction`` of the records are
rejected the run stops before training, naming the reasons and the first offending records. Filters are
choices (duplicates, repetition, ...), counted but never a reason to stop.

Encoding runs batched, in ``data.num_proc`` processes (``encode.py``), and its result is cached by a
fingerprint of everything it depends on (see ``prepared.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sftdist.config import DataConfig, EvalConfig
from sftdist.data.encode import build_table, encode_all
from sftdist.data.filters import RecordFilter
from sftdist.data.formats import Rejected, normalise
from sftdist.data.prepared import (
    cache_root,
    check_compatible,
    fingerprint,
    load_prepared,
    make_manifest,
    save_prepared,
    tokenizer_hash,
)
from sftdist.data.sources import Source, source_files, source_weights, sources_from_config, with_format
from sftdist.data.template import IGNORE_INDEX, template_hash
from sftdist.errors import DataError

log = logging.getLogger(__name__)
_MAX_EXAMPLES = 5  # examples kept per reason in the report
_AUTO_PARALLEL_BYTES = 16 << 20  # below this much input, worker start-up costs more than it saves
_CHUNK = 512  # conversations per encoding task


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids: the token itself where supervised, -100 elsewhere
    meta: dict[str, Any]

    @property
    def num_supervised(self) -> int:
        """Tokens that are next-token targets: the first token is never predicted."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


class _Tally:
    """Counts per reason, with the first few records named, per source."""

    def __init__(self):
        self.counts: dict[str, Counter] = {"rejected": Counter(), "filtered": Counter()}
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.by_source: dict[str, Counter] = defaultdict(Counter)
        self.formats: dict[str, str | None] = {}
        self.reasons_by_source: dict[str, Counter] = defaultdict(Counter)

    def add(self, kind: str, reason: str, where: str, detail: str, source: str) -> None:
        self.counts[kind][reason] += 1
        self.by_source[source][kind] += 1
        self.reasons_by_source[source][reason] += 1
        if len(self.examples[reason]) < _MAX_EXAMPLES:
            self.examples[reason].append(f"{where}: {detail}" if detail else where)


def _read(sources: list[Source], record_filter: RecordFilter, tally: _Tally) -> Iterator[tuple[str, str, dict]]:
    """(source, where, canonical conversation) of each record that parses, validates and passes the filters
    that compare records; the others are counted."""
    for source in sources:
        for where, raw, fmt in with_format(source):
            tally.by_source[source.name]["records_in"] += 1
            if isinstance(raw, Rejected):
                tally.add("rejected", raw.reason, where, raw.detail, source.name)
                continue
            if fmt is None:
                keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
                tally.add(
                    "rejected",
                    "unknown_format",
                    where,
                    f"no record of {source.name} looks like messages, alpaca, sharegpt or "
                    f"prompt_completion (keys: {keys}); set data.format",
                    source.name,
                )
                continue
            tally.formats[source.name] = fmt
            conv = normalise(raw, fmt)
            if isinstance(conv, Rejected):
                tally.add("rejected", conv.reason, where, conv.detail, source.name)
                continue
            conv["meta"].setdefault("source", source.name)
            reason = record_filter.reason(conv)
            if reason is not None:
                tally.add("filtered", reason, where, "", source.name)
                continue
            yield source.name, where, conv


def _chunks(records: Iterator[tuple[str, str, dict]], size: int, kept: list) -> Iterator[list[dict]]:
    """Conversations in chunks of ``size``; every record handed out is also appended to ``kept``."""
    chunk: list[dict] = []
    for record in records:
        kept.append(record)
        chunk.append(record[2])
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _num_proc(cfg: DataConfig, sources: list[Source]) -> int:
    """data.num_proc, or by input size: below ~16 MB of data, starting workers costs more than they save."""
    if cfg.num_proc:
        return cfg.num_proc
    size = sum(_size(f) for s in sources if s.path is not None for f in source_files(s.key, s.path))
    return 1 if size < _AUTO_PARALLEL_BYTES else max(1, min(os.cpu_count() or 1, 8))


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def check_rejections(rejected: dict[str, int], examples: dict[str, list[str]], records_in: int, limit: float) -> None:
    """Stop when more than ``limit`` of the records were rejected, naming reasons and the first records."""
    total = sum(rejected.values())
    if records_in and total / records_in > limit:
        reasons = "; ".join(
            f"{reason}: {n} (first: {', '.join(e.split(': ')[0] for e in examples[reason][:3])})"
            for reason, n in Counter(rejected).most_common()
        )
        hint = (
            " Over-long records: raise data.max_length or set data.truncation=truncate."
            if "too_long" in rejected
            else ""
        )
        raise DataError(
            f"{total} of {records_in} records ({100 * total / records_in:.1f}%) were rejected, more than "
            f"data.max_rejected_fraction={limit}: {reasons}.{hint} sftdist-inspect shows the reasons "
            "in full; raise data.max_rejected_fraction to train on the rest anyway"
        )


@contextlib.contextmanager
def quiet_datasets():
    """datasets' per-operation progress bars are noise in a training log; restored afterwards."""
    from datasets.utils import logging as ds_logging

    enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            ds_logging.enable_progress_bar()


def prepare(cfg: DataConfig, tokenizer: Any, template: str, seed: int) -> tuple[Any, dict]:
    """(encoded table, report) for the configured sources, from the cache when it holds them."""
    with quiet_datasets():
        return _prepare(cfg, tokenizer, template, seed)


def _prepare(cfg: DataConfig, tokenizer: Any, template: str, seed: int) -> tuple[Any, dict]:
    sources = sources_from_config(cfg, seed)
    digest = fingerprint(sources, tokenizer, template, cfg)
    cached = cache_root(cfg) / digest
    if cfg.cache and cached.is_dir():
        table, manifest = load_prepared(cached)
        log.info("data: prepared samples from the cache (%s)", cached)
        report = manifest["report"]  # the threshold is this run's, not the one the cache was written with
        check_rejections(report["rejected"], report["examples"], report["records_in"], cfg.max_rejected_fraction)
        return table, {**report, "settings": {**report["settings"], "max_rejected_fraction": cfg.max_rejected_fraction}}

    tally = _Tally()
    eval_texts = _decontamination_texts(cfg.filters.decontaminate) if cfg.filters.decontaminate else None
    record_filter = RecordFilter(cfg.filters, eval_texts)
    kept: list[tuple[str, str, dict]] = []
    encoded = encode_all(
        _chunks(_read(sources, record_filter, tally), _CHUNK, kept),
        tokenizer,
        template,
        cfg.max_length,
        cfg.truncation,
        cfg.filters,
        _num_proc(cfg, sources),
    )
    records_in = sum(c["records_in"] for c in tally.by_source.values())
    for (source, where, _), filtered, reason, detail in zip(
        kept, encoded["filtered"], encoded["status"], encoded["detail"]
    ):
        if filtered:
            tally.add("filtered", filtered, where, "", source)
        elif reason:
            tally.add("rejected", reason, where, detail, source)
    check_rejections(tally.counts["rejected"], tally.examples, records_in, cfg.max_rejected_fraction)
    convs = [c for _, _, c in kept]
    usable = [i for i, (s, f) in enumerate(zip(encoded["status"], encoded["filtered"])) if not s and not f]
    if not usable:
        raise DataError(
            f"no usable records: rejected {dict(tally.counts['rejected'])}, filtered "
            f"{dict(tally.counts['filtered'])} (examples: {dict(tally.examples)})"
        )
    table = build_table(
        encoded,
        usable,
        {
            "source": [s for s, _, _ in kept],
            "meta": [json.dumps(c["meta"], ensure_ascii=False, default=str) for c in convs],
            "conv": [json.dumps(c, ensure_ascii=False, default=str) for c in convs],
        },
        digest,
    )
    report = _report(cfg, sources, tally, table, encoded, records_in, digest, tokenizer, template, record_filter)
    if cfg.cache:
        save_prepared(table, make_manifest(report), cached, replace=False)
        table, _ = load_prepared(cached)  # memory-mapped from here on
    return table, report


def _decontamination_texts(path: str) -> list[str]:
    texts = []
    for _, raw, fmt in with_format(Source(os.path.basename(path), "auto", 1.0, path)):
        if isinstance(raw, Rejected) or fmt is None:
            continue
        conv = normalise(raw, fmt)
        if not isinstance(conv, Rejected):
            texts.append("\n".join(m["content"] for m in conv["messages"]))
    if not texts:
        raise DataError(f"data.filters.decontaminate={path!r}: no readable eval records in it")
    return texts


def _report(
    cfg: DataConfig,
    sources: list[Source],
    tally: _Tally,
    table: Any,
    columns: dict[str, Any],
    records_in: int,
    digest: str,
    tokenizer: Any,
    template: str,
    record_filter: RecordFilter,
) -> dict:
    used = [not s and not f for s, f in zip(columns["status"], columns["filtered"])]
    truncated = [n for n, ok in zip(columns["num_truncated"], used) if n and ok]
    adaptations = Counter(note for notes, ok in zip(columns["adaptations"], used) if ok for note in set(notes))
    ends = Counter(t for row, ok in zip(columns["turn_ends"], used) if ok for t in row)
    per_source: dict[str, dict] = {}
    lengths = table.data.column("length").to_numpy()
    supervised = table.data.column("num_supervised").to_numpy()
    names = np.asarray(table.data.column("source").to_pylist())
    for s in sources:
        c, mask = tally.by_source[s.name], names == s.name
        per_source[s.name] = {
            "path": s.path,
            "format": tally.formats.get(s.name),
            "weight": s.weight,
            "records_in": c["records_in"],
            "records_used": int(mask.sum()),
            "rejected": c["rejected"],
            "filtered": c["filtered"],
            "reasons": dict(tally.reasons_by_source[s.name].most_common()),
            "num_tokens": int(lengths[mask].sum()),
            "num_supervised_tokens": int(supervised[mask].sum()),
            "supervised_fraction": round(float(supervised[mask].sum() / max(1, lengths[mask].sum())), 4),
        }
    report = {
        "records_in": records_in,
        "records_used": len(table),
        "rejected": dict(tally.counts["rejected"].most_common()),
        "filtered": dict(tally.counts["filtered"].most_common()),
        "examples": dict(tally.examples),
        "truncated": {"records": len(truncated), "tokens": int(sum(truncated))},
        "adaptations": dict(adaptations),
        "sources": per_source,
        "num_tokens": int(lengths.sum()),
        "num_supervised_tokens": int(supervised.sum()),
        "end_of_turn_ids": {str(k): v for k, v in ends.most_common()},
        "template_hash": template_hash(template),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "fingerprint": digest,
        "settings": {
            "max_length": cfg.max_length,
            "truncation": cfg.truncation,
            "max_rejected_fraction": cfg.max_rejected_fraction,
        },
    }
    if record_filter.decontaminator is not None:
        report["decontamination"] = {
            "eval_file": cfg.filters.decontaminate,
            "ngram": cfg.filters.decontaminate_ngram,
            "eval_items_too_short": record_filter.decontaminator.num_too_short,
        }
    assert records_in == report["records_used"] + sum(report["rejected"].values()) + sum(report["filtered"].values())
    return report


class EncodedSet:
    """A view of the prepared table: sample ``i`` is table row ``rows[i]`` (rows repeat for weights > 1)."""

    def __init__(self, table: Any, rows: np.ndarray):
        self.table, self.rows = table, np.asarray(rows, dtype=np.int64)
        self._lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

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


def split_and_weight(table: Any, weights: dict[str, float], num_eval: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows with source weights applied, eval rows): the eval rows are chosen by seed before weighting,
    so no weighted copy of an eval record is trained on."""
    n = len(table)
    if num_eval >= n:
        raise DataError(
            f"eval.holdout_records={num_eval} leaves no training data: only {n} usable records; "
            "lower eval.holdout_records or set eval.every_steps=0"
        )
    perm = np.random.default_rng([seed, 1]).permutation(n)
    eval_rows, train_mask = np.sort(perm[:num_eval]), np.ones(n, dtype=bool)
    train_mask[eval_rows] = False
    names, rng = np.asarray(table.data.column("source").to_pylist()), np.random.default_rng([seed, 3])
    train_rows = [
        _weighted(np.flatnonzero(train_mask & (names == name)), weights.get(name, 1.0), rng)
        for name in dict.fromkeys(names.tolist())
    ]
    return np.sort(np.concatenate(train_rows)) if train_rows else np.zeros(0, np.int64), eval_rows


def build_datasets(
    cfg: DataConfig, eval_cfg: EvalConfig, tokenizer: Any, template: str, seed: int
) -> tuple[EncodedSet, EncodedSet, dict]:
    """(train samples, eval samples, report) for a run: from data.prepared, the cache, or prepared now."""
    if cfg.prepared is not None:  # weights as sftdist-prepare was configured
        table, manifest = load_prepared(cfg.prepared)
        check_compatible(manifest, cfg.prepared, tokenizer, template, cfg.max_length)
        report = manifest["report"]
        weights = {name: s["weight"] for name, s in report["sources"].items()}
    else:  # weights are not part of the fingerprint: this run's
        table, report = prepare(cfg, tokenizer, template, seed)
        weights = source_weights(cfg)
        report = {
            **report,
            "sources": {k: {**v, "weight": weights.get(k, v["weight"])} for k, v in report["sources"].items()},
        }
    num_eval = eval_cfg.holdout_records if eval_cfg.every_steps > 0 else 0
    train_rows, eval_rows = split_and_weight(table, weights, num_eval, seed)
    report = {
        **report,
        "records_train": int(len(np.unique(train_rows))),
        "records_eval": int(len(eval_rows)),
        "train_samples_per_epoch": int(len(train_rows)),
        # What the sample stream draws from: a resumed run must draw from the very same rows (sftdist.resume).
        "train_rows_hash": hashlib.sha256(np.asarray(train_rows, dtype=np.int64).tobytes()).hexdigest()[:16],
    }
    return EncodedSet(table, train_rows), EncodedSet(table, eval_rows), report
