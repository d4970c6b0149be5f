"""Where records come from: files (jsonl, json, parquet), saved Hugging Face dataset directories, or the
generated demo; each record with a ``where`` that names it (``FILE line N``, ``FILE record N``, ``DIR row N``).

A record that cannot even be parsed (invalid JSON, not UTF-8) is yielded as a counted rejection, not an
exception: one bad line never stops the others from being read. A file that cannot be read at all
(missing, unsupported, a .json that is not a list) is a DataError naming it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        must_exist("data.path", cfg.path)
        return [Source(source_name(cfg.path), cfg.format, 1.0, cfg.path)]
    if cfg.sources:
        for i, s in enumerate(cfg.sources):
            must_exist(f"data.sources[{i}].path", s.path)
        sources = [Source(s.name or source_name(s.path), s.format, s.weight, s.path) for s in cfg.sources]
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
    """A source's default name: its file name without suffixes (a directory's whole name)."""
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
    elif path.suffix.lower() == ".jsonl":
        yield from _iter_jsonl(path)
    elif path.suffix.lower() == ".json":
        yield from _iter_json(path)
    elif path.suffix.lower() == ".parquet":
        yield from _iter_parquet(path)
    else:
        raise DataError(
            f"data.path={source.path!r}: unsupported file type {path.suffix!r} "
            "(use .jsonl, .json, .parquet or a saved datasets directory)"
        )


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
                record = json.loads(line)
            except json.JSONDecodeError as err:
                record = Rejected("invalid_json", f"invalid JSON ({err.msg} at column {err.colno})")
            except RecursionError:
                record = Rejected("invalid_json", "JSON nested too deeply to read")
            yield where, record


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except RecursionError as err:
        raise DataError(f"{path}: JSON nested too deeply to read") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: invalid JSON at line {err.lineno} ({err.msg}); one record per line "
            "(.jsonl) lets the good records through"
        ) from err
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of records, not {type(data).__name__}")
    for i, record in enumerate(data):
        yield f"{path} record {i}", record


def _without_nulls(value: Any) -> Any:
    """Arrow gives every struct the union of all records' keys, filling the missing ones with null: drop them."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file ({err})") from err
    for i, row in enumerate(rows):
        yield f"{path} row {i}", _without_nulls(row)


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
        yield f"{path} row {i}", _without_nulls(row)


def with_format(source: Source) -> Iterator[tuple[str, Any, str | None]]:
    """(where, raw record or Rejected, format) of every record. With ``auto`` the format is the one of the
    first record whose shape says it; the records before it are held back until then (None: no record says)."""
    if source.format != "auto":
        yield from ((where, raw, source.format) for where, raw in iter_records(source))
        return
    held: list[tuple[str, Any]] = []
    fmt = None
    for where, raw in iter_records(source):
        if fmt is None and not isinstance(raw, Rejected):
            fmt = detect_format(raw)
        if fmt is None:
            held.append((where, raw))
            continue
        yield from ((w, r, fmt) for w, r in held)
        held = []
        yield where, raw, fmt
    yield from ((w, r, None) for w, r in held)
