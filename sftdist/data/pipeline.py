"""Records -> canonical conversations -> filters -> encoded samples, every record accounted for.

    records in = records used + records rejected (by reason) + records filtered (by filter)

Rejections are problems with the input (unparsable, wrong shape, the template cannot render or split it,
over-long under ``data.truncation=drop``); when more than ``data.max_rejected_fraction`` of the records are
rejected the run stops before training, naming the reasons and the first offending records. Filters are
choices (duplicates, repetition, ...), counted but never a reason to stop.

Records stream through: read, validated and filtered one at a time, encoded in chunks (batched, in
``data.num_proc`` processes: ``encode.py``) and written a shard at a time (``prepared.ShardWriter``), so the
memory a preparation needs does not grow with the number of records, and a stopped one continues where it was.
The result is cached by a fingerprint of everything it depends on (see ``prepared.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sftdist.config import DataConfig, EvalConfig
from sftdist.data.encode import encode_chunks
from sftdist.data.filters import RecordFilter
from sftdist.data.formats import Rejected, normalise
from sftdist.data.prepared import (
    MANIFEST,
    ShardWriter,
    cache_root,
    check_compatible,
    copy_prepared,
    fingerprint,
    load_prepared,
    make_manifest,
    record_batch,
    tokenizer_hash,
    writing,
)
from sftdist.data.sources import (
    ReadProgress,
    Source,
    source_weights,
    sources_from_config,
    with_format,
)
from sftdist.data.template import IGNORE_INDEX, check_serving, template_hash
from sftdist.errors import DataError

log = logging.getLogger(__name__)
_MAX_EXAMPLES = 5  # examples kept per reason in the report
_AUTO_PARALLEL_BYTES = 16 << 20  # below this much input, worker start-up costs more than it saves
_CHUNK = 512  # conversations per encoding task
_FIRST_CHUNK = 32  # ... but the first chunks are smaller (32, 64, ...): a small input is still several chunks, so
# its rendering overlaps its tokenization and its chunks spread over the workers
_SHARD_CHUNKS = 64  # chunks per shard of prepared data (32,768 conversations; the first, 31,200): what a stopped
# preparation redoes
_PROGRESS_SECONDS = 10.0  # between progress lines in the log


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
    """Counts per reason, with the first few records named, per source, and the figures of the records used. The
    reading keeps one, each shard another (saved beside it, so that a continued preparation adds up the same);
    merged in record order, they are the report's."""

    def __init__(self):
        self.counts: dict[str, Counter] = {"rejected": Counter(), "filtered": Counter()}
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.by_source: dict[str, Counter] = defaultdict(Counter)  # records_in, rejected, filtered, used, tokens, ...
        self.formats: dict[str, str | None] = {}
        self.reasons_by_source: dict[str, Counter] = defaultdict(Counter)
        self.used = Counter()  # truncated_records, truncated_tokens
        self.adaptations = Counter()
        self.ends = Counter()  # the token ids that end trained turns

    def add(self, kind: str, reason: str, where: str, detail: str, source: str) -> None:
        self.counts[kind][reason] += 1
        self.by_source[source][kind] += 1
        self.reasons_by_source[source][reason] += 1
        if len(self.examples[reason]) < _MAX_EXAMPLES:
            self.examples[reason].append(f"{where}: {detail}" if detail else where)

    def merge(self, other: _Tally) -> None:
        for kind, counts in other.counts.items():
            self.counts[kind].update(counts)
        for reason, examples in other.examples.items():
            self.examples[reason] = (self.examples[reason] + examples)[:_MAX_EXAMPLES]
        for name, counts in other.by_source.items():
            self.by_source[name].update(counts)
        for name, counts in other.reasons_by_source.items():
            self.reasons_by_source[name].update(counts)
        self.formats.update(other.formats)
        self.used.update(other.used)
        self.adaptations.update(other.adaptations)
        self.ends.update(other.ends)

    def to_json(self) -> dict:
        return {**vars(self), "ends": {str(k): v for k, v in self.ends.items()}}

    @classmethod
    def from_json(cls, saved: dict) -> _Tally:
        tally = cls()
        tally.counts = {kind: Counter(c) for kind, c in saved["counts"].items()}
        tally.examples = defaultdict(list, saved["examples"])
        for name in ("by_source", "reasons_by_source"):
            setattr(tally, name, defaultdict(Counter, {k: Counter(v) for k, v in saved[name].items()}))
        tally.formats = saved["formats"]
        tally.used, tally.adaptations = Counter(saved["used"]), Counter(saved["adaptations"])
        tally.ends = Counter({int(k): v for k, v in saved["ends"].items()})
        return tally


