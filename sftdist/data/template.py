"""Chat template -> token ids and assistant-only labels, for any Jinja chat template.

The spans to supervise are derived from the template itself, never from per-template code. For each
assistant turn ``i`` the conversation is rendered twice:

- ``before``: ``messages[:i]`` with the generation prompt: everything up to where the model starts writing;
- ``through``: ``messages[:i + 1]``: the same plus turn ``i`` as the template closes it.

The characters between the two are what the model must produce for that turn at serving time: its content
and the template's end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ...). White space after
the marker is not supervised: a served model stops at the marker. (A template that writes no generation
prompt makes the model write the assistant header itself, so that header is supervised too: it is what the
model must produce when served with that template.)

The conversation is rendered once more in full and tokenized once, so the training tokens are exactly the
tokens of the text a server renders. Character spans become token labels through the tokenizer's offsets;
each token owns the characters from the end of the previous token to its own end, so a tokenizer that trims
white space from its offsets cannot hide a token that crosses a boundary. A template whose renders are not
prefixes of each other, or whose tokens straddle a span boundary, cannot be split reliably: refused, saying where.

Templates differ in what they accept. Each template is probed once (can it render a system turn, a ``tool``
turn, ``tool_calls``, two user turns in a row?) and conversations are adapted to what it can render: a tool
result becomes a user turn, a tool call the JSON text of the call, a system prompt the head of the first user
turn, consecutive user turns one turn, and tool schemas a template does not render become a JSON list in the
system prompt. Adaptations are counted in the data report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sftdist.errors import ConfigError, TemplateSplitError

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


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
    _compile(text, f"data.chat_template={path!r}")
    return text


def _compile(template: str, where: str) -> Any:
    """The template compiled in apply_chat_template's Jinja environment; a syntax error names ``where``."""
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        return _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(f"{where}: the chat template does not parse: {err.message} (line {err.lineno})") from err


_DICT_ATTRIBUTES = frozenset(dir(dict))
_LOOP_COUNTERS = frozenset(("index", "index0", "revindex", "revindex0", "first", "last", "length", "depth", "depth0"))


class _JsonMemo:
    """The ``tojson`` filter, serialising each value once for all the renders of one conversation (inside
    ``scope()``, in this thread; elsewhere it just calls ``tojson``). Exact: a template cannot change a value (the
    sandbox is immutable), so the same object gives the same JSON; the memo holds every object it saw, so no id is
    reused by another object while it lives; and only calls whose options are plain constants (None, truths,
    numbers, strings, lists of strings) are remembered: a lazy option (a ``map`` generator) goes to ``tojson``."""

    def __init__(self, tojson: Any):
        self.tojson = tojson
        self._local = threading.local()

    def __call__(self, value: Any, *args: Any, **kwargs: Any) -> str:
        memo = getattr(self._local, "memo", None)
        options = (*args, *sorted(kwargs.items()))
        if memo is None or not all(_constant(o) for o in options):
            return self.tojson(value, *args, **kwargs)
        key = (id(value), repr(options))
        seen = memo.get(key)
        if seen is None:
            seen = memo[key] = (value, self.tojson(value, *args, **kwargs))
        return seen[1]

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        outer = getattr(self._local, "memo", None)
        self._local.memo = {} if outer is None else outer
        try:
            yield
        finally:
            self._local.memo = outer


def _constant(option: Any) -> bool:
    """A tojson option whose repr says all it is: None, a truth, a number, a string, a list or pair of these."""
    if type(option) in (list, tuple):
        return all(_constant(o) for o in option)
    return option is None or type(option) in (bool, int, float, str)


