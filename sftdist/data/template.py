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

Which tokens each turn is trained in: sftdist.data.samples.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftdist.data.render import compile_template, fast_renderer
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
    compile_template(text, f"data.chat_template={path!r}")
    return text


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
        self._compiled, self._json = fast_renderer(
            compile_template(template, f"the chat template of {name!r}"), template
        )
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
        if any(k in m for m in messages for k in REASONING_FIELDS):
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
            m.get(k) and m["role"] == "assistant" and m.get("weight", 1) for m in messages for k in REASONING_FIELDS
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
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


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


def _leading_token(text: str, tokens: tuple[str, ...]) -> str:
    """The white space and the special or added token that ``text`` starts with, or "" where it starts otherwise."""
    body = text.lstrip()
    token = next((t for t in tokens if body.startswith(t)), "")
    return text[: len(text) - len(body) + len(token)] if token else ""
