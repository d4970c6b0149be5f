"""Reading messages records: errors name the file, the line and the key; meta is carried through."""

from __future__ import annotations

import json

import pytest

from sftdist.data.sources import read_conversations

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _jsonl(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_jsonl_and_json_read_the_same_records(tmp_path):
    records = [GOOD, {**GOOD, "meta": {"difficulty": "hard", "id": 7}}, {**GOOD, "task": "greet"}]
    from_jsonl = read_conversations(str(_jsonl(tmp_path, records)))
    (tmp_path / "data.json").write_text(json.dumps(records))
    from_json = read_conversations(str(tmp_path / "data.json"))
    assert [r["messages"] for r in from_jsonl] == [r["messages"] for r in from_json] == [GOOD["messages"]] * 3
    assert from_jsonl[1]["meta"] == {"difficulty": "hard", "id": 7, "source": "data"}
    assert from_jsonl[2]["meta"] == {"task": "greet", "source": "data"}
    assert from_jsonl[0]["where"].endswith("data.jsonl line 1") and from_json[2]["where"].endswith("record 2")


@pytest.mark.parametrize("bad,message", [
    ("{not json", "line 2: invalid JSON"),
    ({"text": "no messages"}, "line 2: expected an object with a 'messages' list"),
    ({"messages": []}, "line 2: 'messages' must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "line 2: messages[0].role='robot' is not one of"),
    ({"messages": [{"role": "user", "content": 3}]}, "line 2: messages[0].content must be a string, not int"),
    ({"messages": [{"role": "user", "content": "x"}]}, "line 2: no assistant turn with content"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
     "line 2: no assistant turn with content"),
    ({**GOOD, "meta": "hard"}, "line 2: 'meta' must be an object"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]},
     "line 2: no assistant turn with content to train on"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0.5}]},
     "line 2: messages[1].weight=0.5 must be 0 or 1"),
    ({**GOOD, "tools": "calc"}, "line 2: 'tools' must be a list of objects"),
])
def test_bad_records_stop_with_the_line_and_reason(tmp_path, bad, message):
    path = _jsonl(tmp_path, [GOOD, bad])
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_conversations(str(path))


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path="):
        read_conversations(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        read_conversations(str(tmp_path / "d.csv"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no records"):
        read_conversations(str(tmp_path / "empty.jsonl"))


def test_tool_calls_with_null_content_and_tools_are_kept(tmp_path):
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "calc", "arguments": "{}"}}]}
    record = {"messages": [{"role": "user", "content": "2+2?"}, call], "tools": [{"name": "calc"}]}
    (read,) = read_conversations(str(_jsonl(tmp_path, [record])))
    assert read["messages"][1]["content"] == "" and read["messages"][1]["tool_calls"] == call["tool_calls"]
    assert read["tools"] == [{"name": "calc"}]


def test_bad_encoding_and_directories_are_named(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"x": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=r"latin1.jsonl line 2: not UTF-8"):
        read_conversations(str(tmp_path / "latin1.jsonl"))
    with pytest.raises(ValueError, match="is a directory"):
        read_conversations(str(tmp_path))