def _renderer(compiled: Any, template: str) -> tuple[Any, _JsonMemo]:
    """``template`` compiled again in an overlay of apply_chat_template's environment (same class, settings,
    filters, tests, globals and extensions), rendering the same text faster:

    - its ``getattr`` answers ``message.role`` on a plain dict from the dict at once. The sandbox would first try
      the dict's attributes and fail, then read the item; for a plain dict and a name that is not an attribute of
      dict that failure is certain, so the answer is the same (the item, or the same Undefined) without the
      exception. ``loop.last`` and the loop's other counters, which the sandbox checks and allows (numbers and
      truths of a LoopContext), are read at once too. Anything else goes to the sandbox's own ``getattr``;
    - its globals are a plain dict (a copy of the chain of template and environment globals, which are set once
      when the template is compiled), so each render's context is a dict copy, not a walk of the chain;
    - its ``tojson`` can serialise a value once for all the renders of a conversation (``_JsonMemo``)."""
    from jinja2.runtime import LoopContext

    env = compiled.environment.overlay()
    env.filters = dict(env.filters)  # (the overlay's own: the environment's stay as they are)
    memo = env.filters["tojson"] = _JsonMemo(env.filters["tojson"])
    sandbox_getattr, undefined = env.getattr, env.undefined

    def getattr_(obj: Any, attribute: Any) -> Any:
        if type(obj) is dict and type(attribute) is str and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except (TypeError, LookupError):
                return undefined(obj=obj, name=attribute)
        if type(obj) is LoopContext and attribute in _LOOP_COUNTERS:
            try:
                return getattr(obj, attribute)
            except AttributeError:  # (raised by the loop's items while reading ahead: the sandbox then tries
                return undefined(obj=obj, name=attribute)  # loop[attribute], which a LoopContext refuses)
        return sandbox_getattr(obj, attribute)

    env.getattr = getattr_
    renderer = env.from_string(template)
    renderer.globals = dict(renderer.globals)
    return renderer, memo


def resolve_chat_template(tokenizer: Any, chat_template: str | None = None) -> str:
    """The template to use: the one given, else the tokenizer's; a clear error when there is none."""
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if isinstance(template, dict):  # tokenizers may carry several named templates
        if "default" not in template:
            raise ConfigError(
                f"the tokenizer {name!r} has named chat templates {sorted(template)} but no "
                "'default' one: pass data.chat_template=FILE (a Jinja file)"
            )
        template = template["default"]
    if not template:
        raise ConfigError(f"the tokenizer {name!r} has no chat template: pass data.chat_template=FILE (a Jinja file)")
    return template


