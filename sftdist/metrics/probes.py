"""Generation probes: fixed prompts answered greedily at every eval, each answer checked for format. What loss does not
show: a model that answers in the wrong shape, repeats itself, or never stops.

A probe file is JSON lines, one probe per line::

    {"messages": [{"role": "user", "content": "What is 7 + 5?"}],
     "checks": {"regex": "#### -?\\\\d+\\\\s*$", "stops": true, "max_words": 40}}

``messages`` is the prompt (rendered with the run's chat template and its generation prompt); ``tools`` (optional) the
tools declared to the model; ``checks`` what the response must satisfy (:data:`CHECKS`); ``id`` (optional) its name.

Without a file, the probes are held-out conversations: the prompt is everything before the last trained assistant
turn (its tokens, exactly as trained), the checks follow from the reference answer (:func:`default_checks`).

Metrics (:func:`probe_metrics`): ``eval/format_pass_rate`` (probes passing every check), ``eval/format/<check>`` (of
the probes with that check, the share passing it), ``eval/repetition_rate`` (mean over responses of the share of
word n-grams that repeat an earlier one in the same response), ``eval/distinct_2`` (distinct word bigrams over all
bigrams, across responses), ``eval/eos_rate`` (responses that ended with the end-of-turn token before the limit),
``eval/response_tokens`` (mean generated tokens, the end-of-turn token not counted) and, where probes have the
``think`` check, ``eval/think_rate`` (of those, the share whose answer thinks: a closed, non-empty think block first).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftdist.errors import DataError


@dataclass
class Probe:
    id: str
    checks: dict[str, Any]
    messages: list[dict[str, Any]] | None = None  # from a probe file: rendered with the chat template
    prompt_ids: list[int] | None = None  # from a held-out sample: the tokens before its last trained answer
    tools: list[dict[str, Any]] | None = None
    reference: str | None = None  # a held-out sample's answer


@dataclass
class Response:
    text: str  # the generated text, the end-of-turn token not included
    num_tokens: int  # generated tokens, the end-of-turn token not included
    stopped: bool  # ended with an end-of-turn token before max_new_tokens
    checks: dict[str, bool] = field(default_factory=dict)
    opened: str = ""  # what the generation prompt already wrote of the answer: a think block it opened

    @property
    def passed(self) -> bool:
        return all(self.checks.values())


# ---- checks: (response, argument, tools) -> passed --------------------------------------------------------------


def _words(text: str) -> list[str]:
    return text.split()


def _strip_fence(text: str) -> str:
    """A JSON answer may come in one markdown code fence (```json ... ```): the fence is not part of it."""
    match = re.fullmatch(r"\s*```[\w-]*\s*\n(.*?)\n?\s*```\s*", text, flags=re.DOTALL)
    return match.group(1) if match else text


def _parses_as_json(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(_strip_fence(text).strip())
    except ValueError:
        return False, None


def _check_json(response: Response, argument: Any, tools: Any) -> bool:
    return _parses_as_json(response.text)[0] is bool(argument)


def _check_json_schema(response: Response, schema: Any, tools: Any) -> bool:
    import jsonschema

    ok, value = _parses_as_json(response.text)
    return ok and jsonschema.Draft202012Validator(schema).is_valid(value)


def _tool_names_and_required(tools: Any) -> dict[str, set[str]]:
    """{tool name: its required argument names} of declared tools (OpenAI's {"type": "function", "function": {...}}
    or the bare function object)."""
    out = {}
    for tool in tools or []:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            parameters = function.get("parameters") or {}
            out[function["name"]] = set(parameters.get("required") or []) if isinstance(parameters, dict) else set()
    return out


def find_tool_call(text: str) -> dict[str, Any] | None:
    """The first JSON object in ``text`` that looks like a tool call (a string ``name`` and ``arguments`` or
    ``parameters``), whatever wraps it (``<tool_call>``, ``<functioncall>``, a code fence): its name and its
    arguments as an object, or None."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            continue
        arguments = value.get("arguments", value.get("parameters"))
        if isinstance(arguments, str):  # OpenAI's wire format: the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return {"name": value["name"], "arguments": None}
        return {"name": value["name"], "arguments": arguments if isinstance(arguments, dict) else None}
    return None


