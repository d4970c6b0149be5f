"""Token ids and labels of rendered conversations (``samples.render_many``), each sample checked serving-exact.

``texts_to_tokenize`` says what to tokenize, in one batch, each text alone; ``label_many`` builds the samples from
those encodings: a conversation is one sample where its single render holds every turn as a server sees it, else
the fewest samples that each are (see ``sftdist.data.samples`` for the rule).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from sftdist.data.template import IGNORE_INDEX
from sftdist.errors import TemplateSplitError


@dataclass(frozen=True)
class Turn:
    """One supervised assistant turn as a server meets it."""

    prompt: str  # what a server renders before the turn: the turns before it, generation prompt on
    target: str  # what the model writes after it: the turn through its stop (the end-of-turn marker)
    skip: int = 0  # characters at the start of ``target`` kept as context, not trained (data.empty_think=mask)


@dataclass
class Rendered:
    """A conversation rendered (``assistant_turns``) and adapted, or the reason it cannot be."""

    full: str = ""
    turns: list[Turn] = field(default_factory=list)
    single: bool = True
    notes: list[str] = field(default_factory=list)
    error: TemplateSplitError | None = None


_BACKENDS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def backend_tokenizer(tokenizer: Any) -> Any:
    """A copy of the fast tokenizer's Rust tokenizer for labelling: no truncation, no padding, and no
    post-processor. With ``add_special_tokens=False`` a post-processor changes no id, only offsets (ByteLevel's
    ``trim_offsets`` shortens them), and untrimmed offsets are what shows a token crossing a span boundary."""
    backend = _BACKENDS.get(tokenizer)
    if backend is None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.post_processor = None
        backend.no_truncation()
        backend.no_padding()
        _BACKENDS[tokenizer] = backend
    return backend


def texts_to_tokenize(rendered: list[Rendered]) -> list[str]:
    """What ``label_many`` needs tokenized, in one batch, each text alone: for a conversation whose single render may
    be one sample, the last turn's prompt and every turn's target (the render is those, then what follows the last
    target); for one that is not, every turn's target and prompt; for one with no turn to train, its render."""
    texts = []
    for r in rendered:
        if r.error is not None:
            continue
        if not r.turns:
            texts.append(r.full)
            continue
        texts.extend(t.target for t in r.turns)
        texts.extend([r.turns[-1].prompt] if r.single else [t.prompt for t in r.turns])
    return texts


