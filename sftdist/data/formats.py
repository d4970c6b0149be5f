"""Record formats -> one canonical conversation, or a counted reason why not. Pure; never raises.

Canonical form (OpenAI-style ``messages``)::

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str,
                   "tool_calls": [...]?, "weight": 0 | 1?}, ...],
     "tools": [tool schema, ...] | None,
     "meta": {"source": ..., "task": ..., "lang": ..., "difficulty": ..., ...}}

The formats:

- ``messages``: ``{"messages": [...], "tools"?: [...], "meta"?: {...}}``; an assistant tool call may have
  ``"content": null``; ``"weight": 0`` keeps an assistant turn in context without training on it. A turn may be
  written ``{"from", "value"}`` (sharegpt's keys) instead of ``{"role", "content"}``.
- ``alpaca``: ``{"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}``; the
  user turn is ``instruction`` then ``input`` on the next line.
- ``sharegpt``: ``{"conversations": [{"from": "human" | "gpt" | "system" | "function_call" |
  "observation", "value": str}, ...], "system"?, "tools"?: JSON list or its string}``; ``function_call``
  is an assistant tool call (trained on), ``observation`` a tool result (never trained on). A turn may be written
  ``{"role", "content"}`` instead.
- ``prompt_completion`` (TRL's): ``{"prompt": [...messages], "completion": [...messages]}``, or both strings (a user
  turn and the assistant's answer); the completion is trained on, the prompt is context (its own assistant turns
  included).

In every format a message's content may be a list of typed content parts (``[{"type": "text", "text": ...}]``),
each part's text under ``text`` (OpenAI) or ``value`` (LLaMA-Factory): the text parts are joined, ``reasoning`` parts
become the turn's ``reasoning_content`` and ``tool_call`` parts its tool calls (the call as JSON text, or ``name`` and
``arguments``, or OpenAI's ``function``), in order; a part of another type (an image, audio) rejects the record as
``non_text_content``, naming it. A top-level ``system`` string is the conversation's system prompt in every format
(a record with another system turn too is rejected as ``two_system_prompts``).

Metadata (``source``, ``task``, ``lang``, ``difficulty``) is taken from the top level or from ``meta``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

FORMATS = ("messages", "alpaca", "sharegpt", "prompt_completion")
ROLES = ("system", "user", "assistant", "tool")
META_KEYS = ("source", "task", "lang", "difficulty")
_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
_KEPT_STRINGS = ("name", "tool_call_id", *_REASONING_KEYS)
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}


@dataclass(frozen=True)
class Rejected:
    """Why a record cannot be used: ``reason`` is a short counted key, ``detail`` names the field."""

    reason: str
    detail: str


def detect_format(record: Any) -> str | None:
    """The format a record looks like, or None."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "prompt" in record and "completion" in record and "instruction" not in record:
        return "prompt_completion"
    if "instruction" in record or "output" in record:
        return "alpaca"
    return None


def normalise(record: Any, fmt: str) -> dict | Rejected:
    """``record`` in format ``fmt`` -> the canonical conversation, or why it cannot be used."""
    if not isinstance(record, dict):
        return Rejected("not_an_object", f"a record must be a JSON object, not {type(record).__name__}")
    try:
        if fmt == "messages":
            messages = _with_system(_from_messages(record.get("messages"), "messages"), record)
        elif fmt == "alpaca":
            messages = _from_alpaca(record)
        elif fmt == "sharegpt":
            messages = _with_system(_from_sharegpt(record), record)
        elif fmt == "prompt_completion":
            messages = _with_system(_from_prompt_completion(record), record)
        else:
            raise AssertionError(f"unknown format {fmt!r}")
        tools = _tools(record.get("tools"))
        meta = _meta(record)
    except _Reject as r:
        return r.rejected
    if not any(
        m["role"] == "assistant" and m.get("weight", 1) == 1 and (m["content"].strip() or m.get("tool_calls"))
        for m in messages
    ):
        return Rejected("no_assistant_turn", "no assistant turn with content to train on")
    return {"messages": messages, "tools": tools, "meta": meta}