def template_hash(template: str) -> str:
    """A short, stable fingerprint of a chat template (recorded in prepared data and exports)."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Capabilities:
    system: bool
    tool_role: bool
    tool_calls: bool
    consecutive_user: bool
    tools: bool  # renders the tool schemas passed as ``tools``
    reasoning: bool  # renders the reasoning of the turn being answered
    # A template that ends an answer with no token of its own, where the next turn's header is one (GLM-4.5): what
    # follows an answer when the user speaks next, and a tool call when its result comes ("" for other templates)
    answer_stop: str = ""
    call_stop: str = ""


TOOLS_HEADER = "You can call these tools (JSON schemas):\n"


class ChatTemplate:
    """A chat template with the tokenizer's special tokens: renders as ``apply_chat_template`` does
    (empty prefixes included), knows what it can render, and adapts conversations to it."""

    def __init__(self, tokenizer: Any, template: str, kwargs: dict | None = None):
        self.template = template
        self.hash = template_hash(template)
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        self._compiled, self._json = _renderer(_compile(template, f"the chat template of {name!r}"), template)
        # as apply_chat_template: the special tokens, then the template's own arguments (data.chat_template_kwargs)
        self._kwargs = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        self._kwargs.update(kwargs or {})
        self.tokens = _token_strings(tokenizer)  # the tokenizer's special and added tokens, longest first
        self.caps = self._probe()

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
        """The text ``tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)`` renders (a test
        holds the two equal), for empty conversations too. Keys whose value is None are dropped, as it does."""
        return self.render_clean(self.clean(messages), add_generation_prompt, tools)

    @staticmethod
    def clean(messages: list[dict]) -> list[dict]:
        """The messages as the template sees them: keys whose value is None dropped (as apply_chat_template does),
        our ``weight`` dropped, reasoning under each name templates read. A prefix of a cleaned list is the cleaned
        prefix, so a conversation is cleaned once for all its renders."""
        messages = [{k: v for k, v in m.items() if v is not None and k != "weight"} for m in messages]
        if any(k in m for m in messages for k in _REASONING_FIELDS):
            messages = _alias_reasoning(messages)
        return messages

    def one_conversation(self) -> contextlib.AbstractContextManager:
        """Renders of one conversation inside: each value its template serialises to JSON is serialised once."""
        return self._json.scope()

    def render_clean(
        self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None
    ) -> str:
        """``render`` of messages already ``clean``."""
        try:
            return self._compiled.render(
                messages=messages,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._kwargs,
            )
        except Exception as err:  # jinja's raise_exception(), undefined variables, type errors ...
            raise TemplateSplitError(
                f"the chat template failed to render {len(messages)} message(s) "
                f"(add_generation_prompt={add_generation_prompt}): {err}",
                reason="template_error",
            ) from err

    def _renders(self, messages: list[dict], *probes: str, tools: list[dict] | None = None) -> bool:
        try:
            text = self.render(messages, tools=tools)
        except TemplateSplitError:
            return False
        return all(p in text for p in probes)

    def _probe(self) -> Capabilities:
        user, answer = {"role": "user", "content": "PROBE_U1"}, {"role": "assistant", "content": "PROBE_A1"}
        call = {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "PROBE_CALL", "arguments": {}}}],
        }
        return Capabilities(
            system=self._renders([{"role": "system", "content": "PROBE_SYS"}, user, answer], "PROBE_SYS"),
            tool_role=self._renders([user, call, {"role": "tool", "content": "PROBE_TOOL"}, answer], "PROBE_TOOL"),
            tool_calls=self._renders([user, call], "PROBE_CALL"),
            consecutive_user=self._renders(
                [user, {"role": "user", "content": "PROBE_U2"}, answer], "PROBE_U1", "PROBE_U2"
            ),
            reasoning=self._renders([user, {**answer, "reasoning_content": "PROBE_R"}], "PROBE_R"),
            **self._header_stops(user, answer, call),
            tools=self._renders(
                [user, answer],
                "PROBE_SCHEMA",
                tools=[
                    {  # OpenAI-shaped and flat at once
                        "type": "function",
                        "name": "PROBE_SCHEMA",
                        "description": "",
                        "parameters": {"type": "object"},
                        "function": {"name": "PROBE_SCHEMA", "description": "", "parameters": {"type": "object"}},
                    }
                ],
            ),
        )

    def _header_stops(self, user: dict, answer: dict, call: dict) -> dict[str, str]:
        """``answer_stop`` and ``call_stop`` (see Capabilities): the white space and token that follow an answer
        ending on no token of its own, before a user turn, and that follow a tool call, before its result."""
        stops = {}
        for name, turn, after in (
            ("answer_stop", answer, {"role": "user", "content": "PROBE_U2"}),
            ("call_stop", call, {"role": "tool", "content": "PROBE_TOOL"}),
        ):
            try:
                through = self.render([user, turn]).rstrip()
                text = self.render([user, turn, after])
            except TemplateSplitError:
                continue
            if name == "answer_stop" and through.endswith(self.tokens):
                return {}  # (an end-of-turn token of its own: what follows an answer is the next turn's)
            if text.startswith(through):
                stops[name] = _leading_token(text[len(through) :], self.tokens)
        return stops if stops.get("answer_stop") else {}

    def serving_problem(self, reasoning: bool) -> str | None:
        """Why a server cannot be served what this template trains on an answer with (or without) reasoning, or
        None: the generation prompt must be the start of the assistant turn it prompts (a prompt that opens
        ``<think>`` where the turn renders none trains text the served model never continues)."""
        user, answer = {"role": "user", "content": "PROBE_U1"}, {"role": "assistant", "content": "PROBE_A1"}
        if reasoning:
            answer["reasoning_content"] = "PROBE_R"
        try:
            prompt, turn = self.render([user], add_generation_prompt=True), self.render([user, answer])
        except TemplateSplitError:
            return None  # (a template that needs more than this to render: its records say what they need)
        if turn.startswith(prompt):
            return None
        common = len(os.path.commonprefix([prompt, turn]))
        return (
            f"its generation prompt ends {prompt[common:][:40]!r} where the assistant turn it prompts (an answer "
            f"{'with' if reasoning else 'without'} reasoning) renders {turn[common:][:40]!r}"
        )

    def adapt(
        self, messages: list[dict], tools: list[dict] | None = None
    ) -> tuple[list[dict], list[dict] | None, list[str]]:
        """(messages, tools) in a form this template can render, and the names of the adaptations made."""
        caps, notes, out = self.caps, [], []
        if not caps.reasoning and any(
            m.get(k) and m["role"] == "assistant" and m.get("weight", 1) for m in messages for k in _REASONING_FIELDS
        ):
            notes.append("reasoning_dropped")  # (the template renders none: said in the report, not trained)
        if tools and not caps.tools:
            schemas = TOOLS_HEADER + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
            if messages and messages[0]["role"] == "system":
                messages = [{**messages[0], "content": f"{messages[0]['content']}\n\n{schemas}"}, *messages[1:]]
            else:
                messages = [{"role": "system", "content": schemas}, *messages]
            tools = None
            notes.append("tools_in_system")
        for m in messages:
            m = dict(m)
            if m["role"] == "tool" and not caps.tool_role:
                m = {"role": "user", "content": m["content"]}
                notes.append("tool_as_user")
            if m.get("tool_calls") and not caps.tool_calls:
                calls = "\n".join(json.dumps(c.get("function", c), ensure_ascii=False) for c in m.pop("tool_calls"))
                m["content"] = f"{m['content']}\n{calls}" if m["content"] else calls
                notes.append("tool_calls_as_text")
            out.append(m)
        if not caps.system and out and out[0]["role"] == "system":
            system = out.pop(0)["content"]
            first_user = next((m for m in out if m["role"] == "user"), None)
            if first_user is None:  # nothing to fold it into: it becomes the user turn
                out.insert(0, {"role": "user", "content": system})
            elif system:
                first_user["content"] = f"{system}\n\n{first_user['content']}"
            notes.append("system_in_user")
        if not caps.consecutive_user:
            merged: list[dict] = []
            for m in out:
                if merged and m["role"] == "user" and merged[-1]["role"] == "user":
                    merged[-1] = {**merged[-1], "content": f"{merged[-1]['content']}\n\n{m['content']}"}
                    notes.append("users_merged")
                else:
                    merged.append(m)
            out = merged
        return out, tools, notes


_TEMPLATES: dict[tuple, ChatTemplate] = {}
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(messages: list[dict]) -> list[dict]:
    """As apply_chat_template does: the reasoning under each name templates read (thinking, reasoning_content)."""
    try:
        from transformers.utils.chat_template_utils import _alias_reasoning_fields
    except ImportError:  # a transformers without the aliasing renders the fields as given
        return messages
    return _alias_reasoning_fields(messages)


def _token_strings(tokenizer: Any) -> tuple[str, ...]:
    """The text of every special or added token of a tokenizer (one token each however it is surrounded), longest
    first."""
    added = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    return tuple(sorted(added | set(tokenizer.all_special_tokens), key=lambda t: (-len(t), t)))


def bind_template(tokenizer: Any, template: str, kwargs: dict | None = None) -> ChatTemplate:
    """The (cached) ChatTemplate of a template string with a tokenizer's special tokens and the template's own
    arguments (``data.chat_template_kwargs``)."""
    specials = tuple(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items()))
    key = (template, specials, _token_strings(tokenizer), json.dumps(kwargs or {}, sort_keys=True))
    if key not in _TEMPLATES:
        _TEMPLATES[key] = ChatTemplate(tokenizer, template, kwargs)
    return _TEMPLATES[key]


def check_serving(tokenizer: Any, template: str, kwargs: dict) -> None:
    """At start: a template that can serve neither answers with reasoning nor answers without is refused, naming
    the cause and the template arguments that would fix it; one that cannot serve one kind is said, and each such
    record is rejected as ``not_servable`` (``assistant_char_spans``)."""
    ct = bind_template(tokenizer, template, kwargs)
    problems = {r: p for r in (False, True) if (p := ct.serving_problem(r))}  # reasoning -> what goes wrong
    if not problems:
        return
    fixes = [  # (a fix serves both kinds: one that moves the problem to the other kind is none)
        f"'data.chat_template_kwargs={{{name}: {json.dumps(value)}}}'"
        for name in _template_arguments(ct)
        for value in (True, False)
        if kwargs.get(name) is not value and _serves_both(bind_template(tokenizer, template, {**kwargs, name: value}))
    ]
    fix = " or ".join(fixes[:3]) + " makes it consistent" if fixes else "no template argument (true or false) fixes it"
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    first = next(iter(problems.values()))
    if len(problems) == 2:
        raise ConfigError(
            f"the chat template of {name!r} cannot serve its own renders: {first}; {fix}: give that, or "
            "data.chat_template=FILE"
        )
    log.warning(
        "data: the chat template of %r cannot serve some of its own renders: %s; each such record is rejected as "
        "not_servable (%s)",
        name,
        first,
        fix,
    )


def _serves_both(ct: ChatTemplate) -> bool:
    return not any(ct.serving_problem(reasoning) for reasoning in (False, True))


def _template_arguments(ct: ChatTemplate) -> list[str]:
    """The variables a template reads that apply_chat_template leaves to its caller (enable_thinking, ...), those the
    run sets included."""
    from jinja2 import meta

    env = ct._compiled.environment
    names = meta.find_undeclared_variables(env.parse(ct.template))
    given = {"messages", "tools", "documents", "add_generation_prompt", *env.globals}
    return sorted(n for n in names if n not in given and not n.endswith("_token"))[:16]


def assistant_char_spans(
    ct: ChatTemplate, messages: list[dict], tools: list[dict] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of its supervised assistant output."""
    with ct.one_conversation():
        clean = ct.clean(messages)
        full = ct.render_clean(clean, False, tools)
        spans = []
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
            if not full.startswith(through):
                raise TemplateSplitError(
                    f"assistant turn {i}: the template does not render conversations as prefixes of each "
                    "other (the text up to the generation prompt is not kept when the turn is added, or a "
                    "later turn rewrites an earlier one), so the assistant spans cannot be derived reliably"
                )
            start = len(before)
            end = start + len(through[start:].rstrip())
            if end > start and ct.caps.answer_stop:
                # (a template without an end-of-turn token: the header that follows an answer is its stop, GLM-4.5's
                # way, after a tool call too, which ends on its own tag; after the last answer, the header that
                # would follow it, which the model must write to stop)
                if i + 1 < len(messages):  # (the next turn's header, where it is one of the two stops)
                    stops = tuple(s.strip() for s in (ct.caps.answer_stop, ct.caps.call_stop) if s)
                    stop = _leading_token(full[end:], stops)
                else:
                    stop = ct.caps.call_stop if message.get("tool_calls") else ct.caps.answer_stop
                    full = full[:end] + stop
                end += len(stop)
            if end > start:
                spans.append((start, end))
    return full, spans