def _read(
    sources: list[Source], record_filter: RecordFilter, tally: _Tally, progress: ReadProgress
) -> Iterator[tuple[str, str, dict]]:
    """(source, where, canonical conversation) of each record that parses, validates and passes the filters
    that compare records; the others are counted."""
    for source in sources:
        for where, raw, fmt in with_format(source, progress):
            tally.by_source[source.name]["records_in"] += 1
            progress.records += 1
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


@dataclass
class _Chunk:
    shard: int
    records: list[tuple[str, str, dict]]  # (source, where, conversation)


def _chunks(records: Iterator[tuple[str, str, dict]], done: set[int], meter: _Meter) -> Iterator[tuple[_Chunk, list]]:
    """(chunk, its conversations) to encode, ``_CHUNK`` conversations at a time (after the first, smaller ones),
    ``_SHARD_CHUNKS`` chunks to a shard. The chunks of a shard in ``done`` (finished by an earlier run) are read, so
    that the filters that compare records and the counts see their records, but not handed out."""
    for index, chunk in enumerate(_batched(records, _chunk_sizes())):
        shard = index // _SHARD_CHUNKS
        if shard not in done:
            yield _Chunk(shard, chunk), [conv for _, _, conv in chunk]
        meter.tick()


def _chunk_sizes() -> Iterator[int]:
    """_FIRST_CHUNK, doubling up to _CHUNK, then _CHUNK for ever."""
    size = min(_FIRST_CHUNK, _CHUNK)
    while True:
        yield size
        size = min(2 * size, _CHUNK)


def _batched(items: Iterator[Any], sizes: Iterator[int]) -> Iterator[list[Any]]:
    """Lists of the next size's number of items (the last one shorter)."""
    while batch := list(itertools.islice(items, next(sizes))):
        yield batch


def _num_proc(cfg: DataConfig, input_size: int) -> int:
    """data.num_proc, or by input size: below ~16 MB of data, starting workers costs more than they save."""
    if cfg.num_proc:
        return cfg.num_proc
    return 1 if input_size < _AUTO_PARALLEL_BYTES else max(1, min(os.cpu_count() or 1, 8))


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
    """(encoded table, report) for the configured sources: from the cache when it holds them, else prepared (into
    the cache, or with ``data.cache=false`` into a temporary directory and then memory)."""
    check_serving(tokenizer, template, cfg.chat_template_kwargs)
    with quiet_datasets():
        sources = sources_from_config(cfg, seed)
        digest = fingerprint(sources, tokenizer, template, cfg)
        if not cfg.cache:
            with tempfile.TemporaryDirectory(prefix="sftdist-prepare-") as tmp:
                report = write_prepared(cfg, sources, tokenizer, template, digest, Path(tmp) / digest)
                table, _ = load_prepared(Path(tmp) / digest, in_memory=True)
            return table, _said(report)
        cached = cache_root(cfg) / digest
        if cached.is_dir():  # (no lock to take: a read-only cache is fine)
            log.info("data: prepared samples from the cache (%s)", cached)
        else:
            with writing(cached):  # (another process preparing the same data: wait for it, then read its result)
                if not cached.is_dir():
                    write_prepared(cfg, sources, tokenizer, template, digest, cached)
        table, manifest = load_prepared(cached)
        return table, _said(_with_threshold(manifest["report"], cfg))