THINK = ("<think>", "</think>")


def opened_think(prompt: str) -> str:
    """The think tag a generation prompt ends on (its answer continues inside the block), or ""."""
    return THINK[0] if prompt.rstrip().endswith(THINK[0]) else ""


def think_parts(response: Response) -> tuple[str, str] | None:
    """(reasoning, answer) of a response: one think block at its start, closed, then an answer; ("", text) for a
    response without think tags; None where the tags are unbalanced or out of place, or the answer is missing (left
    inside the block)."""
    opening, closing = THINK
    text = (response.opened + response.text).lstrip()
    if opening not in text and closing not in text:
        return "", text
    if not text.startswith(opening) or text.count(opening) != 1 or text.count(closing) != 1:
        return None
    reasoning, _, answer = text[len(opening) :].partition(closing)
    return (reasoning, answer) if answer.strip() else None


def _check_tool_call(response: Response, argument: Any, tools: Any) -> bool:
    """A well-formed call of a declared tool: a known name, arguments that are an object holding every required
    argument of that tool."""
    call = find_tool_call(response.text)
    declared = _tool_names_and_required(tools)
    well_formed = (
        call is not None
        and call["arguments"] is not None
        and call["name"] in declared
        and declared[call["name"]] <= set(call["arguments"])
    )
    return well_formed is bool(argument)


CHECKS: dict[str, Callable[[Response, Any, Any], bool]] = {
    "regex": lambda r, pattern, tools: re.search(pattern, r.text) is not None,
    "json": _check_json,
    "json_schema": _check_json_schema,
    "tool_call": _check_tool_call,
    "stops": lambda r, wanted, tools: r.stopped is bool(wanted),
    "think": lambda r, wanted, tools: (think_parts(r) is not None) is bool(wanted),
    "max_words": lambda r, n, tools: len(_words(r.text)) <= n,
    "min_words": lambda r, n, tools: len(_words(r.text)) >= n,
    "starts_with": lambda r, prefix, tools: r.text.lstrip().startswith(prefix),
    "ends_with": lambda r, suffix, tools: r.text.rstrip().endswith(suffix),
}


def check(probe: Probe, response: Response) -> Response:
    """``response`` with the result of each of ``probe``'s checks."""
    response.checks = {name: bool(CHECKS[name](response, arg, probe.tools)) for name, arg in probe.checks.items()}
    return response


# ---- probe sets --------------------------------------------------------------------------------------------------


def _validate_checks(checks: Any, where: str) -> dict[str, Any]:
    if not isinstance(checks, dict) or not checks:
        raise DataError(f"{where}: 'checks' must be a non-empty object of checks ({', '.join(CHECKS)})")
    for name, argument in checks.items():
        if name not in CHECKS:
            raise DataError(f"{where}: unknown check {name!r}; the checks are: {', '.join(CHECKS)}")
        if name == "regex":
            try:
                re.compile(argument)
            except (re.error, TypeError) as err:
                raise DataError(f"{where}: checks.regex={argument!r} is not a regular expression ({err})") from err
        if name in ("json", "tool_call", "stops", "think") and not isinstance(argument, bool):
            raise DataError(f"{where}: checks.{name}={argument!r} must be true or false")
        if name in ("max_words", "min_words") and (
            isinstance(argument, bool) or not isinstance(argument, int) or argument < 0
        ):
            raise DataError(f"{where}: checks.{name}={argument!r} must be a whole number of words (>= 0)")
        if name in ("starts_with", "ends_with") and not isinstance(argument, str):
            raise DataError(f"{where}: checks.{name}={argument!r} must be a string")
        if name == "json_schema":
            import jsonschema

            try:
                jsonschema.Draft202012Validator.check_schema(argument)
            except jsonschema.SchemaError as err:
                raise DataError(f"{where}: checks.json_schema is not a JSON schema ({err.message})") from err
    if checks.get("min_words", 0) > checks.get("max_words", float("inf")):
        raise DataError(
            f"{where}: checks.min_words={checks['min_words']} is above checks.max_words={checks['max_words']}: "
            "no response can pass"
        )
    return dict(checks)


