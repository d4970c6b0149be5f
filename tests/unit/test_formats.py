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
    import dataclasses

    from sftdist.config import DataConfig, EvalSourceConfig, SourceConfig

    for schema in (DataConfig, SourceConfig, EvalSourceConfig):
        (fmt,) = [f for f in dataclasses.fields(schema) if f.name == "format"]
        assert fmt.metadata["choices"] == ("auto", *FORMATS)


PLAIN_REASONING_TOOLS = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}],
            "reasoning_content": "The user wants the weather. I call the tool.",
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21 degrees.", "reasoning_content": "Answer with the number."},
    ]
}


def _typed_parts(key: str, call: str) -> dict:
    """PLAIN_REASONING_TOOLS with its reasoning, text and tool calls as typed content parts under ``key``."""
    call_part = {
        "json": {"type": "tool_call", key: '{"name": "weather", "arguments": {"city": "Paris"}}'},
        "fields": {"type": "tool_call", "name": "weather", "arguments": {"city": "Paris"}},
        "openai": {"type": "tool_call", "function": {"name": "weather", "arguments": {"city": "Paris"}}},
    }[call]
    return {
        "messages": [
            {"role": "user", "content": [{"type": "text", key: "Weather in Paris?"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "reasoning", key: "The user wants the weather. "},
                    {"type": "reasoning", key: "I call the tool."},
                    {"type": "text", key: "Let me check."},
                    call_part,
                ],
            },
            {"role": "tool", "content": [{"type": "text", key: '{"temp": 21}'}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "reasoning", key: "Answer with the number."},
                    {"type": "text", key: "21 degrees."},
                ],
            },
        ]
    }


@pytest.mark.parametrize("call", ["json", "fields", "openai"])
@pytest.mark.parametrize("key", ["text", "value"])
def test_reasoning_and_tool_call_parts_give_the_conversation_of_the_plain_fields(key, call):
    assert normalise(_typed_parts(key, call), "messages") == normalise(PLAIN_REASONING_TOOLS, "messages")


def test_typed_parts_in_sharegpt_spelled_turns_too():
    spelled = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "gpt", "value": _typed_parts("value", "json")["messages"][1]["content"]},
            {"from": "observation", "value": '{"temp": 21}'},
            {"from": "gpt", "value": _typed_parts("value", "json")["messages"][3]["content"]},
        ]
    }
    assert normalise(spelled, "sharegpt") == normalise(PLAIN_REASONING_TOOLS, "messages")


@pytest.mark.parametrize(
    ("turn", "reason", "detail"),
    [
        (
            {"role": "assistant", "content": [{"type": "image_url", "image_url": {}}]},
            "non_text_content",
            "messages[1].content[0] is a 'image_url' part",
        ),
        (
            {"role": "user", "content": [{"type": "reasoning", "text": "r"}, {"type": "text", "text": "q"}]},
            "non_text_content",
            "messages[1].content has a reasoning part on a user turn",
        ),
        (
            {"role": "assistant", "content": [{"type": "reasoning", "text": "r"}], "reasoning_content": "r"},
            "non_text_content",
            "beside a reasoning field",
        ),
        (
            {"role": "user", "content": [{"type": "tool_call", "name": "f", "arguments": {}}]},
            "bad_tool_calls",
            "messages[1] is a user turn with tool calls",
        ),
        (
            {
                "role": "assistant",
                "content": [{"type": "tool_call", "name": "f"}],
                "tool_calls": [{"type": "function", "function": {"name": "g", "arguments": {}}}],
            },
            "bad_tool_calls",
            "has tool_calls and tool_call parts",
        ),
        (
            {"role": "assistant", "content": [{"type": "tool_call", "arguments": {}}]},
            "bad_tool_calls",
            "messages[1].content[0] tool_call part needs a 'name'",
        ),
        (
            {"role": "assistant", "content": [{"type": "text", "value": 3}]},
            "non_string_content",
            "messages[1].content[0].value is a int",
        ),
    ],
)
def test_a_typed_part_that_cannot_be_used_is_rejected_naming_it(turn, reason, detail):
    rejected = normalise({"messages": [{"role": "user", "content": "q"}, turn]}, "messages")
    assert isinstance(rejected, Rejected) and rejected.reason == reason and detail in rejected.detail, rejected


def test_part_details_name_the_key_the_record_uses_and_calls_parse_their_arguments():
    spelled = {"conversations": [{"from": "human", "value": [{"type": "image_url"}]}, {"from": "gpt", "value": "a"}]}
    assert normalise(spelled, "sharegpt").detail.startswith("conversations[0].value[0] is a 'image_url' part")
    call = {"from": "function_call", "value": [{"type": "text", "value": '{"name": "f", "arguments": "{\\"x\\": 1}"}'}]}
    conv = normalise({"conversations": [{"from": "human", "value": "q"}, call]}, "sharegpt")
    assert conv["messages"][1]["tool_calls"] == [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]
    part = {"type": "tool_call", "id": "c1", "function": {"name": "f", "arguments": '{"x": 1}'}}
    conv = normalise(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [part]}]}, "messages"
    )
    assert conv["messages"][1]["tool_calls"] == [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    ]