def prepare_into(cfg: DataConfig, tokenizer: Any, template: str, seed: int, directory: Path) -> dict:
    """Prepare into ``directory`` (sftdist-prepare's output_dir) and return the report: nothing to do when it holds
    this data already, a copy of the cache's when that does, else written there (continuing a stopped run)."""
    check_serving(tokenizer, template, cfg.chat_template_kwargs)
    with quiet_datasets():
        sources = sources_from_config(cfg, seed)
        digest = fingerprint(sources, tokenizer, template, cfg)
        cached = cache_root(cfg) / digest
        with writing(directory):
            if (directory / MANIFEST).is_file() and json.loads((directory / MANIFEST).read_text()).get(
                "fingerprint"
            ) == digest:
                log.info("data: %s already holds this data (fingerprint %s)", directory, digest)
            elif cfg.cache and cached.is_dir():
                log.info("data: copying the prepared samples from the cache (%s)", cached)
                copy_prepared(cached, directory)
            else:
                return _said(write_prepared(cfg, sources, tokenizer, template, digest, directory))
        _, manifest = load_prepared(directory)
        return _said(_with_threshold(manifest["report"], cfg))


def _said(report: dict) -> dict:
    """The report, after saying in the log what it holds that the user did not ask for: conversations the template
    renders differently from a server (several samples each, at a cost in context tokens), reasoning not trained."""
    for name, source in report["sources"].items():
        if source.get("split_records"):
            log.info(
                "data: %s: the chat template renders %d of %d records differently from what a server renders at an "
                "earlier turn: they became %d serving-exact samples, repeating %d context tokens (%.1f%% of %d)",
                name,
                source["split_records"],
                source["records_used"],
                source["samples"] - (source["records_used"] - source["split_records"]),
                source["extra_context_tokens"],
                100 * source["extra_context_tokens"] / max(1, source["num_tokens"]),
                source["num_tokens"],
            )
    dropped = report["adaptations"].get("reasoning_dropped")
    if dropped:
        log.warning(
            "data: %d records carry reasoning that the chat template does not render: it is not trained "
            "(reasoning_dropped; a template that renders reasoning_content trains it)",
            dropped,
        )
    return report


def _with_threshold(report: dict, cfg: DataConfig) -> dict:
    """A report read back, checked against this run's data.max_rejected_fraction (not the writer's)."""
    check_rejections(report["rejected"], report["examples"], report["records_in"], cfg.max_rejected_fraction)
    return {**report, "settings": {**report["settings"], "max_rejected_fraction": cfg.max_rejected_fraction}}


def write_prepared(
    cfg: DataConfig, sources: list[Source], tokenizer: Any, template: str, digest: str, directory: Path
) -> dict:
    """Read, validate, filter and encode the sources into the prepared ``directory``, streaming: records go
    through in chunks and are written a shard at a time, so memory does not grow with the data (what does:
    exact dedup's 8-byte hash per record, near dedup's signatures, see ``filters.py``). A preparation that was
    stopped is continued: its finished shards are read again (the filters and the counts need their records) but
    not encoded again. Returns the report; raises DataError when too much was rejected or nothing is usable."""
    writer = ShardWriter(
        directory,
        digest,
        layout=f"chunks of {min(_FIRST_CHUNK, _CHUNK)} doubling to {_CHUNK} conversations, {_SHARD_CHUNKS} a shard",
    )
    if writer.finished:
        log.info("data: continuing the preparation in %s (%d shards done before)", writer.work, len(writer.finished))
    eval_texts = _decontamination_texts(cfg.filters.decontaminate) if cfg.filters.decontaminate else None
    record_filter = RecordFilter(cfg.filters, eval_texts)
    read_tally, progress = _Tally(), ReadProgress(sources)
    meter = _Meter(progress)
    chunks = _chunks(_read(sources, record_filter, read_tally, progress), set(writer.finished), meter)
    encoded_chunks = encode_chunks(chunks, tokenizer, template, cfg, _num_proc(cfg, progress.total))
    shard, tally = None, _Tally()
    for chunk, encoded in encoded_chunks:
        if chunk.shard != shard:
            if shard is not None:
                writer.finish(shard, tally.to_json())
            shard, tally = chunk.shard, _Tally()
        keep = _count(chunk, encoded, tally)
        convs = [chunk.records[i] for i in keep]
        texts = {
            "source": [name for name, _, _ in convs],
            "meta": [json.dumps(c["meta"], ensure_ascii=False, default=str) for _, _, c in convs],
            "conv": [json.dumps(c, ensure_ascii=False, default=str) for _, _, c in convs],
        }
        writer.write(shard, record_batch(encoded, keep, texts))
        meter.tokens += int(sum(encoded["length"]))
    if shard is not None:
        writer.finish(shard, tally.to_json())
    for _, saved in sorted(writer.finished.items()):
        read_tally.merge(_Tally.from_json(saved))
    report = _report(cfg, sources, read_tally, digest, tokenizer, template, record_filter)
    check_rejections(report["rejected"], report["examples"], report["records_in"], cfg.max_rejected_fraction)
    if not report["records_used"]:
        raise DataError(
            f"no usable records: rejected {report['rejected']}, filtered {report['filtered']} "
            f"(examples: {report['examples']})"
        )
    writer.commit(make_manifest(report))
    log.info("data: %s", meter.line(final=True))
    return report