class _Reject(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.rejected = Rejected(reason, detail)


def _string(value: Any, field: str, *, required: bool) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        what = "missing" if value is None else f"a {type(value).__name__}, not a string"
        raise _Reject("missing_field" if value is None else "non_string_content", f"{field} is {what}")
    return value


_TEXT_PARTS = ("text", "input_text", "output_text")  # (the last two: OpenAI's Responses API)


def _content(value: Any, field: str, *, required: bool) -> tuple[str, str | None, list[dict]]:
    """A message's content as (text, reasoning, tool calls): a string, or typed content parts. Text parts are joined,
    reasoning parts joined as the turn's reasoning, tool-call parts become its tool calls, in order; a part's text is
    under ``text`` (OpenAI) or ``value`` (LLaMA-Factory)."""
    if not isinstance(value, list):
        return _string(value, field, required=required), None, []
    texts, reasonings, calls = [], [], []
    for k, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        where = f"{field}[{k}]"
        if kind in _TEXT_PARTS:
            texts.append(_part_text(part, where))
        elif kind == "reasoning":
            reasonings.append(_part_text(part, where))
        elif kind == "tool_call":
            calls.append(_tool_call_part(part, where))
        else:
            raise _Reject(
                "non_text_content",
                f"{where} is a {kind!r} part: sftdist trains on text, reasoning and tool calls only",
            )
    return "".join(texts), "".join(reasonings) if reasonings else None, calls


def _part_text(part: dict, where: str) -> str:
    key = "text" if "text" in part or "value" not in part else "value"
    return _string(part.get(key), f"{where}.{key}", required=True)


def _tool_call_part(part: dict, where: str) -> dict:
    """A tool-call part: its call as JSON text under ``value`` or ``text``, or the call's fields in the part itself
    (``name`` and ``arguments``, or OpenAI's ``function``)."""
    if "value" in part or "text" in part:
        return _tool_call(_part_text(part, where), where, "tool_call part")
    out = _call(part.get("function", part), where, "tool_call part")
    return {**({"id": part["id"]} if isinstance(part.get("id"), str) else {}), **out}


def _from_messages(messages: Any, field: str) -> list[dict]:
    """A list of turns, each in either spelling: ``role``/``content`` (OpenAI) or ``from``/``value`` (sharegpt)."""
    if not isinstance(messages, list) or not messages:
        raise _Reject("missing_field", f"'{field}' must be a non-empty list")
    out = []
    for j, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _Reject("not_an_object", f"{field}[{j}] is not an object")
        message = {k: v for k, v in message.items() if v is not None}  # null = absent (Arrow fills missing keys)
        content_key = "content"
        if "role" not in message and "from" in message:
            message, content_key = _from_sharegpt_turn(message, field, j), "value"
        role = message.get("role")
        if role not in ROLES:
            raise _Reject("unknown_role", f"{field}[{j}].role={role!r} is not one of {', '.join(ROLES)}")
        clean = {"role": role}
        calls = message.get("tool_calls") or None  # [] is no call
        if calls is not None and (not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls)):
            raise _Reject("bad_tool_calls", f"{field}[{j}].tool_calls must be a list of objects on an assistant turn")
        where = f"{field}[{j}].{content_key}"
        # OpenAI style: a pure tool call has content null
        text, reasoning, part_calls = _content(message.get("content"), where, required=not calls)
        if part_calls:
            if calls:
                raise _Reject("bad_tool_calls", f"{field}[{j}] has tool_calls and tool_call parts: keep one of them")
            calls = part_calls
        if calls and role != "assistant":
            raise _Reject("bad_tool_calls", f"{field}[{j}] is a {role} turn with tool calls: only assistant turns call")
        if calls:
            clean["tool_calls"] = calls
        clean["content"] = text
        if reasoning is not None:
            if role != "assistant" or any(k in message for k in _REASONING_KEYS):
                why = f"on a {role} turn" if role != "assistant" else "beside a reasoning field: keep one of them"
                raise _Reject("non_text_content", f"{where} has a reasoning part {why}")
            message["reasoning_content"] = reasoning
        if "weight" in message:
            if message["weight"] not in (0, 1) or isinstance(message["weight"], bool):
                raise _Reject("bad_weight", f"{field}[{j}].weight={message['weight']!r} must be 0 or 1")
            clean["weight"] = int(message["weight"])
        for key in _KEPT_STRINGS:  # tool names and ids; reasoning, which templates render (or strip) themselves
            if key in message:
                clean[key] = _string(message[key], f"{field}[{j}].{key}", required=True)
        out.append(clean)
    return out