def _leading_token(text: str, tokens: tuple[str, ...]) -> str:
    """The white space and the special or added token that ``text`` starts with, or "" where it starts otherwise."""
    body = text.lstrip()
    token = next((t for t in tokens if body.startswith(t)), "")
    return text[: len(text) - len(body) + len(token)] if token else ""


def _labels_fast(enc: Any, spans: list[tuple[int, int]], input_ids: list[int]) -> tuple[list[int], list[int]] | None:
    """Labels when every span starts and ends exactly on token boundaries (the usual case), found by asking the
    Rust encoding for the tokens at the span edges; None when any edge needs the full check."""
    labels = [IGNORE_INDEX] * len(input_ids)
    span_ends = []
    for a, b in spans:
        first, last = enc.char_to_token(a), enc.char_to_token(b - 1)
        if first is None or last is None or enc.token_to_chars(first)[0] != a or enc.token_to_chars(last)[1] != b:
            return None
        if (enc.token_to_chars(first - 1)[1] if first else 0) != a:  # not contiguous: a gap or an overlap at the edge
            return None
        if last + 1 < len(input_ids) and enc.token_to_chars(last + 1)[0] < b:  # bytes of one character
            return None
        labels[first : last + 1] = input_ids[first : last + 1]
        span_ends.append(last + 1)
    return labels, span_ends


