"""Where records come from: files (jsonl, json, parquet; jsonl and json also gzip- or zstd-compressed), a directory
or a glob of such files (shards, read in sorted order as one source), saved Hugging Face dataset directories (a
DatasetDict's ``split``), or the generated demo; each record with a ``where`` that names it (``FILE line N``,
``FILE record N``, ``DIR row N``).

Records are read one at a time (parquet a batch of rows at a time; a ``.json`` file, one JSON list, a block of the
file at a time), so a source of any size is read in bounded memory. ``ReadProgress`` follows the bytes read.

A record that cannot even be parsed (invalid JSON, not UTF-8) is yielded as a counted rejection, not an
exception: one bad line never stops the others from being read. A file that cannot be read at all
(missing, unsupported, empty, a .json that is not a list) is a DataError naming it, and so is a glob that matches
nothing. A byte-order mark and CRLF line ends are read as what they are.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import gzip
import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftdist.config import DataConfig
from sftdist.data.demo import generate_demo_conversations
from sftdist.data.formats import Rejected, detect_format
from sftdist.data.jsonstream import iter_json_list
from sftdist.errors import DataError

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
COMPRESSED = (".gz", ".zst")  # of .jsonl and .json files


@dataclass
class Source:
    name: str
    format: str  # auto | messages | alpaca | sharegpt | prompt_completion
    weight: float = 1.0
    path: str | None = None  # None: ``records`` holds them (the demo)
    records: list[dict] = field(default_factory=list)
    split: str = "train"  # of a saved DatasetDict
    key: str = "data.path"  # the setting that names it, for errors


def sources_from_config(cfg: DataConfig, seed: int) -> list[Source]:
    """data.path (one source), data.sources (several, weighted), or the generated demo."""
    if cfg.path is not None:
        source_files("data.path", cfg.path)
        return [Source(source_name(cfg.path), cfg.format, 1.0, cfg.path, split=cfg.split)]
    if cfg.sources:
        for i, s in enumerate(cfg.sources):
            source_files(f"data.sources[{i}].path", s.path)
        sources = [
            Source(
                s.name or source_name(s.path), s.format, s.weight, s.path, split=s.split, key=f"data.sources[{i}].path"
            )
            for i, s in enumerate(cfg.sources)
        ]
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise DataError(f"data.sources have the same name twice ({names}); give each a distinct `name`")
        return sources
    return [Source("demo", "messages", 1.0, None, generate_demo_conversations(cfg.demo_size, seed=seed))]


def uses_demo(cfg: DataConfig) -> bool:
    """Whether the run trains on the generated demo: no data.path, no data.sources, no prepared directory."""
    return cfg.path is None and not cfg.sources and cfg.prepared is None


def source_weights(cfg: DataConfig) -> dict[str, float]:
    """{source name: sampling weight} of the configuration, without reading anything."""
    if cfg.path is not None:
        return {source_name(cfg.path): 1.0}
    if cfg.sources:
        return {s.name or source_name(s.path): s.weight for s in cfg.sources}
    return {"demo": 1.0}


def must_exist(key: str, path: str) -> None:
    """Raise FileNotFoundError naming ``key`` when ``path`` does not exist."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{key}={path!r}: no such file or directory")


def source_name(path: str) -> str:
    """A source's default name: its file name without suffixes (a directory's whole name; a glob's fixed part)."""
    p = Path(path)
    if _is_glob(path) and not p.exists():
        fixed = p.name.split("*")[0].split("?")[0].split("[")[0].split(".")[0].rstrip("-_")
        parents = [q.name for q in p.parents if q.name and not _is_glob(str(q))]
        return fixed or (parents[0] if parents else "data")
    return p.name if p.is_dir() else p.name.split(".")[0]


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return any((path / name).is_file() for name in ("dataset_dict.json", "dataset_info.json", "state.json"))