def _count(chunk: _Chunk, encoded: dict[str, Any], tally: _Tally) -> list[int]:
    """Count an encoded chunk's records in ``tally``; the indices of the ones used."""
    keep, row = [], 0  # (the first sample of the record at hand)
    for i, ((source, where, _), filtered, status) in enumerate(
        zip(chunk.records, encoded["filtered"], encoded["status"])
    ):
        if filtered:
            tally.add("filtered", filtered, where, "", source)
        elif status:
            tally.add("rejected", status, where, encoded["detail"][i], source)
        else:
            keep.append(i)
            rows = range(row, row + encoded["samples"][i])
            row = rows.stop
            tally.by_source[source].update(
                used=1,
                samples=len(rows),
                split=len(rows) > 1,
                extra_context=encoded["extra_context_tokens"][i],
                tokens=sum(encoded["length"][j] for j in rows),
                supervised=sum(encoded["num_supervised"][j] for j in rows),
            )
            if encoded["num_truncated"][i]:
                tally.used.update(truncated_records=1, truncated_tokens=encoded["num_truncated"][i])
            tally.adaptations.update(set(encoded["adaptations"][i]))
            for j in rows:
                tally.ends.update(encoded["turn_ends"][j])
    return keep


class _Meter:
    """The progress of a preparation, said in the log every ``_PROGRESS_SECONDS``: records read (and the share of
    the input's bytes), records and tokens per second, and the time left."""

    def __init__(self, progress: ReadProgress):
        self.progress, self.tokens = progress, 0
        self.start = self.said = time.monotonic()

    def tick(self) -> None:
        """Say the progress if it is time to."""
        if time.monotonic() - self.said >= _PROGRESS_SECONDS:
            self.said = time.monotonic()
            log.info("data: %s", self.line())

    def line(self, final: bool = False) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        records, fraction = self.progress.records, self.progress.fraction()
        rates = f"{records / elapsed:,.0f} records/s, {self.tokens / elapsed:,.0f} tokens/s"
        if final:
            return f"prepared {records:,} records in {elapsed:.1f} s ({rates})"
        share = f" ({100 * fraction:.0f}%)" if fraction is not None else ""
        left = f", about {_duration(elapsed * (1 - fraction) / fraction)} left" if fraction else ""
        return f"{records:,} records read{share}, {rates}{left}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


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
    digest: str,
    tokenizer: Any,
    template: str,
    record_filter: RecordFilter,
) -> dict:
    per_source: dict[str, dict] = {}
    for s in sources:
        c = tally.by_source[s.name]
        per_source[s.name] = {
            "path": s.path,
            "format": tally.formats.get(s.name),
            "weight": s.weight,
            "records_in": c["records_in"],
            "records_used": c["used"],
            "rejected": c["rejected"],
            "filtered": c["filtered"],
            "reasons": dict(tally.reasons_by_source[s.name].most_common()),
            "samples": c["samples"],
            "split_records": c["split"],
            "extra_context_tokens": c["extra_context"],
            "num_tokens": c["tokens"],
            "num_supervised_tokens": c["supervised"],
            "supervised_fraction": round(c["supervised"] / max(1, c["tokens"]), 4),
        }
    records_in = sum(c["records_in"] for c in tally.by_source.values())
    report = {
        "records_in": records_in,
        "records_used": sum(c["used"] for c in tally.by_source.values()),
        # Records whose template rewrites history become several serving-exact samples: how many, and the context
        # tokens their extra samples repeat (all of them but the longest one's)
        "samples": sum(c["samples"] for c in tally.by_source.values()),
        "split_records": sum(c["split"] for c in tally.by_source.values()),
        "extra_context_tokens": sum(c["extra_context"] for c in tally.by_source.values()),
        "rejected": dict(tally.counts["rejected"].most_common()),
        "filtered": dict(tally.counts["filtered"].most_common()),
        "examples": dict(tally.examples),
        "truncated": {"records": tally.used["truncated_records"], "tokens": tally.used["truncated_tokens"]},
        "adaptations": dict(tally.adaptations),
        "sources": per_source,
        "num_tokens": sum(c["tokens"] for c in tally.by_source.values()),
        "num_supervised_tokens": sum(c["supervised"] for c in tally.by_source.values()),
        "end_of_turn_ids": {str(k): v for k, v in tally.ends.most_common()},
        "template_hash": template_hash(template),
        "chat_template_kwargs": dict(cfg.chat_template_kwargs),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "fingerprint": digest,
        "settings": {
            "max_length": cfg.max_length,
            "truncation": cfg.truncation,
            "empty_think": cfg.empty_think,
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
    """(train rows with source weights applied, eval rows): the eval records are chosen by seed before weighting,
    so no weighted copy of an eval record is trained on. Records, not rows: the samples of a record (``part``) go
    to the same side together, and are weighted together."""
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
    train = [
        _weighted(np.flatnonzero(train_mask & (names == name)), weights.get(name, 1.0), rng)
        for name in dict.fromkeys(names.tolist())
    ]
    train_records = np.sort(np.concatenate(train)) if train else np.zeros(0, np.int64)
    return _rows_of(train_records, starts, sizes), _rows_of(eval_records, starts, sizes)


def _rows_of(records: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The table rows of records (each its samples, in order)."""
    counts = sizes[records]
    offsets = np.repeat(starts[records] - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
    return (np.arange(int(counts.sum())) + offsets).astype(np.int64)


def build_datasets(
    cfg: DataConfig, eval_cfg: EvalConfig, tokenizer: Any, template: str, seed: int
) -> tuple[EncodedSet, EncodedSet, dict]:
    """(train samples, eval samples, report) for a run: from data.prepared, the cache, or prepared now."""
    if cfg.prepared is not None:  # weights as sftdist-prepare was configured
        table, manifest = load_prepared(cfg.prepared)
        check_compatible(manifest, cfg.prepared, tokenizer, template, cfg)
        report = _said(manifest["report"])
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
    record_of = np.cumsum(table.data.column("part").to_numpy() == 0) - 1  # (a row's record)
    report = {
        **report,
        "records_train": int(len(np.unique(record_of[train_rows]))) if len(train_rows) else 0,
        "records_eval": int(len(np.unique(record_of[eval_rows]))) if len(eval_rows) else 0,
        "train_samples_per_epoch": int(len(train_rows)),
        # What the sample stream draws from: a resumed run must draw from the very same rows (sftdist.run.identity).
        "train_rows_hash": hashlib.sha256(np.asarray(train_rows, dtype=np.int64).tobytes()).hexdigest()[:16],
    }
    return EncodedSet(table, train_rows), EncodedSet(table, eval_rows), report