def labels_from_offsets(
    text: str, spans: list[tuple[int, int]], input_ids: list[int], offsets: list[tuple[int, int]]
) -> tuple[list[int], list[int]]:
    """(labels, token index just past each span) from character spans and token offsets."""
    ids = np.asarray(input_ids, dtype=np.int64)
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    if not spans or not len(ids):
        return labels.tolist(), []
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    end = np.maximum.accumulate(off[:, 1])  # each token owns the characters since the previous token's end
    start = np.maximum.accumulate(np.minimum(off[:, 0], np.concatenate(([0], end[:-1]))))  # (and its own)
    span_ends = []
    for a, b in spans:
        i0, i1 = int(np.searchsorted(end, a, side="right")), int(np.searchsorted(start, b, side="left"))
        if i0 < i1 and (start[i0] < a or end[i1 - 1] > b):  # the first or last overlapping token sticks out
            idx = i0 if start[i0] < a else i1 - 1
            raise TemplateSplitError(
                f"token {idx} ({text[start[idx] : end[idx]]!r}) straddles the boundary of the assistant span "
                f"{text[a:b][:40]!r}...: the tokenizer merges prompt and answer characters, "
                "so this template cannot be split at token boundaries"
            )
        labels[i0:i1] = ids[i0:i1]
        span_ends.append(i1)
    return labels.tolist(), span_ends


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


