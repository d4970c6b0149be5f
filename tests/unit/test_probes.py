"""Generation probes: every check and every metric on crafted responses gives the exact expected value, and a
malformed probe file is refused naming the line."""

from __future__ import annotations

import json

import pytest

from sftdist.errors import DataError
from sftdist.metrics.probes import (
    Probe,
    Response,
    check,
    default_checks,
    distinct_2,
    find_tool_call,
    load_probe_file,
    opened_think,
    probe_metrics,
    repetition,
)

WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def _run(checks: dict, text: str, stopped: bool = True, tools=None) -> dict[str, bool]:
    return check(Probe("p", checks, tools=tools), Response(text, len(text.split()), stopped)).checks


@pytest.mark.parametrize(
    "checks,text,stopped,expected",
    [
        ({"regex": r"#### -?\d+\s*$"}, "7 + 5 = 12\n#### 12", True, True),
        ({"regex": r"#### -?\d+\s*$"}, "7 + 5 = 12, so the answer is 12", True, False),
        ({"json": True}, '{"a": [1, 2]}', True, True),
        ({"json": True}, '```json\n{"a": 1}\n```', True, True),  # one code fence around it is allowed
        ({"json": True}, '{"a": [1, 2}', True, False),  # does not parse
        ({"json": False}, "plain words", True, True),
        ({"json_schema": {"type": "object", "required": ["a"]}}, '{"a": 1}', True, True),
        ({"json_schema": {"type": "object", "required": ["a"]}}, '{"b": 1}', True, False),
        ({"json_schema": {"type": "object"}}, "not json", True, False),
        ({"stops": True}, "an answer", True, True),
        ({"stops": True}, "an answer that ran into the token limit", False, False),
        ({"max_words": 3}, "one two three", True, True),
        ({"max_words": 3}, "one two three four", True, False),
        ({"min_words": 2}, "one", True, False),
        ({"starts_with": "Sure"}, "  Sure, here", True, True),
        ({"ends_with": "."}, "Done. ", True, True),
        ({"ends_with": "."}, "Done!", True, False),
    ],
)
def test_each_check(checks, text, stopped, expected):
    assert _run(checks, text, stopped) == {name: expected for name in checks}


@pytest.mark.parametrize(
    "text,expected",
    [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', True),
        ('<functioncall> {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}', True),  # a JSON string
        ('{"name": "get_weather", "arguments": {}}', False),  # a required argument is missing
        ('{"name": "get_time", "arguments": {"city": "Paris"}}', False),  # not a declared tool
        ('{"name": "get_weather", "arguments": "{city: Paris}"}', False),  # malformed arguments
        ('<tool_call>{"name": "get_weather", "arguments": {"city": "Par', False),  # cut off
        ("It is sunny in Paris.", False),
    ],
)
def test_the_tool_call_check(text, expected):
    assert _run({"tool_call": True}, text, tools=WEATHER) == {"tool_call": expected}


def test_repetition_and_distinct_2_exact_values():
    assert repetition("a b c a b c", 3) == 1 - 3 / 4  # 4 trigrams, 3 distinct: (a b c) repeats once
    assert repetition("a b c d", 3) == 0.0 and repetition("a b", 3) == 0.0  # no repeat; too short
    assert repetition("go go go go go", 1) == 1 - 1 / 5
    assert distinct_2(["a b c", "a b d"]) == 3 / 4  # (a b) (b c) (a b) (b d): 3 distinct of 4
    assert distinct_2(["one", ""]) == 0.0


def test_probe_metrics_exact_values():
    probes = [Probe("a", {"stops": True, "regex": "x"}), Probe("b", {"stops": True}), Probe("c", {"json": True})]
    responses = [
        check(probes[0], Response("x y z x y z", 6, True)),  # passes both; trigrams xyz yzx zxy xyz: 1 of 4 repeats
        check(probes[1], Response("hit the limit", 9, False)),  # fails stops
        check(probes[2], Response("{bad", 2, True)),  # fails json
    ]
    metrics = probe_metrics(probes, responses, ngram=3)
    assert metrics == {
        "eval/format_pass_rate": 1 / 3,
        "eval/repetition_rate": (1 / 4 + 0.0 + 0.0) / 3,  # the mean over probes, a short response counting 0
        "eval/distinct_2": 5 / 7,  # (x y) (y z) (z x) (x y) (y z) (hit the) (the limit)
        "eval/eos_rate": 2 / 3,
        "eval/response_tokens": (6 + 9 + 2) / 3,
        "eval/format/regex": 1.0,
        "eval/format/json": 0.0,
        "eval/format/stops": 1 / 2,
    }


