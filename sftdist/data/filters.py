"""Quality filters over canonical conversations; each one is switched in ``data.filters`` and counted.

Applied in this order, a record counted under the first that removes it (1-3 compare records and run in
record order; 4-5 look at one record and run where it is encoded):

1. ``contaminated``: shares a word n-gram (13 by default, as in the GPT-3 paper) with the eval data of
   ``data.filters.decontaminate`` (all its message texts, lower-cased words). Eval items shorter than the n-gram
   cannot match and are counted in the report.
2. ``exact_duplicate``: the same conversation (and tool schemas) as an earlier record, after lower-casing and
   collapsing white space.
3. ``near_duplicate``: MinHash (128 permutations) over word 5-grams, LSH with 16 bands of 8 rows; a record whose
   estimated Jaccard similarity with an earlier kept record reaches ``near_dedup_threshold`` is removed.
4. ``repetitive_response``: a trained response of at least 10 word 3-grams of which more than
   ``repetition_max_fraction`` are repeats (a degenerate loop).
5. ``short_response``: a trained response with fewer than ``min_response_chars`` non-space characters.

The first occurrence is always the one kept, so results depend on record order only (sources in config order).
"""

from __future__ import annotations

import array
import json
import re
import zlib

import numpy as np

from sftdist.config import FiltersConfig

_WORD = re.compile(r"\w+")
_ASCII_WORDS = bytes(c if c < 128 and re.fullmatch(r"\w", chr(c)) else ord(" ") for c in range(256))  # (table)
_NUM_PERM, _BANDS = 128, 16
_PRIME = 4294967311  # > 2**32: (a * x + b) mod p over 32-bit shingle hashes, no uint64 overflow with a < 2**31


def _message_text(m: dict) -> str:
    calls = m.get("tool_calls")
    return m["content"] + ("\n" + json.dumps(calls, sort_keys=True, ensure_ascii=False) if calls else "")


def conversation_text(conv: dict) -> str:
    return "\n".join(f"{m['role']}: {_message_text(m)}" for m in conv["messages"])


def trained_responses(conv: dict) -> list[str]:
    return [_message_text(m) for m in conv["messages"] if m["role"] == "assistant" and m.get("weight", 1) == 1]


def words(text: str) -> list[str]:
    """The lower-cased words of ``text``: its runs of word characters (regex ``\\w+``). ASCII text, the usual
    case, is split without the regex, several times faster: every character that is not a word character made a
    space (a byte table), then split on spaces, which gives the same words (a test holds them equal)."""
    text = text.lower()
    if text.isascii():
        return text.encode().translate(_ASCII_WORDS).decode().split()
    return _WORD.findall(text)


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def repeated_ngram_fraction(text: str, n: int = 3) -> float | None:
    """Share of the word n-grams of ``text`` that repeat an earlier one; None when there are under 10."""
    tokens = words(text)
    count = len(tokens) - n + 1
    if count < 10:
        return None
    return 1.0 - len(set(zip(*(tokens[i:] for i in range(n))))) / count  # (the n-grams, without a list of them)


class Decontaminator:
    """Word n-grams of an eval set; a training text is contaminated when it shares one."""

    def __init__(self, eval_texts: list[str], n: int):
        self.n = n
        self.num_too_short = sum(len(words(t)) < n for t in eval_texts)
        self._grams = {hash(g) for t in eval_texts for g in _ngrams(words(t), n)}

    def __call__(self, text: str) -> bool:
        return any(hash(g) in self._grams for g in _ngrams(words(text), self.n))


def minhash(text: str, a: np.ndarray, b: np.ndarray, shingle: int = 5) -> np.ndarray:
    """The (num_perm,) MinHash signature of ``text``'s word ``shingle``-grams (all words if fewer)."""
    tokens = words(text) or [""]
    grams = _ngrams(tokens, shingle) or [tuple(tokens)]
    x = np.fromiter((zlib.crc32(" ".join(g).encode()) for g in set(grams)), dtype=np.uint64)
    return ((a[:, None] * x[None, :] + b[:, None]) % _PRIME).min(axis=1)


