"""Encoding canonical conversations, batched and in ``num_proc`` worker processes, chunk by chunk.

Each worker renders, tokenizes (one Rust batch per chunk) and labels a chunk of conversations and sends
back flat int32 arrays, which the parent writes out as they come (``prepared.ShardWriter``), without a per-row
step; the parent hands out chunks as it reads them, a bounded number ahead. In one process, the tokenization of
a chunk (Rust, all cores, no GIL) overlaps the rendering of the next.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from sftdist.config import FiltersConfig
from sftdist.data.filters import response_reason
from sftdist.data.template import (
    IGNORE_INDEX,
    backend_tokenizer,
    bind_template,
    label_many,
    render_many,
    truncate_at_turns,
)

_WORKER: dict[str, Any] = {}  # tokenizer, bound template and settings of this process (inherited by forked workers)


def _init(
    tokenizer: Any, template: str, template_kwargs: dict, max_length: int, truncation: str, filters: FiltersConfig
) -> None:
    _WORKER.update(
        tokenizer=tokenizer,
        template=bind_template(tokenizer, template, template_kwargs),
        max_length=max_length,
        truncation=truncation,
        filters=filters,
    )


def _num_targets(labels: list[int]) -> int:
    """Trained next-token targets: labelled tokens but the first (it is never predicted)."""
    return len(labels) - labels.count(IGNORE_INDEX) - (bool(labels) and labels[0] != IGNORE_INDEX)


def _encode_one(r: dict, max_length: int, truncation: str) -> tuple[list[int], list[int], int, str, str]:
    """(input_ids, labels, tokens cut, status, detail) of one encode_many result under the length policy."""
    if "error" in r:
        return [], [], 0, r["error"].reason, str(r["error"])
    ids, labels, cut = r["input_ids"], r["labels"], 0
    if len(ids) > max_length:
        if truncation == "drop":
            return [], [], 0, "too_long", f"{len(ids)} tokens > data.max_length={max_length}"
        ids, labels, cut = truncate_at_turns(ids, labels, r["span_ends"], max_length)
    if not _num_targets(labels):
        if cut:
            return [], [], cut, "truncated_to_nothing", f"no trained token in the first {max_length} tokens"
        return [], [], 0, "no_supervised_tokens", "the template renders no assistant output"
    return ids, labels, cut, "", ""


def _render_chunk(convs: list[dict]) -> tuple[list[str], list[tuple]]:
    """Phase 1 of a chunk (Python): the per-record filters, then rendering and spans."""
    filtered = [response_reason(c, _WORKER["filters"]) or "" for c in convs]
    kept = [(c["messages"], c["tools"]) for c, f in zip(convs, filtered) if not f]
    return filtered, render_many(_WORKER["template"], kept)


def _tokenize(rendered: list[tuple]) -> list[Any]:
    """Phase 2 (Rust, without the GIL): one batch."""
    return backend_tokenizer(_WORKER["tokenizer"]).encode_batch([r[0] for r in rendered], add_special_tokens=False)


def _finish_chunk(filtered: list[str], rendered: list[tuple], encodings: list[Any]) -> dict[str, Any]:
    """Phase 3 (Python): labels and the length policy; flat arrays plus per-record fields. ``filtered`` and
    ``status`` hold the reason a record is not used."""
    max_length, truncation = _WORKER["max_length"], _WORKER["truncation"]
    encoded = iter(label_many(rendered, encodings))
    out: dict[str, list] = {
        k: [] for k in ("length", "num_supervised", "status", "detail", "num_truncated", "adaptations", "turn_ends")
    }
    out["filtered"] = filtered
    ids_flat: list[int] = []
    labels_flat: list[int] = []
    for f in filtered:
        r = {"adaptations": []} if f else next(encoded)
        ids, labels, cut, status, detail = ([], [], 0, "", "") if f else _encode_one(r, max_length, truncation)
        ids_flat.extend(ids)
        labels_flat.extend(labels)
        ends = [labels[e - 1] for e in r.get("span_ends", ()) if 0 < e <= len(labels) and labels[e - 1] != IGNORE_INDEX]
        for key, value in (
            ("length", len(ids)),
            ("num_supervised", _num_targets(labels)),
            ("status", status),
            ("detail", detail),
            ("num_truncated", cut),
            ("adaptations", r["adaptations"]),
            ("turn_ends", ends),
        ):
            out[key].append(value)
    out["ids"] = np.array(ids_flat, dtype=np.int32)
    out["labels"] = np.array(labels_flat, dtype=np.int32)
    return out


def encode_chunk(convs: list[dict]) -> dict[str, Any]:
    """Filter and encode a chunk with this process's settings (the three phases in a row)."""
    filtered, rendered = _render_chunk(convs)
    return _finish_chunk(filtered, rendered, _tokenize(rendered))


def _encode_overlapped(chunks: Iterable[tuple[Any, list[dict]]]) -> Iterator[tuple[Any, dict[str, Any]]]:
    """One process: tokenize chunk k in a thread (Rust releases the GIL and uses every core) while Python
    renders chunk k + 1 and labels chunk k - 1."""
    pending = None
    with ThreadPoolExecutor(max_workers=1) as tokenizer_thread:
        for tag, chunk in chunks:
            filtered, rendered = _render_chunk(chunk)
            future = tokenizer_thread.submit(_tokenize, rendered)
            if pending is not None:
                yield pending[0], _finish_chunk(pending[1], pending[2], pending[3].result())
            pending = (tag, filtered, rendered, future)
        if pending is not None:
            yield pending[0], _finish_chunk(pending[1], pending[2], pending[3].result())


def _init_worker(*args: Any) -> None:
    """A pool worker: Ctrl-C is the parent's to handle (it stops the pool), then this process's settings."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init(*args)


@contextlib.contextmanager
def _single_threaded_tokenizers():
    """Forked workers must not inherit a Rust thread pool: tell tokenizers so (and silence its warning)."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def encode_chunks(
    chunks: Iterable[tuple[Any, list[dict]]],
    tokenizer: Any,
    template: str,
    template_kwargs: dict,
    max_length: int,
    truncation: str,
    filters: FiltersConfig,
    num_proc: int,
) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(tag, encoded chunk) for each (tag, chunk of conversations), in order, encoded in ``num_proc`` processes (1:
    in this one). The chunks are taken from ``chunks`` in the caller's thread, never more than ``2 * num_proc + 1``
    ahead of the result handed out: reading does not run away from encoding (memory stays bounded), and an error
    on either side (or Ctrl-C) stops the pool at once."""
    args = (tokenizer, template, template_kwargs, max_length, truncation, filters)
    if num_proc <= 1:
        _init(*args)
        yield from _encode_overlapped(chunks)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with _single_threaded_tokenizers(), mp.get_context(method).Pool(num_proc, _init_worker, args) as pool:
        pending: deque = deque()
        for tag, chunk in chunks:
            pending.append((tag, pool.apply_async(encode_chunk, (chunk,))))
            if len(pending) > 2 * num_proc:
                tag, result = pending.popleft()
                yield tag, result.get()
        while pending:
            tag, result = pending.popleft()
            yield tag, result.get()