def load_probe_file(path: str | Path) -> list[Probe]:
    """The probes of a JSON-lines file; a malformed probe is an error naming its line (never skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval.probes.path={str(path)!r}: no such file")
    probes = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as err:
            raise DataError(f"{where}: not valid JSON ({err})") from err
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise DataError(f"{where}: a probe needs 'messages', a non-empty list of {{role, content}} objects")
        if messages[-1].get("role") == "assistant":
            raise DataError(f"{where}: the prompt ends with an assistant turn; the probe's answer is generated")
        tools = record.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise DataError(f"{where}: 'tools' must be a list of tool schemas")
        checks = _validate_checks(record.get("checks"), where)
        if "tool_call" in checks and not _tool_names_and_required(tools):
            raise DataError(f"{where}: checks.tool_call needs the probe's declared 'tools'")
        probes.append(Probe(str(record.get("id", f"{path.stem}:{number}")), checks, messages=messages, tools=tools))
    if not probes:
        raise DataError(f"eval.probes.path={str(path)!r} holds no probe")
    return probes


def default_checks(reference: str, length_factor: float) -> dict[str, Any]:
    """Checks for a held-out prompt, from its reference answer: the response stops; it is JSON when the reference
    is, a tool call when the reference is one; its length (words) within ``length_factor`` of the reference's."""
    checks: dict[str, Any] = {"stops": True}
    reasoning = reference.lstrip()[len(THINK[0]) :].partition(THINK[1])[0]
    if reference.lstrip().startswith(THINK[0]) and reasoning.strip():  # (not an empty block a template inserts)
        checks["think"] = True
    call = find_tool_call(reference)
    if call is not None and call["arguments"] is not None:
        checks["tool_call"] = True
    elif _parses_as_json(reference)[0] and reference.strip()[:1] in ("{", "["):
        checks["json"] = True
    words = len(_words(reference))
    if words:
        checks["min_words"] = max(1, int(words / length_factor))
        checks["max_words"] = max(1, int(words * length_factor + 0.999999))
    return checks


def reference_tools(reference: str) -> list[dict[str, Any]] | None:
    """A held-out tool call's own tool, as the tool the probe declares (the sample keeps no schema)."""
    call = find_tool_call(reference)
    return None if call is None else [{"name": call["name"], "parameters": {"required": []}}]


# ---- metrics -----------------------------------------------------------------------------------------------------


def repetition(text: str, n: int) -> float:
    """The share of the response's word n-grams that repeat one seen earlier in it (0 below n words)."""
    words = _words(text)
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_2(texts: Sequence[str]) -> float:
    """Distinct word bigrams over all word bigrams, across the responses (0 when there is none)."""
    grams = [tuple(w[i : i + 2]) for w in map(_words, texts) for i in range(len(w) - 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def probe_metrics(probes: Sequence[Probe], responses: Sequence[Response], ngram: int) -> dict[str, float]:
    """The eval/* probe metrics of checked responses (see the module docstring)."""
    n = len(responses)
    metrics = {
        "eval/format_pass_rate": sum(r.passed for r in responses) / n,
        "eval/repetition_rate": sum(repetition(r.text, ngram) for r in responses) / n,
        "eval/distinct_2": distinct_2([r.text for r in responses]),
        "eval/eos_rate": sum(r.stopped for r in responses) / n,
        "eval/response_tokens": sum(r.num_tokens for r in responses) / n,
    }
    for name in CHECKS:
        results = [r.checks[name] for r in responses if name in r.checks]
        if results:
            metrics[f"eval/format/{name}"] = sum(results) / len(results)
    thinking = [think_parts(r) for r in responses if "think" in r.checks]
    if thinking:  # (answers expected to think: a run that stops thinking shows here)
        metrics["eval/think_rate"] = sum(bool(parts and parts[0].strip()) for parts in thinking) / len(thinking)
    return metrics
