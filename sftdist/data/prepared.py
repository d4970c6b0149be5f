"""Prepared data on disk: the encoded, filtered samples of a data configuration, keyed by a fingerprint.

A prepared directory is a saved Hugging Face dataset (``datasets.load_from_disk`` reads it; columns ``input_ids``,
``labels``, ``length``, ``num_supervised``, ``part``, ``source``, ``meta`` (JSON), ``conv`` (the canonical conversation,
JSON); one row per sample: a record whose template rewrites history is several samples, rows in a row, ``part`` 0, 1,
...; memory-mapped when loaded), written a shard at a time as records are encoded (``ShardWriter``: memory does not grow
with the data, and a stopped preparation continues where it was), plus ``sftdist_prepared.json``: the fingerprint,
the tokenizer and chat-template hashes, the settings and the data report. The cache (``data.cache_dir``, default
``$SFTDIST_CACHE_DIR`` or ``~/.cache/sftdist``) holds one per fingerprint; ``sftdist-prepare`` writes one where it
is told, for ``data.prepared=DIR``.

The fingerprint covers the content of every data file (and of the decontamination file), the tokenizer,
the chat template and every setting that changes the samples; source weights and the eval hold-out are
applied after loading and are not part of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sftdist.config import DataConfig
from sftdist.data.sources import must_exist, source_files
from sftdist.errors import ConfigError

log = logging.getLogger(__name__)

PIPELINE_VERSION = 4  # bump when encoding or filtering changes what the same inputs produce
MANIFEST = "sftdist_prepared.json"


def _update_with_path(h: hashlib._Hash, path: Path) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)


def tokenizer_hash(tokenizer: Any) -> str:
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def fingerprint(sources: list, tokenizer: Any, template: str, cfg: DataConfig) -> str:
    """A digest of everything that determines the prepared samples."""
    import jinja2
    import tokenizers
    import transformers

    h = hashlib.sha256(f"sftdist-prepared-v{PIPELINE_VERSION}".encode())
    # rendering and tokenization can change with these libraries
    h.update(f"{transformers.__version__} {tokenizers.__version__} {jinja2.__version__}".encode())
    for source in sources:
        split = [source.split] if source.split != "train" else []  # (a DatasetDict's other split)
        h.update(json.dumps([source.name, source.format, *split]).encode())
        if source.path is not None:
            for path in source_files(source.key, source.path):  # (every shard of a directory or glob)
                _update_with_path(h, path)
        else:
            h.update(json.dumps(source.records, sort_keys=True).encode())
    if cfg.filters.decontaminate:
        must_exist("data.filters.decontaminate", cfg.filters.decontaminate)
        _update_with_path(h, Path(cfg.filters.decontaminate))
    h.update(tokenizer_hash(tokenizer).encode())
    h.update(template.encode())
    settings = {
        "max_length": cfg.max_length,
        "truncation": cfg.truncation,
        "empty_think": cfg.empty_think,
        "filters": {k: v for k, v in dataclasses.asdict(cfg.filters).items() if k != "decontaminate"},
    }
    if cfg.chat_template_kwargs:  # (absent when empty: the fingerprints of runs without them stay as they were)
        settings["chat_template_kwargs"] = dict(cfg.chat_template_kwargs)
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:24]


def make_manifest(report: dict) -> dict:
    return {
        "fingerprint": report["fingerprint"],
        "pipeline_version": PIPELINE_VERSION,
        "report": report,
        "tokenizer_hash": report["tokenizer_hash"],
        "template_hash": report["template_hash"],
        "settings": report["settings"],
    }


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("SFTDIST_CACHE_DIR") or Path.home() / ".cache" / "sftdist"
    return Path(root).expanduser() / "prepared"


def _features() -> Any:
    """The columns of a prepared table (``datasets`` features, in column order)."""
    import datasets

    tokens = datasets.List(datasets.Value("int32"))
    return datasets.Features(
        {
            "input_ids": tokens,
            "labels": tokens,
            "length": datasets.Value("int32"),
            "num_supervised": datasets.Value("int32"),
            "part": datasets.Value("int32"),  # the sample's place among its record's (0: the first or only one)
            **{name: datasets.Value("string") for name in TEXT_COLUMNS},
        }
    )


TEXT_COLUMNS = ("source", "meta", "conv")


def record_batch(encoded: dict[str, Any], keep: list[int], texts: dict[str, list[str]]) -> Any:
    """The samples of the records ``keep`` of an encoded chunk (``encode.py``: flat ``ids``/``labels`` buffers and
    per-sample ``length``, ``num_supervised``, ``part``; a record not kept has no samples) as an Arrow record batch
    of the prepared table; ``texts`` holds the text columns of the kept records, repeated for each of their
    samples. Token columns are list arrays over the flat buffers: no per-row step."""
    import pyarrow as pa

    counts = np.asarray(encoded["samples"], dtype=np.int64)
    assert counts.sum() == counts[np.asarray(keep, dtype=np.int64)].sum(), "samples of a record not kept"
    lengths = np.asarray(encoded["length"], dtype=np.int64)
    offsets = pa.array(np.concatenate(([0], np.cumsum(lengths))).astype(np.int32))
    repeat = counts[np.asarray(keep, dtype=np.int64)]
    columns = [
        pa.ListArray.from_arrays(offsets, pa.array(encoded["ids"])),
        pa.ListArray.from_arrays(offsets, pa.array(encoded["labels"])),
        pa.array(lengths.astype(np.int32)),
        pa.array(np.asarray(encoded["num_supervised"], dtype=np.int32)),
        pa.array(np.asarray(encoded["part"], dtype=np.int32)),
        *(pa.array(np.repeat(np.array(texts[name], dtype=object), repeat), pa.string()) for name in TEXT_COLUMNS),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=_features().arrow_schema)


class ShardWriter:
    """Writes a prepared directory a shard at a time, into ``DIR.partial`` beside it, and moves it into place
    whole at the end (a crashed or stopped writer leaves no half directory). A later writer of the same
    fingerprint continues the work: a shard finished before (its ``.arrow`` and its ``.json`` summary) is kept,
    the one being written is written again. Each shard is an Arrow stream file as ``datasets``' ``save_to_disk``
    writes them, so the result is memory-mapped when loaded, as a saved dataset is."""

    def __init__(self, directory: Path, digest: str, layout: str):
        """``layout`` says how records are cut into shards: work is continued only under the same one."""
        self.directory, self.digest = Path(directory), digest
        check_replaceable(self.directory)
        self.work = self.directory.with_name(f"{self.directory.name}.partial")
        stamp, expected = self.work / "fingerprint", f"{digest} (pipeline version {PIPELINE_VERSION}; {layout})"
        if self.work.exists() and not (stamp.is_file() and stamp.read_text() == expected):
            shutil.rmtree(self.work)  # unfinished work of other data, settings or shard layout
        self.work.mkdir(parents=True, exist_ok=True)
        stamp.write_text(expected)
        self.finished: dict[int, dict] = {}
        for summary in sorted(self.work.glob("shard-*.json")):
            shard = int(summary.stem.split("-")[1])
            if (self.work / _shard_file(shard)).is_file():
                self.finished[shard] = json.loads(summary.read_text())
        self._shard: int | None = None
        self._sink: Any = None

    def write(self, shard: int, batch: Any) -> None:
        """Append rows to ``shard`` (opened at its first rows; shards are written in order, one at a time)."""
        if shard != self._shard:
            self._open(shard)
        self._sink.write_batch(batch)

    def _open(self, shard: int) -> None:
        import pyarrow as pa

        if self._sink is not None:
            raise RuntimeError(f"shard {self._shard} was not finished before shard {shard}")
        self._shard = shard
        self._sink = pa.ipc.new_stream(str(self.work / _shard_file(shard)), _features().arrow_schema)

    def finish(self, shard: int, summary: dict) -> None:
        """Close ``shard`` (with no rows, if none were written) and record its summary: the shard is done."""
        if self._sink is None:
            self._open(shard)
        self._sink.close()
        self._sink, self._shard = None, None
        tmp = self.work / f"shard-{shard:05d}.json.tmp"
        tmp.write_text(json.dumps(summary))
        tmp.rename(self.work / f"shard-{shard:05d}.json")  # written last: its presence says the shard is whole
        self.finished[shard] = summary

    def commit(self, manifest: dict) -> Path:
        """Make the finished shards the prepared directory (replacing an earlier one there)."""
        files = [_shard_file(shard) for shard in sorted(self.finished)]
        for leftover in self.work.glob("shard-*"):
            if leftover.name not in files and not leftover.name.endswith(".json"):
                leftover.unlink()  # (a shard begun beyond the last one a resumed run needed)
        state = {
            "_data_files": [{"filename": name} for name in files],
            "_fingerprint": self.digest,
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        (self.work / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        import datasets

        datasets.DatasetInfo(features=_features()).write_to_directory(str(self.work))
        for summary in self.work.glob("shard-*.json"):
            summary.unlink()
        (self.work / "fingerprint").unlink()
        (self.work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.work.rename(self.directory)
        return self.directory


def _shard_file(shard: int) -> str:
    return f"shard-{shard:05d}.arrow"


def check_replaceable(directory: Path) -> None:
    """Only a prepared directory (or an empty one) is ever replaced: said before any work is done."""
    if directory.is_dir() and any(directory.iterdir()) and not (directory / MANIFEST).is_file():
        raise ConfigError(
            f"{directory} exists and is not a prepared-data directory: refusing to replace it; "
            "choose another output_dir"
        )


@contextlib.contextmanager
def writing(directory: Path) -> Iterator[None]:
    """One writer of ``directory`` at a time, across processes and nodes that share the file system (a lock
    file beside it): a second preparation of the same data waits for the first, then finds its result."""
    import fcntl

    directory.parent.mkdir(parents=True, exist_ok=True)
    path = directory.with_name(f"{directory.name}.lock")
    try:
        lock = open(path, "w")  # noqa: SIM115 (closed below)
        fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError as err:  # a file system without locks (some Lustre mounts), a read-only one
        log.warning("data: cannot lock %s (%s): preparing without a lock", path, err)
        yield
        return
    try:
        yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def copy_prepared(source: Path, directory: Path) -> Path:
    """A copy of a prepared directory (e.g. from the cache) at ``directory``, moved into place whole."""
    check_replaceable(directory)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory


def check_prepared(directory: str | Path) -> None:
    """Raise ConfigError naming data.prepared when ``directory`` is not a prepared directory."""
    if not (Path(directory) / MANIFEST).is_file():
        raise ConfigError(
            f"data.prepared={str(directory)!r}: not a prepared directory (no {MANIFEST}); "
            "write one with sftdist-prepare"
        )


def load_prepared(directory: str | Path, in_memory: bool = False) -> tuple[Any, dict]:
    """(table, manifest): the table memory-mapped, or read into memory with ``in_memory``."""
    import datasets

    directory = Path(directory)
    check_prepared(directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    return datasets.load_from_disk(str(directory), keep_in_memory=in_memory), manifest


def check_compatible(manifest: dict, directory: str | Path, tokenizer: Any, template: str, cfg: DataConfig) -> None:
    """A prepared directory must come from this tokenizer, template and template arguments, within this max_length."""
    max_length = cfg.max_length
    where = f"data.prepared={str(directory)!r}"
    if manifest.get("pipeline_version") != PIPELINE_VERSION:
        raise ConfigError(
            f"{where} was written by another sftdist data pipeline "
            f"(version {manifest.get('pipeline_version')}, this is {PIPELINE_VERSION}): prepare it again"
        )
    if manifest["tokenizer_hash"] != tokenizer_hash(tokenizer):
        raise ConfigError(
            f"{where} was encoded with another tokenizer ({manifest['tokenizer_hash']}, this run's is "
            f"{tokenizer_hash(tokenizer)}): prepare it with this run's model.name_or_path/model.tokenizer"
        )
    from sftdist.data.template import template_hash

    if manifest["template_hash"] != template_hash(template):
        raise ConfigError(
            f"{where} was rendered with another chat template ({manifest['template_hash']}, this run's "
            f"is {template_hash(template)}): prepare it with this run's data.chat_template"
        )
    theirs = manifest["report"].get("chat_template_kwargs", {})
    if theirs != dict(cfg.chat_template_kwargs):
        raise ConfigError(
            f"{where} was rendered with data.chat_template_kwargs={theirs}, this run's are "
            f"{dict(cfg.chat_template_kwargs)}: give the same, or prepare it with this run's"
        )
    if manifest["settings"].get("empty_think", "mask") != cfg.empty_think:
        raise ConfigError(
            f"{where} was prepared with data.empty_think={manifest['settings'].get('empty_think', 'mask')}, this run "
            f"asks for {cfg.empty_think}: give the same, or prepare it with this run's"
        )
    if manifest["settings"]["max_length"] > max_length:
        raise ConfigError(
            f"{where} holds samples up to {manifest['settings']['max_length']} tokens, more than "
            f"data.max_length={max_length}"
        )
