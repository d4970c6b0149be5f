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

from sftdist.config import DataConfig
from sftdist.data.filters import response_reason
from sftdist.data.labels import Rendered, backend_tokenizer, label_many, texts_to_tokenize
from sftdist.data.samples import render_many, truncate_at_turns
from sftdist.data.template import IGNORE_INDEX, bind_template

_WORKER: dict[str, Any] = {}  # tokenizer, bound template and settings of this process (inherited by forked workers)


def _init(tokenizer: Any, template: str, cfg: DataConfig) -> None:
    _WORKER.update(
        tokenizer=tokenizer,
        template=bind_template(tokenizer, template, cfg.chat_template_kwargs),
        empty_think=cfg.empty_think,
        max_length=cfg.max_length,
        truncation=cfg.truncation,
        filters=cfg.filters,
    )


def _num_targets(labels: list[int]) -> int:
    """Trained next-token targets: labelled tokens but the first (it is never predicted)."""
    return len(labels) - labels.count(IGNORE_INDEX) - (bool(labels) and labels[0] != IGNORE_INDEX)


def _encode_one(r: dict, max_length: int, truncation: str) -> tuple[list[tuple], int, str, str]:
    """(samples as (input_ids, labels, the tokens that end its trained turns), tokens cut, status, detail) of one
    label_many result under the length policy. A sample cut to no trained token is left out (its tokens counted as
    cut); a record left with none is rejected, as one with an over-long sample under data.truncation=drop is."""
    if "error" in r:
        return [], 0, r["error"].reason, str(r["error"])
    samples, cut = [], 0
    for sample in r["samples"]:
        ids, labels, ends = sample["input_ids"], sample["labels"], sample["span_ends"]
        if len(ids) > max_length:
            if truncation == "drop":
                return [], 0, "too_long", f"{len(ids)} tokens > data.max_length={max_length}"
            ids, labels, n = truncate_at_turns(ids, labels, ends, max_length)
            cut += n
            if not _num_targets(labels):
                cut += len(ids)
                continue
        samples.append((ids, labels, [labels[e - 1] for e in ends if 0 < e <= len(labels) and labels[e - 1] >= 0]))
    if not any(_num_targets(labels) for _, labels, _ in samples):
        if cut:
            return [], cut, "truncated_to_nothing", f"no trained token in the first {max_length} tokens"
        return [], 0, "no_supervised_tokens", "the template renders no assistant output"
    return samples, cut, "", ""


def _render_chunk(convs: list[dict]) -> tuple[list[str], list[Rendered]]:
    """Phase 1 of a chunk (Python): the per-record filters, then rendering."""
    filtered = [response_reason(c, _WORKER["filters"]) or "" for c in convs]
    kept = [(c["messages"], c["tools"]) for c, f in zip(convs, filtered) if not f]
    return filtered, render_many(_WORKER["template"], kept, _WORKER["empty_think"])


def _tokenize(rendered: list[Rendered]) -> list[Any]:
    """Phase 2 (Rust, without the GIL): one batch."""
    return backend_tokenizer(_WORKER["tokenizer"]).encode_batch(texts_to_tokenize(rendered), add_special_tokens=False)


def _finish_chunk(filtered: list[str], rendered: list[Rendered], encodings: list[Any]) -> dict[str, Any]:
    """Phase 3 (Python): samples and the length policy; flat arrays plus per-record and per-sample fields.
    ``filtered`` and ``status`` hold the reason a record is not used; ``samples`` how many samples it became (its
    rows, in order, in the per-sample fields ``length``, ``num_supervised``, ``part``, ``turn_ends``)."""
    max_length, truncation = _WORKER["max_length"], _WORKER["truncation"]
    encoded = iter(label_many(backend_tokenizer(_WORKER["tokenizer"]), rendered, encodings))
    records = ("status", "detail", "num_truncated", "adaptations", "samples", "extra_context_tokens")
    out: dict[str, list] = {k: [] for k in (*records, "length", "num_supervised", "part", "turn_ends")}
    out["filtered"] = filtered
    ids_flat: list[int] = []
    labels_flat: list[int] = []
    for f in filtered:
        r = {"adaptations": [], "samples": []} if f else next(encoded)
        samples, cut, status, detail = ([], 0, "", "") if f else _encode_one(r, max_length, truncation)
        extra = r.get("extra_context_tokens", 0) if len(samples) > 1 else 0
        for key, value in zip(records, (status, detail, cut, r["adaptations"], len(samples), extra)):
            out[key].append(value)
        for part, (ids, labels, ends) in enumerate(samples):
            ids_flat.extend(ids)
            labels_flat.extend(labels)
            out["length"].append(len(ids))
            out["num_supervised"].append(_num_targets(labels))
            out["part"].append(part)
            out["turn_ends"].append(ends)
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
    chunks: Iterable[tuple[Any, list[dict]]], tokenizer: Any, template: str, cfg: DataConfig, num_proc: int
) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(tag, encoded chunk) for each (tag, chunk of conversations), in order, encoded in ``num_proc`` processes (1:
    in this one). The chunks are taken from ``chunks`` in the caller's thread, never more than ``2 * num_proc + 1``
    ahead of the result handed out: reading does not run away from encoding (memory stays bounded), and an error
    on either side (or Ctrl-C) stops the pool at once."""
    args = (tokenizer, template, cfg)
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
