"""Filters: each removes what it says and keeps the first occurrence."""

from __future__ import annotations

import random

from sftdist.config import FiltersConfig
from sftdist.data.filters import Decontaminator, NearDedup, RecordFilter, repeated_ngram_fraction, response_reason


def _conv(user: str, answer: str) -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
        "tools": None,
        "meta": {},
    }


def _text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(
        rng.choice(
            [
                "alpha",
                "beta",
                "gamma",
                "delta",
                "omega",
                "sigma",
                "kappa",
                "theta",
                "zeta",
                "rho",
                "iota",
                "lambda",
                "mu",
                "nu",
                "xi",
                "pi",
                "tau",
                "phi",
                "chi",
                "psi",
            ]
        )
        for _ in range(n)
    )


def test_exact_dedup_ignores_case_and_white_space_and_keeps_the_first():
    f = RecordFilter(FiltersConfig(repetition=False))
    assert f.reason(_conv("What is 2+2?", "4")) is None
    assert f.reason(_conv("what   is 2+2?", "4")) == "exact_duplicate"
    assert f.reason(_conv("What is 2+3?", "5")) is None
    assert RecordFilter(FiltersConfig(exact_dedup=False, repetition=False)).reason(_conv("a", "b")) is None


def test_near_dedup_finds_a_one_word_edit_but_not_a_different_text():
    base = _text(200, 1)
    edited = base.replace("alpha", "ALPHA", 1)[:-3] + "xyz"
    near = NearDedup(threshold=0.85)
    assert not near.is_duplicate(base)
    assert near.is_duplicate(edited)
    assert not near.is_duplicate(_text(200, 2))
    f = RecordFilter(FiltersConfig(exact_dedup=False, near_dedup=True, repetition=False))
    assert f.reason(_conv(base, "x")) is None and f.reason(_conv(edited, "x")) == "near_duplicate"


def test_repetitive_responses_are_dropped_and_normal_ones_kept():
    loop = "I think that " * 30
    assert repeated_ngram_fraction(loop) > 0.9
    assert repeated_ngram_fraction(_text(60, 3)) < 0.2
    assert repeated_ngram_fraction("too short to judge") is None
    assert response_reason(_conv("q1", loop), FiltersConfig()) == "repetitive_response"
    assert response_reason(_conv("q2", _text(60, 3)), FiltersConfig()) is None
    assert response_reason(_conv("q1", loop), FiltersConfig(repetition=False)) is None


def test_short_responses_only_when_switched_on():
    assert response_reason(_conv("q", "k"), FiltersConfig()) is None
    on = FiltersConfig(short_response=True, min_response_chars=3)
    assert (
        response_reason(_conv("q", "o k"), on) == "short_response" and response_reason(_conv("q", "okay"), on) is None
    )


def test_decontamination_needs_a_whole_shared_n_gram():
    eval_text = "Natalia sold clips to 48 of her friends in April and then she sold half as many clips in May"
    d = Decontaminator([eval_text, "too short"], n=13)
    assert d.num_too_short == 1
    words = eval_text.split()
    assert d("Question: " + " ".join(words[2:15]) + " ...")  # 13 consecutive words of it
    assert not d("Question: " + " ".join(words[2:14]))  # 12 are not enough
    f = RecordFilter(FiltersConfig(), eval_texts=[eval_text])
    assert f.reason(_conv(eval_text.upper(), "72")) == "contaminated"


def test_words_are_the_regex_words_of_ascii_and_other_text():
    """``words`` splits ASCII text without the regex: the same words as ``\\w+`` on every ASCII character, and
    on text that is not ASCII (which takes the regex)."""
    import random
    import re

    from sftdist.data.filters import words

    rng = random.Random(0)
    ascii_chars = [chr(c) for c in range(128)]
    for _ in range(300):
        text = "".join(rng.choice(ascii_chars) for _ in range(rng.randint(0, 60)))
        assert words(text) == re.findall(r"\w+", text.lower()), repr(text)
    for text in ("Ünïcödé wörds—and_more 42²", "naïve café\u00a0x\u2028y", "İstanbul ß"):
        assert words(text) == re.findall(r"\w+", text.lower())
    code_points = [c for c in range(0x30000) if not 0xD800 <= c < 0xE000]
    for _ in range(300):
        text = "".join(
            chr(rng.choice(code_points)) if rng.random() < 0.5 else rng.choice(ascii_chars) for _ in range(40)
        )
        assert words(text) == re.findall(r"\w+", text.lower()), repr(text)


def test_the_hash_set_answers_as_a_python_set_in_a_fraction_of_its_memory():
    """Exact dedup's hashes: the same answers as a set (through growth, for 0, negatives and keys 2**64 apart, which
    are one 64-bit hash), at 8 to 16 bytes a hash held, not a Python int and a set slot each."""
    import random
    import tracemalloc

    from sftdist.config import FiltersConfig
    from sftdist.data.filters import HashSet, RecordFilter

    rng = random.Random(0)
    keys = [rng.getrandbits(64) - 2**63 for _ in range(20_000)]
    keys += rng.sample(keys, 5_000) + [0, 0, 1, -1, 2**64 - 1, 5, 5 + 2**64]
    hashes, seen = HashSet(capacity=4), set()
    for key in keys:
        new = (key % 2**64 or 1) not in seen
        seen.add(key % 2**64 or 1)
        assert hashes.add(key) is new
    assert len(hashes) == len(seen)

    convs = [
        {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer"}]}
        for i in range(50_000)
    ]
    record_filter = RecordFilter(FiltersConfig())
    tracemalloc.start()
    try:
        assert [record_filter.reason(c) for c in convs[:1000]] == [None] * 1000
        before = tracemalloc.get_traced_memory()[0]
        assert [record_filter.reason(c) for c in convs[1000:] + convs[:10]] == [None] * 49_000 + [
            "exact_duplicate"
        ] * 10
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held / 49_000 < 40, f"{held / 49_000:.0f} bytes a record"
