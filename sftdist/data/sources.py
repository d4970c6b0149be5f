"""Reading conversation records from files, with errors that name the file, line and key.

This version reads ``messages`` records (OpenAI style) from jsonl or json files::

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "..."}, ...],
     "tools": [...],                                  # optional: tool schemas, passed to the chat template
     "meta": {"difficulty": "easy", ...}}            # optional and carried through

An assistant message may carry ``"weight": 0`` (OpenAI's fine-tuning format) to stay in the context
without being trained on.

A record that is not of that shape stops the run with a message naming where it is; nothing is
skipped silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from sftdist.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
META_KEYS = ("source", "task", "lang", "difficulty")


def _iter_raw(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) pairs; ``where`` is 'FILE line N' (jsonl) or 'FILE record N' (json)."""
    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{path} line {lineno}: not UTF-8 ({err.reason} at byte {err.start})") from err
                if not line.strip():
                    continue
                try:
                    yield f"{path} line {lineno}", json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path} line {lineno}: invalid JSON ({err.msg})") from err
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from err
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON at line {err.lineno} ({err.msg})") from err
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of records, not {type(data).__name__}")
        for i, record in enumerate(data):
            yield f"{path} record {i}", record
    else:
        raise DataError(f"data.path={str(path)!r}: unsupported file type {path.suffix!r} (use .jsonl or .json)")


def _check_messages(where: str, record: Any) -> list[dict]:
    if not isinstance(record, dict) or "messages" not in record:
        raise DataError(f"{where}: expected an object with a 'messages' list (data.format=messages)")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for j, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{j}] is not an object")
        role, content = message.get("role"), message.get("content")
        if content is None and role == "assistant" and message.get("tool_calls"):
            message["content"] = content = ""  # OpenAI style: a pure tool call has content null
        if role not in ROLES:
            raise DataError(f"{where}: messages[{j}].role={role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{j}].content must be a string, not {type(content).__name__}")
        if message.get("weight", 1) not in (0, 1):
            raise DataError(f"{where}: messages[{j}].weight={message['weight']!r} must be 0 or 1")
    if not any(m["role"] == "assistant" and m.get("weight", 1) == 1 and (m["content"] or m.get("tool_calls"))
               for m in messages):
        raise DataError(f"{where}: no assistant turn with content to train on")
    if "tools" in record and not (isinstance(record["tools"], list)
                                  and all(isinstance(t, dict) for t in record["tools"])):
        raise DataError(f"{where}: 'tools' must be a list of objects (tool schemas)")
    return messages


def read_conversations(path: str, data_format: str = "auto") -> list[dict]:
    """Records ``{"messages", "meta"}`` from a jsonl/json file, in file order."""
    file = Path(path)
    if file.is_dir():
        raise DataError(f"data.path={path!r} is a directory: this version reads .jsonl and .json files "
                        "(saved datasets directories are not implemented yet)")
    if not file.is_file():
        raise FileNotFoundError(f"data.path={path!r}: no such file")
    if data_format not in ("auto", "messages"):
        raise DataError(f"data.format={data_format!r} is not supported by this version's reader")
    records = []
    for where, raw in _iter_raw(file):
        messages = _check_messages(where, raw)
        meta = raw.get("meta", {})
        if not isinstance(meta, dict):
            raise DataError(f"{where}: 'meta' must be an object, not {type(meta).__name__}")
        meta = {**meta, **{k: raw[k] for k in META_KEYS if k in raw}}  # top-level keys win
        meta.setdefault("source", file.stem)
        records.append({"messages": messages, "tools": raw.get("tools"), "meta": meta, "where": where})
    if not records:
        raise DataError(f"data.path={path!r}: the file holds no records")
    return records
