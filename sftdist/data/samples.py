"""Serving-exact samples: the rendered turns of a conversation (sftdist.data.template) -> token ids and labels.

Training tokens are serving tokens: a server tokenizes ``before`` alone and the model writes the turn's tokens
after it, so each turn is trained in a sample that starts with ``before`` tokenized alone, then the turn tokenized
alone. The conversation is rendered once more in full: where that render is, at every turn, the turn's prompt and
target, and the last turn's prompt (tokenized alone) holds every earlier turn's prompt and target tokens (checked
cheaply: the tokens of a text alone are those of a longer text up to the shorter one's last special token, then
those of the rest), the conversation is one sample. Where it is not (a template that rewrites earlier turns when a
later one comes, as Qwen3 drops their reasoning; a tokenizer that merges characters across a prompt's end), the
turns become the fewest samples that are each exact (``label_many``).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import Any

from sftdist.data.template import (
    IGNORE_INDEX,
    REASONING_FIELDS,
    ChatTemplate,
    bind_template,
    resolve_chat_template,
)
from sftdist.errors import TemplateSplitError


@dataclass(frozen=True)
class Turn:
    """One supervised assistant turn as a server meets it."""

    prompt: str  # what a server renders before the turn: the turns before it, generation prompt on
    target: str  # what the model writes after it: the turn through its stop (the end-of-turn marker)
    skip: int = 0  # characters at the start of ``target`` kept as context, not trained (data.empty_think=mask)


def assistant_turns(
    ct: ChatTemplate, messages: list[dict], tools: list[dict] | None = None, empty_think: str = "mask"
) -> tuple[str, list[Turn], bool]:
    """(the single render of the conversation, its supervised turns, whether that render holds every turn as a
    server renders it). The render is one sample when it starts, for every turn, with ``prompt + target`` (at the
    text level: the tokens are checked after tokenization); else the turns are samples of their own."""
    with ct.one_conversation():
        clean = ct.clean(messages)
        full = ct.render_clean(clean, False, tools)
        turns = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or message.get("weight", 1) == 0:
                continue
            before = ct.render_clean(clean[:i], True, tools)
            through = full if i + 1 == len(messages) else ct.render_clean(clean[: i + 1], False, tools)
            if not through.startswith(before):
                common = len(os.path.commonprefix([before, through]))
                raise TemplateSplitError(
                    f"assistant turn {i}: the generation prompt ends {before[common:][:40]!r} where the turn "
                    f"renders {through[common:][:40]!r}: a server would prompt the model with text this turn does "
                    "not continue (a template argument such as enable_thinking decides it, or the turn's reasoning)",
                    reason="not_servable",
                )
            target = through[len(before) :].rstrip()  # (white space after the end-of-turn marker: never written)
            if target and ct.caps.answer_stop:
                # (a template without an end-of-turn token: the header that follows an answer is its stop, GLM-4.5's
                # way: the result's after a tool call, which ends on its own tag, else the user's)
                after = messages[i + 1]["role"] if i + 1 < len(messages) else None
                call = after == "tool" or (after is None and message.get("tool_calls"))
                target += (ct.caps.call_stop if call else "") or ct.caps.answer_stop
            if not target:
                continue
            if not target.endswith(ct.tokens):
                raise TemplateSplitError(
                    f"assistant turn {i} ends on {target[-30:]!r}: the chat template (sha256:{ct.hash}) writes no "
                    "special token after an answer, nor a header after it that a server stops on, so a model trained "
                    "on it would never stop: give data.chat_template=FILE with an end-of-turn token",
                    reason="no_stop",
                )
            skip = 0
            if (
                empty_think == "mask"
                and ct.caps.empty_think
                and target.startswith(ct.caps.empty_think)
                and not any(message.get(k) for k in REASONING_FIELDS)
            ):
                skip = len(ct.caps.empty_think)
            turns.append(Turn(before, target, skip))
            if ct.caps.answer_stop and i + 1 == len(messages):
                full = before + target  # (the last answer, with the stop a server would see the model write)
    single = all(full.startswith(t.prompt) and full.startswith(t.target, len(t.prompt)) for t in turns)
    return full, turns, single


def assistant_char_spans(
    ct: ChatTemplate, messages: list[dict], tools: list[dict] | None = None, empty_think: str = "mask"
) -> tuple[str, list[tuple[int, int]]]:
    """The single render of the conversation and the [start, end) character spans of its supervised output (where
    that render holds every turn; refused as ``template_split`` where it does not: see ``encode_samples``)."""
    full, turns, single = assistant_turns(ct, messages, tools, empty_think)
    if not single:
        raise TemplateSplitError(
            "the template renders this conversation differently from what a server renders at an earlier turn "
            "(history rewritten): it is several samples (encode_samples)"
        )
    return full, [(len(t.prompt) + t.skip, len(t.prompt) + len(t.target)) for t in turns]


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


_BACKENDS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


@dataclass
class Rendered:
    """A conversation rendered (``assistant_turns``) and adapted, or the reason it cannot be."""

    full: str = ""
    turns: list[Turn] = field(default_factory=list)
    single: bool = True
    notes: list[str] = field(default_factory=list)
    error: TemplateSplitError | None = None


def render_many(
    ct: ChatTemplate, convs: list[tuple[list[dict], list[dict] | None]], empty_think: str = "mask"
) -> list[Rendered]:
    """Each conversation adapted and rendered: everything before tokenization."""
    rendered = []
    for messages, tools in convs:
        notes: list[str] = []
        try:
            adapted, tools, notes = ct.adapt(messages, tools)
            rendered.append(Rendered(*assistant_turns(ct, adapted, tools, empty_think), notes))
        except TemplateSplitError as err:
            rendered.append(Rendered(notes=notes, error=err))
    return rendered


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


def encode_many(
    tokenizer: Any, ct: ChatTemplate, convs: list[tuple[list[dict], list[dict] | None]], empty_think: str = "mask"
) -> list[dict]:
    """Render, tokenize (one batch) and label conversations (see ``label_many`` for the results)."""
    rendered = render_many(ct, convs, empty_think)
    backend = backend_tokenizer(tokenizer)
    return label_many(backend, rendered, backend.encode_batch(texts_to_tokenize(rendered), add_special_tokens=False))


def truncate_at_turns(
    input_ids: list[int], labels: list[int], span_ends: list[int], max_length: int
) -> tuple[list[int], list[int], int]:
    """Cut to ``max_length`` tokens: after the last assistant turn that fits whole (its end-of-turn marker
    included), else at ``max_length``. Returns (input_ids, labels, tokens removed)."""
    if len(input_ids) <= max_length:
        return input_ids, labels, 0
    whole = [end for end in span_ends if end <= max_length]
    cut = whole[-1] if whole else max_length
    return input_ids[:cut], labels[:cut], len(input_ids) - cut


def encode_samples(
    tokenizer: Any,
    messages: list[dict],
    chat_template: str | None = None,
    max_length: int | None = None,
    tools: list[dict] | None = None,
    chat_template_kwargs: dict | None = None,
    empty_think: str = "mask",
) -> list[dict[str, Any]]:
    """The serving-exact samples of a conversation (one, or several where the template rewrites history), each as
    ``encode_conversation`` returns it. Every supervised assistant turn is trained in exactly one sample, which
    starts with the turn's prompt (the turns before it as a server renders them, generation prompt on) tokenized
    alone, then the turn's target (its text through the template's end of turn) tokenized alone."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("encoding needs a fast (tokenizers-backed) tokenizer for its offsets")
    ct = bind_template(tokenizer, resolve_chat_template(tokenizer, chat_template), chat_template_kwargs)
    (result,) = encode_many(tokenizer, ct, [(messages, tools)], empty_think)
    if "error" in result:
        raise result["error"]
    out = []
    for sample in result["samples"]:
        input_ids, labels, num_truncated = sample["input_ids"], sample["labels"], 0
        if max_length is not None:
            input_ids, labels, num_truncated = truncate_at_turns(input_ids, labels, sample["span_ends"], max_length)
        out.append(
            {
                "input_ids": input_ids,
                "labels": labels,
                "num_truncated_tokens": num_truncated,
                "adaptations": result["adaptations"],
            }
        )
    return out