def render_many(ct: ChatTemplate, convs: list[tuple[list[dict], list[dict] | None]]) -> list[tuple]:
    """(text, spans, adaptations, error) of each conversation: everything before tokenization."""
    rendered = []
    for messages, tools in convs:
        try:
            adapted, tools, notes = ct.adapt(messages, tools)
            rendered.append((*assistant_char_spans(ct, adapted, tools), notes, None))
        except TemplateSplitError as err:
            rendered.append(("", [], [], err))
    return rendered


def label_many(rendered: list[tuple], encodings: list[Any]) -> list[dict]:
    """Labels from rendered conversations and their Rust encodings. Each result holds ``input_ids``,
    ``labels``, ``span_ends`` and ``adaptations``, or ``error`` (a TemplateSplitError) and ``adaptations``."""
    results = []
    for (text, spans, notes, error), enc in zip(rendered, encodings):
        if error is None:
            try:
                ids = enc.ids
                fast = _labels_fast(enc, spans, ids)
                labels, span_ends = fast if fast is not None else labels_from_offsets(text, spans, ids, enc.offsets)
                results.append({"input_ids": ids, "labels": labels, "span_ends": span_ends, "adaptations": notes})
                continue
            except TemplateSplitError as err:
                error = err
        results.append({"error": error, "adaptations": notes})
    return results


def encode_many(tokenizer: Any, ct: ChatTemplate, convs: list[tuple[list[dict], list[dict] | None]]) -> list[dict]:
    """Render, tokenize (one batch) and label conversations (see ``label_many`` for the results)."""
    rendered = render_many(ct, convs)
    return label_many(
        rendered, backend_tokenizer(tokenizer).encode_batch([r[0] for r in rendered], add_special_tokens=False)
    )


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


def encode_conversation(
    tokenizer: Any,
    messages: list[dict],
    chat_template: str | None = None,
    max_length: int | None = None,
    tools: list[dict] | None = None,
    chat_template_kwargs: dict | None = None,
) -> dict[str, Any]:
    """Tokenize ``messages`` with the chat template and label assistant output only.

    Returns ``{"input_ids", "labels", "num_truncated_tokens", "adaptations"}``: ``labels[i] == input_ids[i]``
    where token ``i`` is assistant output (content and end-of-turn marker), ``-100`` elsewhere. ``input_ids``
    is exactly the tokenization of the template's rendering (of the conversation as adapted to what the
    template can render, see the module docstring). With ``max_length`` the conversation is cut after the
    last assistant turn that fits whole (else at ``max_length``) and the removed tokens are counted.
    ``tools`` (tool schemas) and ``chat_template_kwargs`` (the template's own arguments, such as
    ``enable_thinking``) are passed to the template.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("encode_conversation needs a fast (tokenizers-backed) tokenizer for its offsets")
    ct = bind_template(tokenizer, resolve_chat_template(tokenizer, chat_template), chat_template_kwargs)
    (result,) = encode_many(tokenizer, ct, [(messages, tools)])
    if "error" in result:
        raise result["error"]
    input_ids, labels, notes = result["input_ids"], result["labels"], result["adaptations"]
    num_truncated = 0
    if max_length is not None:
        input_ids, labels, num_truncated = truncate_at_turns(input_ids, labels, result["span_ends"], max_length)
    return {"input_ids": input_ids, "labels": labels, "num_truncated_tokens": num_truncated, "adaptations": notes}