class NearDedup:
    """Streaming near-duplicate detection: ``is_duplicate(text)`` is True when an earlier kept text is
    at least ``threshold`` similar (estimated Jaccard); otherwise the text is kept and indexed."""

    def __init__(self, threshold: float, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**31, size=_NUM_PERM, dtype=np.uint64)
        self.b = rng.integers(0, 2**32, size=_NUM_PERM, dtype=np.uint64)
        self.threshold = threshold
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(_BANDS)]
        self._kept: list[np.ndarray] = []

    def is_duplicate(self, text: str) -> bool:
        sig = minhash(text, self.a, self.b)
        rows = _NUM_PERM // _BANDS
        keys = [sig[i * rows : (i + 1) * rows].tobytes() for i in range(_BANDS)]
        candidates = {j for band, key in enumerate(keys) for j in self._buckets[band].get(key, ())}
        if any(np.mean(self._kept[j] == sig) >= self.threshold for j in candidates):
            return True
        for band, key in enumerate(keys):
            self._buckets[band].setdefault(key, []).append(len(self._kept))
        self._kept.append(sig)
        return False


def response_reason(conv: dict, cfg: FiltersConfig) -> str | None:
    """The filters that look at one record alone (run where the record is encoded, in parallel)."""
    responses = trained_responses(conv)
    if cfg.repetition and any(
        (f := repeated_ngram_fraction(r)) is not None and f > cfg.repetition_max_fraction for r in responses
    ):
        return "repetitive_response"
    if cfg.short_response and min(len("".join(r.split())) for r in responses) < cfg.min_response_chars:
        return "short_response"
    return None


class HashSet:
    """A set of 64-bit hashes that keeps 8 bytes a hash (16 to 32 with the table's free slots) where a Python set of
    ints keeps about 80: an open-addressing table (linear probing, at most half full, doubled when it is)."""

    def __init__(self, capacity: int = 1 << 12):
        self._table = array.array("Q", bytes(8 * capacity))
        self._size = 0

    def add(self, key: int) -> bool:
        """Add ``key`` (an int, taken modulo 2**64); False when it was there already. (0 stands for an empty slot, so
        the hash 0 counts as 1: two keys in 2**64 more that match.)"""
        key = (key & 0xFFFF_FFFF_FFFF_FFFF) or 1
        table = self._table
        mask = len(table) - 1
        slot = key & mask
        while held := table[slot]:
            if held == key:
                return False
            slot = (slot + 1) & mask
        table[slot] = key
        self._size += 1
        if 2 * self._size > len(table):
            self._table, self._size = array.array("Q", bytes(16 * len(table))), 0
            for held in table:
                if held:
                    self.add(held)
        return True

    def __len__(self) -> int:
        return self._size


class RecordFilter:
    """The filters that compare records (decontamination, exact and near dedup), in record order:
    ``reason(conv)`` is None to keep, else the counted reason. ``response_reason`` covers the rest."""

    def __init__(self, cfg: FiltersConfig, eval_texts: list[str] | None = None):
        self.cfg = cfg
        self.decontaminator = Decontaminator(eval_texts, cfg.decontaminate_ngram) if eval_texts is not None else None
        self._seen = HashSet()
        self._near = NearDedup(cfg.near_dedup_threshold) if cfg.near_dedup else None

    def reason(self, conv: dict) -> str | None:
        if self.decontaminator is None and not self.cfg.exact_dedup and self._near is None:
            return None
        text = conversation_text(conv)
        if self.decontaminator is not None and self.decontaminator(text):
            return "contaminated"
        if self.cfg.exact_dedup:
            tools = json.dumps(conv["tools"], sort_keys=True) if conv.get("tools") else ""
            key = hash(" ".join(text.lower().split()) + tools)  # 64-bit: a false match is ~n**2 / 2**64 unlikely
            if not self._seen.add(key):
                return "exact_duplicate"
        if self._near is not None and self._near.is_duplicate(text):
            return "near_duplicate"
        return None