def encode_conversation(
    tokenizer: Any,
    messages: list[dict],
    chat_template: str | None = None,
    max_length: int | None = None,
    tools: list[dict] | None = None,
    chat_template_kwargs: dict | None = None,
    empty_think: str = "mask",
) -> dict[str, Any]:
    """Tokenize ``messages`` with the chat template and label assistant output only.

    Returns ``{"input_ids", "labels", "num_truncated_tokens", "adaptations"}``: ``labels[i] == input_ids[i]``
    where token ``i`` is assistant output (content and end-of-turn marker), ``-100`` elsewhere. ``input_ids`` are
    the tokens a server meets: at each assistant turn, the prompt it renders tokenized alone, then the answer
    tokenized alone (for most conversations exactly the tokens of the template's rendering of the whole
    conversation, as adapted to what the template can render, see the module docstring). With ``max_length`` the
    conversation is cut after the last assistant turn that fits whole (else at ``max_length``) and the removed
    tokens are counted. ``tools`` (tool schemas) and ``chat_template_kwargs`` (the template's own arguments, such as
    ``enable_thinking``) are passed to the template; ``empty_think`` (``mask`` or ``train``) says whether the empty
    think block a template writes on an answer without reasoning is trained. A conversation that is several samples
    (its template rewrites history) raises TemplateSplitError: ``encode_samples`` returns them.
    """
    samples = encode_samples(tokenizer, messages, chat_template, max_length, tools, chat_template_kwargs, empty_think)
    if len(samples) > 1:
        raise TemplateSplitError(
            f"the template renders this conversation as {len(samples)} serving-exact samples (it renders earlier "
            "turns differently when a later one is added): encode_samples returns them"
        )
    return samples[0]
