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
import itertools
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftdist.config import DataConfig
from sftdist.data.encode import encode_chunks
from sftdist.data.filters import RecordFilter
from sftdist.data.formats import Rejected, normalise
from sftdist.data.prepared import (
    MANIFEST,
    ShardWriter,
    cache_root,
    copy_prepared,
    fingerprint,
    load_prepared,
    make_manifest,
    record_batch,
    writing,
)
from sftdist.data.report import DataReport, Tally, build_report, check_rejections, log_notes, with_threshold
from sftdist.data.sources import (
    ReadProgress,
    Source,
    sources_from_config,
    with_format,
)
from sftdist.data.template import check_serving
from sftdist.errors import DataError

log = logging.getLogger(__name__)
_AUTO_PARALLEL_BYTES = 16 << 20  # below this much input, worker start-up costs more than it saves
_CHUNK = 512  # conversations per encoding task
_FIRST_CHUNK = 32  # ... but the first chunks are smaller (32, 64, ...): a small input is still several chunks, so
# its rendering overlaps its tokenization and its chunks spread over the workers
_SHARD_CHUNKS = 64  # chunks per shard of prepared data (32,768 conversations; the first, 31,200): what a stopped
# preparation redoes
_PROGRESS_SECONDS = 10.0  # between progress lines in the log


def _read(
    sources: list[Source], record_filter: RecordFilter, tally: Tally, progress: ReadProgress
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


def prepare(cfg: DataConfig, tokenizer: Any, template: str, seed: int) -> tuple[Any, DataReport]:
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
            return table, log_notes(report)
        cached = cache_root(cfg) / digest
        if cached.is_dir():  # (no lock to take: a read-only cache is fine)
            log.info("data: prepared samples from the cache (%s)", cached)
        else:
            with writing(cached):  # (another process preparing the same data: wait for it, then read its result)
                if not cached.is_dir():
                    write_prepared(cfg, sources, tokenizer, template, digest, cached)
        table, manifest = load_prepared(cached)
        return table, log_notes(with_threshold(DataReport.from_json(manifest["report"]), cfg))


def prepare_into(cfg: DataConfig, tokenizer: Any, template: str, seed: int, directory: Path) -> DataReport:
    """Prepare into ``directory`` (sftdist-prepare's output_dir, whose lock the caller holds) and return the report:
    nothing to do when it holds this data already, a copy of the cache's when that does, else written there
    (continuing a stopped run)."""
    check_serving(tokenizer, template, cfg.chat_template_kwargs)
    with quiet_datasets():
        sources = sources_from_config(cfg, seed)
        digest = fingerprint(sources, tokenizer, template, cfg)
        cached = cache_root(cfg) / digest
        if (directory / MANIFEST).is_file() and json.loads((directory / MANIFEST).read_text()).get(
            "fingerprint"
        ) == digest:
            log.info("data: %s already holds this data (fingerprint %s)", directory, digest)
        elif cfg.cache and cached.is_dir():
            log.info("data: copying the prepared samples from the cache (%s)", cached)
            copy_prepared(cached, directory)
        else:
            return log_notes(write_prepared(cfg, sources, tokenizer, template, digest, directory))
        _, manifest = load_prepared(directory)
        return log_notes(with_threshold(DataReport.from_json(manifest["report"]), cfg))


def write_prepared(
    cfg: DataConfig, sources: list[Source], tokenizer: Any, template: str, digest: str, directory: Path
) -> DataReport:
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
    read_tally, progress = Tally(), ReadProgress(sources)
    meter = _Meter(progress)
    chunks = _chunks(_read(sources, record_filter, read_tally, progress), set(writer.finished), meter)
    encoded_chunks = encode_chunks(chunks, tokenizer, template, cfg, _num_proc(cfg, progress.total))
    shard, tally = None, Tally()
    for chunk, encoded in encoded_chunks:
        if chunk.shard != shard:
            if shard is not None:
                writer.finish(shard, tally.to_json())
            shard, tally = chunk.shard, Tally()
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
        read_tally.merge(Tally.from_json(saved))
    report = build_report(cfg, sources, read_tally, digest, tokenizer, template, record_filter)
    check_rejections(report.rejected, report.examples, report.records_in, cfg.max_rejected_fraction)
    if not report.records_used:
        raise DataError(
            f"no usable records: rejected {report.rejected}, filtered {report.filtered} (examples: {report.examples})"
        )
    writer.commit(make_manifest(report.to_json()))
    log.info("data: %s", meter.line(final=True))
    return report


def _count(chunk: _Chunk, encoded: dict[str, Any], tally: Tally) -> list[int]:
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