def label_many(backend: Any, rendered: list[Rendered], encodings: list[Any]) -> list[dict]:
    """The samples of rendered conversations, from the encodings of ``texts_to_tokenize`` (``backend`` tokenizes
    what else a check needs). Each result holds ``samples`` (``input_ids``, ``labels``, ``span_ends`` each),
    ``adaptations`` and ``extra_context_tokens`` (the context the samples after the longest repeat), or ``error``
    and ``adaptations``.

    Serving-exact: every turn is trained in a sample that starts with its prompt tokenized alone and its target
    tokenized alone. A single render is one sample when the last turn's prompt (alone) holds every earlier turn so:
    the tokens of an earlier prompt alone are the last prompt's up to the earlier prompt's last special token, then
    those of its text after that token (a short tail, tokenized again and remembered), and the earlier target's
    tokens follow. Else the turns become the fewest samples that each start with every turn they train (at worst one
    per turn)."""
    staged: list = []
    pending = []  # conversations whose prompts must all be tokenized
    pos = 0
    added, tails = _added_ids(backend), _tails(backend)
    for r in rendered:
        if r.error is not None:
            staged.append({"error": r.error, "adaptations": r.notes})
            continue
        if not r.turns:  # (nothing to train: its render, which the length policy rejects)
            ids = encodings[pos].ids
            pos += 1
            sample = {"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids), "span_ends": []}
            staged.append({"samples": [sample], "adaptations": r.notes, "extra_context_tokens": 0})
            continue
        targets = encodings[pos : pos + len(r.turns)]
        pos += len(r.turns)
        if not r.single:
            prompts = [e.ids for e in encodings[pos : pos + len(r.turns)]]
            pos += len(r.turns)
            staged.append([r, targets, prompts])
            continue
        last = encodings[pos]
        pos += 1
        sample = _one_sample(last, r, targets, added, tails)
        if sample is not None:
            staged.append({"samples": [sample], "adaptations": r.notes, "extra_context_tokens": 0})
        else:
            pending.append(len(staged))
            staged.append([r, targets, [last.ids]])  # (the earlier prompts to come, alone)
    prompt_encs = iter(
        backend.encode_batch([t.prompt for k in pending for t in staged[k][0].turns[:-1]], add_special_tokens=False)
        if pending
        else []
    )
    for k in pending:
        staged[k][2] = [next(prompt_encs).ids for _ in staged[k][0].turns[:-1]] + staged[k][2]
    results = []
    for s in staged:
        if type(s) is list:
            r, targets, prompts = s
            samples = _fewest_samples(r.turns, prompts, targets)
            longest = max(range(len(samples)), key=lambda i: len(samples[i]["input_ids"]))
            extra = sum(
                len(x["input_ids"]) - sum(label != IGNORE_INDEX for label in x["labels"])
                for i, x in enumerate(samples)
                if i != longest
            )
            s = {"samples": samples, "adaptations": r.notes, "extra_context_tokens": extra}
        results.append(s)
    return results


class _Tails:
    """The tokens of prompt tails, each tokenized alone, remembered: most prompts of a data set end on the same few
    tails (``<|im_start|>assistant\n``). One at a time in the caller's thread: a batch would queue behind the batch
    the tokenizer thread runs (``encode.py``)."""

    def __init__(self, backend: Any):
        self.backend, self.memo = backend, {}

    def ids(self, text: str) -> list[int]:
        if not text:
            return []
        ids = self.memo.get(text)
        if ids is None:
            if len(self.memo) >= 4096:
                self.memo.clear()
            ids = self.memo[text] = self.backend.encode(text, add_special_tokens=False).ids
        return ids


def _tails(backend: Any) -> _Tails:
    tails = _TAILS.get(backend)
    if tails is None:
        tails = _TAILS[backend] = _Tails(backend)
    return tails


_TAILS: weakref.WeakKeyDictionary[Any, _Tails] = weakref.WeakKeyDictionary()


def _added_ids(backend: Any) -> frozenset[int]:
    ids = _ADDED.get(backend)
    if ids is None:
        ids = _ADDED[backend] = frozenset(backend.get_added_tokens_decoder())
    return ids


_ADDED: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


def _boundary(prompt: Any, ids: list[int], b: int, added: frozenset[int]) -> tuple[int, int, int] | None:
    """(m, n, c): the last prompt's tokens [0, n) are those of its first ``b`` characters, and [m, n) those of its
    characters [c, b): from their last special or added token on (from the start where there is none); None where a
    token crosses character ``b``."""
    if b == 0:
        return 0, 0, 0
    last = prompt.char_to_token(b - 1)
    if last is None or prompt.token_to_chars(last)[1] != b:
        return None
    m = last
    while m >= 0 and ids[m] not in added:
        m -= 1
    return (m, last + 1, prompt.token_to_chars(m)[0]) if m >= 0 else (0, last + 1, 0)


def _skip_tokens(target: Any, skip: int) -> int:
    """The tokens of a target (tokenized alone) that lie in its first ``skip`` characters (one that crosses the
    edge among them: only what is wholly the answer is trained)."""
    if not skip:
        return 0
    first = target.char_to_token(skip)
    if first is None:
        return len(target.ids)
    return first + (target.token_to_chars(first)[0] < skip)


def _one_sample(last: Any, r: Rendered, targets: list, added: frozenset[int], tails: _Tails) -> dict | None:
    """The single render as the sample of every turn: the last turn's prompt and target, each alone, then what
    follows (alone); None where an earlier turn's prompt or target, each alone, is not what the last prompt holds."""
    prompt_ids = last.ids
    labels = [IGNORE_INDEX] * len(prompt_ids)
    span_ends = []
    for turn, target in zip(r.turns[:-1], targets):
        b = len(turn.prompt)
        edge = _boundary(last, prompt_ids, b, added)
        if edge is None:
            return None
        m, n, c = edge
        t = target.ids
        if prompt_ids[m:n] != tails.ids(r.full[c:b]) or prompt_ids[n : n + len(t)] != t:
            return None
        first = n + _skip_tokens(target, turn.skip)
        labels[first : n + len(t)] = prompt_ids[first : n + len(t)]
        span_ends.append(n + len(t))
    turn, t = r.turns[-1], targets[-1].ids
    n = len(prompt_ids)
    after = r.full[len(turn.prompt) + len(turn.target) :]
    ids = prompt_ids + t + (tails.ids(after) if after else [])
    first = n + _skip_tokens(targets[-1], turn.skip)
    labels += [IGNORE_INDEX] * (first - n) + t[first - n :] + [IGNORE_INDEX] * (len(ids) - n - len(t))
    span_ends.append(n + len(t))
    return {"input_ids": ids, "labels": labels, "span_ends": span_ends}


def _fewest_samples(turns: list[Turn], prompts: list[list[int]], targets: list) -> list[dict]:
    """Turns tokenized alone as the fewest samples that each start with ``prompt + target`` of every turn they
    train: a turn whose tokens start a longer turn's sample is trained there, else it is a sample of its own. (Which
    sequences start which is a forest, so taking the longest first gives the fewest.)"""
    pieces = [(p, e.ids, _skip_tokens(e, t.skip)) for t, p, e in zip(turns, prompts, targets)]
    groups: list[tuple[list[int], list[int]]] = []  # (tokens, the turns it trains)
    for i in sorted(range(len(pieces)), key=lambda i: -(len(pieces[i][0]) + len(pieces[i][1]))):
        seq = pieces[i][0] + pieces[i][1]
        home = next((g for g in groups if g[0][: len(seq)] == seq), None)
        if home is None:
            groups.append((seq, [i]))
        else:
            home[1].append(i)
    samples = []
    for ids, members in sorted(groups, key=lambda g: min(g[1])):
        labels, span_ends = [IGNORE_INDEX] * len(ids), []
        for i in sorted(members):
            prompt, target, skip = pieces[i]
            a, b = len(prompt) + skip, len(prompt) + len(target)
            labels[a:b] = ids[a:b]
            span_ends.append(b)
        samples.append({"input_ids": ids, "labels": labels, "span_ends": span_ends})
    return samples
