"""A ``.json`` data file (one JSON list of records) read one record at a time, a block of the file at a time, so that
a file of any size is read in bounded memory. ``json.JSONDecoder.raw_decode`` parses each record; what this adds is
knowing when a record is cut off by the end of the block read so far (read more) and when it is invalid JSON (a
DataError naming the file and the position).
"""

from __future__ import annotations

import codecs
import io
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sftdist.errors import DataError

_JSON_BLOCK = 1 << 20  # bytes of a .json list read at a time
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_NUMBER_CHARS = re.compile(r"[0-9.eE+-]*")
_STRUCTURE = re.compile(r'"(?:[^"\\]|\\.)*(")?|[\[\]{}]', re.DOTALL)  # strings (closed or cut off), brackets


def _closes(text: str, pos: int) -> bool:
    """Whether the JSON value at ``pos`` ends within ``text``, judged by its strings and brackets alone. A valid
    value cut off by the end of ``text`` never does, so a value that fails to parse and closes is invalid JSON."""
    depth = 0
    for match in _STRUCTURE.finditer(text, pos):
        token = match.group()
        if token[0] == '"':
            if match.group(1) is None:  # (a string runs to the end of the text)
                return False
            if depth == 0:
                return True
        elif token in "[{":
            depth += 1
        else:
            depth -= 1
            if depth <= 0:
                return True
    return False


class _JsonText:
    """The text of a .json file, decoded a block at a time (a byte-order mark dropped): what is kept is the unread
    rest of the current block, plus a record that spans blocks. ``pos`` is where reading is in ``text``."""

    def __init__(self, path: Path, file: io.BufferedIOBase):
        self.path, self.file = path, file
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text, self.pos = "", 0
        self.lines_before = 0  # line ends in the text already dropped
        self.bytes_read = 0
        self.started = False  # (the first character decoded, a byte-order mark dropped)

    def more(self, size: int = 0) -> bool:
        """Add the next block (``size`` bytes, else ``_JSON_BLOCK``) to the unread text; False at the end of the
        file (the text as it was)."""
        data = self.file.read(size or _JSON_BLOCK)
        pending = len(self.decoder.getstate()[0])  # bytes of a character cut by the previous block
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as err:
            at = self.bytes_read - pending + err.start
            raise DataError(f"{self.path}: not UTF-8 ({err.reason} at byte {at})") from err
        if not data:
            return False
        if text and not self.started:
            text, self.started = text.removeprefix("\ufeff"), True
        self.bytes_read += len(data)
        self.lines_before += self.text.count("\n", 0, self.pos)
        self.text, self.pos = self.text[self.pos :] + text, 0
        return True

    def next_char(self) -> str:
        """The next character that is not white space ('' at the end of the file); ``pos`` is at it."""
        while True:
            self.pos = _WHITESPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return ""

    def value(self, decoder: json.JSONDecoder) -> Any:
        """The JSON value at ``pos`` (after white space), read on into further blocks (more each time) while it is
        cut off: an invalid record is said at once, not after reading the rest of the file."""
        self.next_char()
        size = _JSON_BLOCK
        while True:
            try:
                value, end = decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as err:
                if not _closes(self.text, self.pos) and self.more(size):
                    size *= 2
                    continue
                raise self.error(err.msg, err.pos) from err
            except RecursionError as err:
                raise DataError(f"{self.path}: JSON nested too deeply to read") from err
            if type(value) in (int, float) and _NUMBER_CHARS.match(self.text, end).end() == len(self.text):
                if self.more(size):  # (the number may go on in the next block: 1.5 of 1.5e3)
                    size *= 2
                    continue
            self.pos = end
            return value

    def error(self, message: str, at: int) -> DataError:
        line = self.lines_before + self.text.count("\n", 0, at) + 1
        return DataError(
            f"{self.path}: invalid JSON at line {line} ({message}); one record per line (.jsonl) lets the good "
            "records through"
        )


def iter_json_list(path: Path, f: io.BufferedIOBase) -> Iterator[tuple[str, Any]]:
    """The records of a .json file holding one JSON list (open as ``f``), parsed one at a time as it is read."""
    decoder = json.JSONDecoder()
    text = _JsonText(path, f)
    first = text.next_char()
    if not first:
        return  # (empty: said by sources.iter_records)
    if first != "[":
        kind = type(text.value(decoder)).__name__  # (read whole to name it: only a list is read a record at a time)
        raise DataError(f"{path}: a .json data file must hold a list of records, not {kind}")
    text.pos += 1
    if text.next_char() == "]":
        text.pos += 1
    else:
        for i in itertools.count():
            yield f"{path} record {i}", text.value(decoder)
            after = text.next_char()
            if after not in (",", "]"):
                raise text.error("Expecting ',' delimiter" if after else "the list is not closed", text.pos)
            text.pos += 1
            if after == "]":
                break
    if text.next_char():
        raise text.error("Extra data", text.pos)
