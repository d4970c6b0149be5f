"""Format normalisation: messages, alpaca and sharegpt become one canonical form, or a counted reason;
garbage never raises."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sftdist.data.formats import FORMATS, ROLES, Rejected, detect_format, normalise

GLAIVE = {
    "conversations": [
        {"from": "human", "value": "Find a recipe with rice."},
        {"from": "function_call", "value": '{"name": "search_recipes", "arguments": {"ingredients": ["rice"]}}'},
        {"from": "observation", "value": '{"recipes": ["fried rice"]}'},
        {"from": "gpt", "value": "Try fried rice."},
    ],
    "tools": '[{"name": "search_recipes", "parameters": {"type": "object"}}]',
}


def test_messages_pass_through_with_meta_and_tools():
    record = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a", "weight": 1},
        ],
        "tools": [{"name": "calc"}],
        "meta": {"id": 3},
        "difficulty": "hard",
    }
    conv = normalise(record, "messages")
    assert conv["messages"] == record["messages"] and conv["tools"] == [{"name": "calc"}]
    assert conv["meta"] == {"id": 3, "difficulty": "hard"}


def test_alpaca_joins_instruction_and_input_and_keeps_history():
    conv = normalise(
        {
            "instruction": "Translate.",
            "input": "Bonjour",
            "output": "Hello",
            "system": "Be exact.",
            "history": [["Hi", "Hey"]],
        },
        "alpaca",
    )
    assert conv["messages"] == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hey"},
        {"role": "user", "content": "Translate.\nBonjour"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert normalise({"instruction": "Q", "input": "", "output": "A"}, "alpaca")["messages"][0] == {
        "role": "user",
        "content": "Q",
    }


def test_sharegpt_function_calls_become_tool_calls_and_observations_tool_turns():
    conv = normalise(GLAIVE, "sharegpt")
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert conv["messages"][1]["tool_calls"] == [
        {"type": "function", "function": {"name": "search_recipes", "arguments": {"ingredients": ["rice"]}}}
    ]
    assert conv["messages"][2]["content"] == '{"recipes": ["fried rice"]}'
    assert conv["tools"] == [{"name": "search_recipes", "parameters": {"type": "object"}}]


@pytest.mark.parametrize(
    "record,fmt,reason",
    [
        ([1, 2], "messages", "not_an_object"),
        ({"text": "x"}, "messages", "missing_field"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages", "unknown_role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages", "non_string_content"),
        ({"messages": [{"role": "user", "content": "x"}]}, "messages", "no_assistant_turn"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]},
            "messages",
            "no_assistant_turn",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]},
            "messages",
            "no_assistant_turn",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]},
            "messages",
            "bad_weight",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "tools": "{"},
            "messages",
            "bad_tools",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "meta": 3},
            "messages",
            "bad_meta",
        ),
        ({"instruction": "x"}, "alpaca", "missing_field"),
        ({"instruction": "", "input": " ", "output": "y"}, "alpaca", "empty_prompt"),
        ({"instruction": "x", "output": "y", "history": [["a"]]}, "alpaca", "bad_history"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "sharegpt", "unknown_role"),
        (
            {"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "{oops"}]},
            "sharegpt",
            "bad_tool_calls",
        ),
    ],
)
def test_bad_records_are_rejected_with_a_reason(record, fmt, reason):
    result = normalise(record, fmt)
    assert isinstance(result, Rejected) and result.reason == reason and result.detail


def test_format_detection():
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"conversations": []}) == "sharegpt"
    assert detect_format({"instruction": "x", "output": "y"}) == "alpaca"
    assert detect_format({"text": "x"}) is None and detect_format("x") is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
role_like = st.sampled_from(
    ["user", "assistant", "system", "tool", "human", "gpt", "observation", "function_call", "robot", ""]
)
message_like = st.fixed_dictionaries(
    {},
    optional={
        "role": role_like,
        "from": role_like,
        "content": json_values,
        "value": json_values,
        "weight": json_values,
        "tool_calls": json_values,
    },
)
record_like = (
    st.fixed_dictionaries(
        {},
        optional={
            "messages": st.lists(message_like, max_size=4) | json_values,
            "conversations": st.lists(message_like, max_size=4) | json_values,
            "instruction": json_values,
            "input": json_values,
            "output": json_values,
            "history": json_values,
            "system": json_values,
            "tools": json_values,
            "meta": json_values,
            "difficulty": json_values,
        },
    )
    | json_values
)


@settings(max_examples=400, deadline=None)
@given(record=record_like, fmt=st.sampled_from(FORMATS))
def test_garbage_never_crashes_and_what_passes_is_canonical(record, fmt):
    result = normalise(record, fmt)
    if isinstance(result, Rejected):
        assert result.reason and isinstance(result.detail, str)
        return
    json.dumps(result)  # storable
    assert result["messages"] and all(m["role"] in ROLES and isinstance(m["content"], str) for m in result["messages"])
    assert any(m["role"] == "assistant" and m.get("weight", 1) == 1 for m in result["messages"])
    assert result["tools"] is None or all(isinstance(t, dict) for t in result["tools"])
    assert isinstance(result["meta"], dict)


def test_the_config_offers_every_format():
    from sftdist.config import FORMATS as CONFIG_FORMATS

    assert CONFIG_FORMATS == ("auto", *FORMATS)
