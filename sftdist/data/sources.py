"""Where records come from: files (jsonl, json, parquet), saved Hugging Face dataset directories, or the
generated demo; each record with a ``where`` that names it (``FILE line N``, ``FILE record N``, ``DIR row N``).

A record that cannot even be parsed (invalid JSON, not UTF-8) is yielded as a counted rejection, not an
exception: one bad line never stops the others from being read. A file that cannot be read at all
(missing, unsupported, a .json that is not a list) is a DataError naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from sftdist.config import DataConfig
from sftdist.data.demo import generate_demo_conversations
from sftdist.data.formats import Rejected, detect_format
from sftdist.errors import DataError


@dataclass
class Source:
    name: str
    format: str  # auto | messages | alpaca | sharegpt
    weight: float = 1.0
    path: str | None = None  # None: ``records`` holds them (the demo)
    records: list[dict] = field(default_factory=list)


def sources_from_config(cfg: DataConfig, seed: int) -> list[Source]:
    """data.path (one source), data.sources (several, weighted), or the generated demo."""
    if cfg.path is not None:
        _must_exist("data.path", cfg.path)
        return [Source(_name(cfg.path), cfg.format, 1.0, cfg.path)]
    if cfg.sources:
        for i, s in enumerate(cfg.sources):
            _must_exist(f"data.sources[{i}].path", s.path)
        sources = [Source(s.name or _name(s.path), s.format, s.weight, s.path) for s in cfg.sources]
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise DataError(f"data.sources have the same name twice ({names}); give each a distinct `name`")
        return sources
    return [Source("demo", "messages", 1.0, None, generate_demo_conversations(cfg.demo_size, seed=seed))]


def _must_exist(key: str, path: str) -> None:
    if not Path(path).exists():
        raise FileNotFoundError(f"{key}={path!r}: no such file or directory")


def _name(path: str) -> str:
    p = Path(path)
    return p.name if p.is_dir() else p.name.split(".")[0]


def iter_records(source: Source) -> Iterator[tuple[str, Any]]:
    """(where, raw record or Rejected) in file order."""
    if source.path is None:
        yield from ((f"{source.name} record {i}", r) for i, r in enumerate(source.records))
        return
    path = Path(source.path)
    if path.is_dir():
        yield from _iter_dataset_dir(path)
    elif not path.is_file():
        raise FileNotFoundError(f"data.path={source.path!r}: no such file or directory")
    elif path.suffix == ".jsonl":
        yield from _iter_jsonl(path)
    elif path.suffix == ".json":
        yield from _iter_json(path)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i}", row
    else:
        raise DataError(f"data.path={source.path!r}: unsupported file type {path.suffix!r} "
                        "(use .jsonl, .json, .parquet or a saved datasets directory)")


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, Rejected("not_utf8", f"not UTF-8 ({err.reason} at byte {err.start})")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                yield where, Rejected("invalid_json", f"invalid JSON ({err.msg} at column {err.colno})")


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno} ({err.msg}); one record per line "
                        "(.jsonl) lets the good records through") from err
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of records, not {type(data).__name__}")
    for i, record in enumerate(data):
        yield f"{path} record {i}", record


def _iter_dataset_dir(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"data.path={str(path)!r}: not a saved Hugging Face dataset directory ({err})") from err
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"data.path={str(path)!r}: a DatasetDict without a 'train' split ({list(ds)})")
        ds = ds["train"]
    for i, row in enumerate(ds):
        yield f"{path} row {i}", row


def resolve_format(source: Source, first: Any) -> str:
    """The source's format: as configured, or detected from its first parsable record."""
    if source.format != "auto":
        return source.format
    detected = detect_format(first)
    if detected is None:
        keys = sorted(first) if isinstance(first, dict) else type(first).__name__
        raise DataError(f"{source.path or source.name}: cannot tell the format from its first record (keys: {keys}); "
                        "set data.format (or the source's format) to messages, alpaca or sharegpt")
    return detected