def _data_kind(path: Path) -> str | None:
    """.jsonl, .json or .parquet for a data file (through a compression suffix), else None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1] if len(suffixes) > 1 and suffixes[-2] in (".jsonl", ".json") else [""]
    return suffixes[-1] if suffixes and suffixes[-1] in DATA_SUFFIXES else None


def source_files(key: str, path: str) -> list[Path]:
    """The files a source reads, in order: the file itself, a saved dataset directory, the data files under a
    directory (sorted), or those a glob matches (sorted); FileNotFoundError or DataError naming ``key`` when there is
    nothing to read."""
    p = Path(path).expanduser()
    if _is_glob(path) and not p.exists():
        files = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
        if not files:
            raise FileNotFoundError(f"{key}={path!r}: the pattern matches no file")
    elif not p.exists():
        raise FileNotFoundError(f"{key}={path!r}: no such file or directory")
    elif p.is_dir() and not is_saved_dataset(p):
        files = _directory_files(key, path, p)
    else:
        files = [p]
    unsupported = [f for f in files if not f.is_dir() and _data_kind(f) is None]
    if unsupported:
        raise DataError(
            f"{key}={path!r}: unsupported file type {''.join(unsupported[0].suffixes)!r} ({unsupported[0]}; use "
            ".jsonl, .json, .parquet, .jsonl.gz, .json.gz, .jsonl.zst or a saved datasets directory)"
        )
    empty = [f for f in files if f.is_file() and f.stat().st_size == 0]
    if empty:
        raise DataError(f"{key}={path!r}: {empty[0]} is empty (no records)")
    _one_split(key, path, files)
    return files


_METADATA = ("dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json")
_SPLIT_PREFIX = re.compile(r"^(train|test|validation|valid|val|eval|dev)(?=[-_.])")


def _directory_files(key: str, path: str, directory: Path) -> list[Path]:
    """The data files under ``directory`` (sorted; hidden folders and metadata left out); the files left out are said
    in the log, and a directory with no data file is a DataError."""
    files, skipped = [], []
    for f in sorted(f for f in directory.rglob("*") if f.is_file()):
        hidden = any(part.startswith(".") for part in f.relative_to(directory).parts)
        if hidden:
            continue
        (files if _data_kind(f) is not None and f.name not in _METADATA else skipped).append(f)
    if not files:
        raise DataError(
            f"{key}={path!r}: neither a saved datasets directory nor a directory of data files "
            f"({', '.join(DATA_SUFFIXES)}, .jsonl.gz, ...)"
        )
    if skipped:
        names = ", ".join(str(f.relative_to(directory)) for f in skipped[:5])
        log.info("%s=%s: not data files, left out: %s%s", key, path, names, " ..." if len(skipped) > 5 else "")
    return files


def _one_split(key: str, path: str, files: list[Path]) -> None:
    """Shards of several splits (train-*, test-*: a downloaded hub folder) are never one source."""
    splits = sorted({m.group(1) for f in files if (m := _SPLIT_PREFIX.match(f.name))})
    if len(splits) > 1:
        raise DataError(
            f"{key}={path!r} holds the shards of several splits ({', '.join(splits)}): point it at one split's files "
            f"(a glob such as {str(Path(path) / (splits[-1] + '-*'))!r})"
        )


class ReadProgress:
    """How far the reading of some sources has got, in bytes of their files (compressed bytes for compressed files):
    for a progress display and its ETA. Readers say where they are in the file they read; nothing is counted twice."""

    def __init__(self, sources: list[Source]):
        self.total = input_bytes(sources)
        self.records = 0  # read so far (counted by whoever reads them)
        self._done = 0  # the files read to the end
        self._at: Any = lambda: 0  # bytes read of the current file
        self._last = 0.0

    def start_file(self, at: Any) -> None:
        self._at = at

    def end_file(self, size: int) -> None:
        self._at = lambda: 0
        self._done += size

    def fraction(self) -> float | None:
        """The share of the bytes read, or None when there are none to read (the demo). (Asked from another thread
        than the reader's: a file closed meanwhile leaves the last answer.)"""
        if not self.total:
            return None
        with contextlib.suppress(ValueError, OSError):
            self._last = min(1.0, (self._done + self._at()) / self.total)
        return self._last


def input_bytes(sources: list[Source]) -> int:
    """The size of the files the sources read (compressed files as stored)."""
    return sum(_size(f) for s in sources if s.path is not None for f in source_files(s.key, s.path))


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def iter_records(source: Source, progress: ReadProgress | None = None) -> Iterator[tuple[str, Any]]:
    """(where, raw record or Rejected) in file order (shard by shard), one at a time: a file of any size is read in
    bounded memory."""
    progress = progress or ReadProgress([])
    if source.path is None:
        yield from ((f"{source.name} record {i}", r) for i, r in enumerate(source.records))
        return
    for path in source_files(source.key, source.path):
        kind = None if path.is_dir() else _data_kind(path)
        size = _size(path)
        if path.is_dir():
            records = _iter_dataset_dir(path, source.split, source.key, progress, size)
        elif kind == ".jsonl":
            records = _iter_jsonl(path, progress)
        elif kind == ".json":
            records = _iter_json(path, progress)
        else:
            records = _iter_parquet(path, progress, size)
        empty = True
        for item in records:
            empty = False
            yield item
        progress.end_file(size)
        if empty:
            raise DataError(f"{source.key}: {path} is empty (no records)")


def _open(path: Path, progress: ReadProgress) -> io.BufferedIOBase:
    """``path`` for reading bytes, decompressed (.gz, .zst); ``progress`` follows the bytes read from the file."""
    raw = path.open("rb")
    progress.start_file(raw.tell)
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError as err:
            raw.close()
            raise DataError(f"{path}: reading .zst files needs zstandard (pip install zstandard)") from err
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return raw


def _iter_jsonl(path: Path, progress: ReadProgress) -> Iterator[tuple[str, Any]]:
    with _open(path, progress) as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, Rejected("not_utf8", f"not UTF-8 ({err.reason} at byte {err.start})")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                record = Rejected("invalid_json", f"invalid JSON ({err.msg} at column {err.colno})")
            except RecursionError:
                record = Rejected("invalid_json", "JSON nested too deeply to read")
            yield where, record


def _iter_json(path: Path, progress: ReadProgress) -> Iterator[tuple[str, Any]]:
    with _open(path, progress) as f:
        yield from iter_json_list(path, f)


def _without_nulls(value: Any) -> Any:
    """Arrow gives every struct the union of all records' keys, filling the missing ones with null: drop them."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _iter_parquet(path: Path, progress: ReadProgress, size: int) -> Iterator[tuple[str, Any]]:
    """The rows of a parquet file, a batch of rows in memory at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    i = 0
    try:
        parquet = pq.ParquetFile(path)
        total = max(1, parquet.metadata.num_rows)
        progress.start_file(lambda: size * i // total)
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"{path} row {i}", _without_nulls(row)
                i += 1
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file ({err})") from err


def _iter_dataset_dir(path: Path, split: str, key: str, progress: ReadProgress, size: int) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"{key}={str(path)!r}: not a saved Hugging Face dataset directory ({err})") from err
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"{key}={str(path)!r}: a DatasetDict without the split {split!r} (it has {', '.join(ds)}); "
                f"set {key.removesuffix('.path')}.split"
            )
        ds = ds[split]
    i = 0
    progress.start_file(lambda: size * i // max(1, len(ds)))
    for row in ds:
        yield f"{path} row {i}", _without_nulls(row)
        i += 1


def with_format(source: Source, progress: ReadProgress | None = None) -> Iterator[tuple[str, Any, str | None]]:
    """(where, raw record or Rejected, format) of every record. With ``auto`` the format is the one of the
    first record whose shape says it; the records before it are held back until then (None: no record says)."""
    if source.format != "auto":
        yield from ((where, raw, source.format) for where, raw in iter_records(source, progress))
        return
    held: list[tuple[str, Any]] = []
    fmt = None
    for where, raw in iter_records(source, progress):
        if fmt is None and not isinstance(raw, Rejected):
            fmt = detect_format(raw)
        if fmt is None:
            held.append((where, raw))
            continue
        yield from ((w, r, fmt) for w, r in held)
        held = []
        yield where, raw, fmt
    yield from ((w, r, None) for w, r in held)
