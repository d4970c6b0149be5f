"""Serving-exact samples: the rendered turns of a conversation (sftdist.data.template) -> token ids and labels.

Training tokens are serving tokens: a server tokenizes ``before`` alone and the model writes the turn's tokens
after it, so each turn is trained in a sample that starts with ``before`` tokenized alone, then the turn tokenized
alone. The conversation is rendered once more in full: where that render is, at every turn, the turn's prompt and
target, and the last turn's prompt (tokenized alone) holds every earlier turn's prompt and target tokens (checked
cheaply: the tokens of a text alone are those of a longer text up to the shorter one's last special token, then
those of the rest), the conversation is one sample. Where it is not (a template that rewrites earlier turns when a
later one comes, as Qwen3 drops their reasoning; a tokenizer that merges characters across a prompt's end), the
turns become the fewest samples that are each exact (``labels.label_many``).
"""

from __future__ import annotations

import os
from typing import Any

from sftdist.data.labels import Rendered, Turn, backend_tokenizer, label_many, texts_to_tokenize
from sftdist.data.template import (
    REASONING_FIELDS,
    ChatTemplate,
    bind_template,
    resolve_chat_template,
)
from sftdist.errors import TemplateSplitError


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
