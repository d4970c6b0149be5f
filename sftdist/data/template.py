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

Training tokens are serving tokens: a server tokenizes ``before`` alone and the model writes the turn's tokens
after it, so each turn is trained in a sample that starts with ``before`` tokenized alone, then the turn tokenized
alone. The conversation is rendered once more in full: where that render is, at every turn, the turn's prompt and
target, and the last turn's prompt (tokenized alone) holds every earlier turn's prompt and target tokens (checked
cheaply: the tokens of a text alone are those of a longer text up to the shorter one's last special token, then
those of the rest), the conversation is one sample. Where it is not (a template that rewrites earlier turns when a
later one comes, as Qwen3 drops their reasoning; a tokenizer that merges characters across a prompt's end), the
turns become the fewest samples that are each exact (``label_many``).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    # The block a template writes where an answer's reasoning goes when it has none (Qwen3's "<think>\n\n</think>\n\n",
    # on the last answer), or "": trained or kept as context as data.empty_think says
    empty_think: str = ""


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
            empty_think=self._empty_think(user, answer),
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

    def _empty_think(self, user: dict, answer: dict) -> str:
        """``empty_think`` (see Capabilities): what an answer without reasoning renders before its text that an
        answer with reasoning does not render there."""
        try:
            prompt = self.render([user], add_generation_prompt=True)
            plain = self.render([user, answer])
            thought = self.render([user, {**answer, "reasoning_content": "PROBE_R"}])
        except TemplateSplitError:
            return ""
        if not (plain.startswith(prompt) and thought.startswith(prompt)) or "PROBE_R" not in thought[len(prompt) :]:
            return ""
        head = plain[len(prompt) : plain.find("PROBE_A1", len(prompt))]
        return head if head.strip() and not thought[len(prompt) :].startswith(head) else ""

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
                and not any(message.get(k) for k in _REASONING_FIELDS)
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


def _leading_token(text: str, tokens: tuple[str, ...]) -> str:
    """The white space and the special or added token that ``text`` starts with, or "" where it starts otherwise."""
    body = text.lstrip()
    token = next((t for t in tokens if body.startswith(t)), "")
    return text[: len(text) - len(body) + len(token)] if token else ""


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