def test_default_checks_follow_the_reference():
    expected = {"stops": True, "min_words": 2, "max_words": 21}  # 7 words, within a factor of 3
    assert default_checks("Seven plus five is twelve.\n#### 12", 3.0) == expected
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert default_checks(call, 2.0)["tool_call"] is True and "json" not in default_checks(call, 2.0)
    assert default_checks('{"answer": 12}', 2.0)["json"] is True
    assert find_tool_call(call) == {"name": "get_weather", "arguments": {"city": "Paris"}}


def test_a_probe_file_loads_and_a_bad_probe_is_named_by_its_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}], "checks": {"stops": True}, "id": "hello"}
    path = tmp_path / "probes.jsonl"
    path.write_text("\ufeff" + json.dumps(good) + "\n\n" + json.dumps({**good, "tools": WEATHER}) + "\n")
    probes = load_probe_file(path)
    assert [p.id for p in probes] == ["hello", "hello"] and probes[1].tools == WEATHER
    bad = [
        ("{oops", "not valid JSON"),
        (json.dumps({"checks": {"stops": True}}), "a probe needs 'messages'"),
        (json.dumps({**good, "checks": {"stop": True}}), "unknown check 'stop'"),
        (json.dumps({**good, "checks": {"regex": "("}}), "is not a regular expression"),
        (json.dumps({**good, "checks": {"tool_call": True}}), "checks.tool_call needs the probe's declared 'tools'"),
        (json.dumps({**good, "checks": {"max_words": "ten"}}), "must be a whole number of words"),
        (json.dumps({**good, "checks": {"max_words": -3}}), "must be a whole number of words"),
        (json.dumps({**good, "checks": {"min_words": 5, "max_words": 2}}), "is above checks.max_words=2"),
        (json.dumps({**good, "checks": {"stops": "false"}}), "checks.stops='false' must be true or false"),
        (json.dumps({**good, "checks": {"json": "no"}}), "checks.json='no' must be true or false"),
        (json.dumps({**good, "checks": {}}), "'checks' must be a non-empty object"),
        (json.dumps({**good, "messages": [{"role": "assistant", "content": "x"}]}), "ends with an assistant turn"),
    ]
    for line, message in bad:
        path.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(DataError, match=message) as err:
            load_probe_file(path)
        assert f"{path}:2" in str(err.value)
    with pytest.raises(FileNotFoundError, match="eval.probes.path="):
        load_probe_file(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    "text,opened,expected",
    [
        ("<think>\nAdd them.\n</think>\n\n#### 12", "", True),
        ("#### 12", "", True),  # no think block at all: well formed (eval/think_rate shows it)
        ("<think>\n\n</think>\n\n#### 12", "", True),  # an empty block
        ("<think>\nAdd them, then #### 12", "", False),  # never closed: the answer is inside the block
        ("<think>\nAdd them.\n</think>\n", "", False),  # closed, but no answer after it
        ("#### 12</think>", "", False),  # a close without an open
        ("So: <think>add</think> 12", "", False),  # not at the start
        ("<think>a</think>b<think>c</think>d", "", False),  # two blocks
        ("Add them.\n</think>\n\n#### 12", "<think>", True),  # the prompt opened the block
        ("#### 12", "<think>", False),  # ... and the answer never closed it
    ],
)
def test_the_think_check(text, opened, expected):
    probe = Probe("p", {"think": True})
    assert check(probe, Response(text, 3, True, opened=opened)).checks == {"think": expected}
    assert check(Probe("p", {"think": False}), Response(text, 3, True, opened=opened)).checks == {"think": not expected}


def test_think_rate_counts_answers_that_think_among_probes_with_the_think_check():
    probes = [Probe(str(i), {"think": True}) for i in range(4)] + [Probe("plain", {"stops": True})]
    texts = ["<think>a</think>x", "<think>\n</think>x", "x", "<think>a", "<think>b</think>y"]
    metrics = probe_metrics(probes, [check(p, Response(t, 1, True)) for p, t in zip(probes, texts)], ngram=3)
    assert metrics["eval/think_rate"] == 1 / 4  # one of the four: empty, none and unclosed do not count
    assert metrics["eval/format/think"] == 3 / 4
    assert "eval/think_rate" not in probe_metrics(probes[4:], [check(probes[4], Response("x", 1, True))], ngram=3)
    assert default_checks("<think>\nadd\n</think>\n\n#### 12", 3.0)["think"] is True
    assert "think" not in default_checks("#### 12", 3.0)
    assert "think" not in default_checks("<think>\n\n</think>\n\n#### 12", 3.0)  # an empty block a template inserts
    assert opened_think("<|im_start|>assistant\n<think>\n") == "<think>"
    assert opened_think("<|im_start|>assistant\n<think>\n\n</think>\n\n") == ""
    assert opened_think("<|im_start|>user\nWhat does <think> do?<|im_end|>\n<|im_start|>assistant\n") == ""
