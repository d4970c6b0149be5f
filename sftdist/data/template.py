"""Chat template -> token ids and assistant-only labels, for any Jinja chat template.

The spans to supervise are derived from the template itself, never from per-template code. For each
assistant turn ``i`` we render the conversation twice with the template:

- ``before``: ``messages[:i]`` with the generation prompt, i.e. everything up to where the model starts
  writing turn ``i``;
- ``through``: ``messages[:i + 1]``, i.e. the same plus turn ``i`` as the template closes it.

The characters between the two are what the model must produce for that turn: its content and the
template's end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ...). White space the template
puts after the marker is not supervised: a served model stops at the marker and never writes it.

The whole conversation is rendered once more and tokenized once, so the training tokens are exactly
the tokens of the text a server renders; the character spans become token labels through the fast
tokenizer's offsets (each token owns the characters from the end of the previous token to its own end,
so tokenizers that trim white space from their offsets cannot hide a token that crosses a boundary).
A template whose renders are not prefixes of each other, or whose tokens straddle a span boundary,
cannot be split reliably and is refused with an error that says where.

Assistant messages with ``"weight": 0`` (OpenAI's fine-tuning format) stay in the context unsupervised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftdist.errors import ConfigError, TemplateSplitError

IGNORE_INDEX = -100


def load_chat_template(path: str | None) -> str | None:
    """Read a Jinja chat template file (``data.chat_template``); None passes through."""
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"data.chat_template={path!r}: no such file")
    text = file.read_text(encoding="utf-8")
    if not text.strip():
        raise ConfigError(f"data.chat_template={path!r}: the file is empty")
    return text


def resolve_chat_template(tokenizer: Any, chat_template: str | None = None) -> str:
    """The template to use: the one given, else the tokenizer's; a clear error when there is none."""
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if isinstance(template, dict):  # tokenizers may carry several named templates
        if "default" not in template:
            raise ConfigError(f"the tokenizer {name!r} has named chat templates {sorted(template)} but no "
                              "'default' one: pass data.chat_template=FILE (a Jinja file)")
        template = template["default"]
    if not template:
        raise ConfigError(f"the tokenizer {name!r} has no chat template: pass data.chat_template=FILE (a Jinja file)")
    return template


def _render(tokenizer: Any, template: str, messages: list[dict], add_generation_prompt: bool,
            tools: list[dict] | None) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # jinja's raise_exception(), undefined variables, ...
        raise TemplateSplitError(
            f"the chat template failed to render the first {len(messages)} message(s) "
            f"(add_generation_prompt={add_generation_prompt}): {err}"
        ) from err


def assistant_char_spans(tokenizer: Any, messages: list[dict], template: str,
                         tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of its supervised assistant output."""
    full = _render(tokenizer, template, messages, False, tools)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or message.get("weight", 1) == 0:
            continue
        before = _render(tokenizer, template, messages[:i], True, tools)
        through = _render(tokenizer, template, messages[: i + 1], False, tools)
        if not through.startswith(before) or not full.startswith(through):
            raise TemplateSplitError(
                f"assistant turn {i}: the template does not render conversations as prefixes of each "
                "other (the text up to the generation prompt is not kept when the turn is added, or a "
                "later turn rewrites an earlier one), so the assistant spans cannot be derived reliably"
            )
        start = len(before)
        end = start + len(through[start:].rstrip())
        if end > start:
            spans.append((start, end))
    return full, spans


def encode_conversation(
    tokenizer: Any,
    messages: list[dict],
    chat_template: str | None = None,
    max_length: int | None = None,
    tools: list[dict] | None = None,
) -> dict[str, Any]:
    """Tokenize ``messages`` with the chat template and label assistant output only.

    Returns ``{"input_ids", "labels", "num_truncated_tokens"}``: ``labels[i] == input_ids[i]`` where token
    ``i`` is assistant output (content and end-of-turn marker), ``-100`` elsewhere. ``input_ids`` is exactly
    the tokenization of the template's rendering. With ``max_length``, tokens past it are cut off and
    counted in ``num_truncated_tokens``. ``tools`` (tool schemas) are passed to the template.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("encode_conversation needs a fast (tokenizers-backed) tokenizer for its offsets")
    template = resolve_chat_template(tokenizer, chat_template)
    text, spans = assistant_char_spans(tokenizer, messages, template, tools)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    span_iter = iter(spans)
    span = next(span_iter, None)
    covered = 0  # each token owns the characters since the end of the previous one
    for idx, (_, end) in enumerate(enc["offset_mapping"]):
        s, e, covered = covered, max(end, covered), max(end, covered)
        while span is not None and s >= span[1]:
            span = next(span_iter, None)
        if span is None:
            break
        if s == e or e <= span[0]:
            continue
        if s < span[0] or e > span[1]:
            raise TemplateSplitError(
                f"token {idx} ({text[s:e]!r}) straddles the boundary of the assistant span "
                f"{text[span[0]:span[1]][:40]!r}...: the tokenizer merges prompt and answer characters, "
                "so this template cannot be split at token boundaries"
            )
        labels[idx] = input_ids[idx]
    num_truncated = 0
    if max_length is not None and len(input_ids) > max_length:
        num_truncated = len(input_ids) - max_length
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels, "num_truncated_tokens": num_truncated}
