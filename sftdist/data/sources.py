"""Reading conversation records from files, with errors that name the file, line and key.

This version reads ``messages`` records (OpenAI style) from jsonl or json files::

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "..."}, ...],
     "meta": {"difficulty": "easy", ...}}            # meta is optional and carried through

A record that is not of that shape stops the run with a message naming where it is; nothing is
skipped silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

ROLES = ("system", "user", "assistant", "tool")
META_KEYS = ("source", "task", "lang", "difficulty")


def _iter_raw(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) pairs; ``where`` is 'FILE line N' (jsonl) or 'FILE record N' (json)."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path} line {lineno}", json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path} line {lineno}: invalid JSON ({err.msg})") from err
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON at line {err.lineno} ({err.msg})") from err
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json data file must hold a list of records, not {type(data).__name__}")
        for i, record in enumerate(data):
            yield f"{path} record {i}", record
    else:
        raise ValueError(f"data.path={str(path)!r}: unsupported file type {path.suffix!r} (use .jsonl or .json)")


def _check_messages(where: str, record: Any) -> list[dict]:
    if not isinstance(record, dict) or "messages" not in record:
        raise ValueError(f"{where}: expected an object with a 'messages' list (data.format=messages)")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    for j, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: messages[{j}] is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}: messages[{j}].role={role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str) and not (role == "assistant" and message.get("tool_calls")):
            raise ValueError(f"{where}: messages[{j}].content must be a string, not {type(content).__name__}")
    if not any(m["role"] == "assistant" and (m.get("content") or m.get("tool_calls")) for m in messages):
        raise ValueError(f"{where}: no assistant turn with content, so nothing to train on")
    return messages


def read_conversations(path: str, data_format: str = "auto") -> list[dict]:
    """Records ``{"messages", "meta"}`` from a jsonl/json file, in file order."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"data.path={path!r}: no such file")
    if data_format not in ("auto", "messages"):
        raise ValueError(f"data.format={data_format!r} is not supported by this version's reader")
    records = []
    for where, raw in _iter_raw(file):
        messages = _check_messages(where, raw)
        meta = raw.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(f"{where}: 'meta' must be an object, not {type(meta).__name__}")
        meta = {**meta, **{k: raw[k] for k in META_KEYS if k in raw}}  # top-level keys win
        meta.setdefault("source", file.stem)
        records.append({"messages": messages, "meta": meta, "where": where})
    if not records:
        raise ValueError(f"data.path={path!r}: the file holds no records")
    return records