def _from_prompt_completion(record: dict) -> list[dict]:
    """TRL's prompt/completion: the completion is trained on, the prompt (its assistant turns too) is context."""
    prompt, completion = record.get("prompt"), record.get("completion")
    if prompt is None or completion is None:
        raise _Reject("missing_field", f"{'prompt' if prompt is None else 'completion'} is missing")
    if isinstance(prompt, str) and isinstance(completion, str):
        if not prompt.strip():
            raise _Reject("empty_prompt", "prompt is empty")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if isinstance(prompt, str) or isinstance(completion, str):
        raise _Reject("mixed_prompt_completion", "prompt and completion must both be strings or both message lists")
    context = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in _from_messages(prompt, "prompt")]
    answer = _from_messages(completion, "completion")
    if any(m["role"] not in ("assistant", "tool") for m in answer):
        raise _Reject("unknown_role", "completion may hold assistant (and tool) turns only")
    return context + answer


def _with_system(messages: list[dict], record: dict) -> list[dict]:
    """A top-level ``system`` string as the conversation's system turn."""
    system = _string(record.get("system"), "system", required=False)
    if not system.strip():
        return messages
    if messages and messages[0]["role"] == "system" and messages[0]["content"] == system:
        return messages  # (the same prompt written twice)
    if any(m["role"] == "system" for m in messages):
        raise _Reject("two_system_prompts", "a 'system' field beside another system turn: keep one of them")
    return [{"role": "system", "content": system}, *messages]


def _from_alpaca(record: dict) -> list[dict]:
    instruction = _string(record.get("instruction"), "instruction", required=True)
    extra = _string(record.get("input"), "input", required=False)
    output = _string(record.get("output"), "output", required=True)
    system = _string(record.get("system"), "system", required=False)
    if not (instruction.strip() or extra.strip()):
        raise _Reject("empty_prompt", "instruction and input are both empty")
    messages = [{"role": "system", "content": system}] if system.strip() else []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise _Reject("bad_history", "history must be a list of [user, assistant] pairs")
    for k, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise _Reject("bad_history", f"history[{k}] must be a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = f"{instruction}\n{extra}" if instruction.strip() and extra.strip() else instruction + extra
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _from_sharegpt(record: dict) -> list[dict]:
    return _from_messages(record.get("conversations"), "conversations")


def _from_sharegpt_turn(turn: dict, field: str, j: int) -> dict:
    """A ``from``/``value`` turn as a ``role``/``content`` one (its other keys kept): ``function_call`` an assistant
    tool call, ``observation`` a tool result."""
    source_role = turn["from"]
    if source_role not in _SHAREGPT_ROLES:
        raise _Reject("unknown_role", f"{field}[{j}].from={source_role!r} is not one of {', '.join(_SHAREGPT_ROLES)}")
    value = turn.get("value")
    turn = {k: v for k, v in turn.items() if k not in ("from", "value")}
    if source_role == "function_call":
        value = _content(value, f"{field}[{j}].value", required=True)[0]
        return {**turn, "role": "assistant", "content": "", "tool_calls": [_tool_call(value, f"{field}[{j}]")]}
    return {**turn, "role": _SHAREGPT_ROLES[source_role], "content": value}


def _tool_call(value: str, where: str, what: str = "function_call") -> dict:
    """A sharegpt function_call value ('{"name": ..., "arguments": ...}') as an OpenAI tool call."""
    try:
        call = json.loads(value)
    except json.JSONDecodeError as err:
        raise _Reject("bad_tool_calls", f"{where} {what} is not JSON ({err.msg})") from err
    return _call(call, where, what)


def _call(call: Any, where: str, what: str) -> dict:
    """``{"name": ..., "arguments": ...}`` as an OpenAI tool call, arguments given as a JSON string parsed."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise _Reject("bad_tool_calls", f"{where} {what} needs a 'name'")
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some data sets nest the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return {"type": "function", "function": {"name": call["name"], "arguments": arguments}}


def _tools(tools: Any) -> list[dict] | None:
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):  # sharegpt data sets (glaive) store the schemas as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise _Reject("bad_tools", f"tools is not JSON ({err.msg})") from err
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise _Reject("bad_tools", "tools must be a list of objects (tool schemas)")
    return tools or None


def _meta(record: dict) -> dict:
    meta = record.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise _Reject("bad_meta", f"meta must be an object, not {type(meta).__name__}")
    return {**meta, **{k: record[k] for k in META_KEYS if k in record}}  # top-level keys win
