"""Reading sources: every supported container, records named by line/record/row, unparsable lines counted."""

from __future__ import annotations

import json

import pytest

from sftdist.config import DataConfig, SourceConfig
from sftdist.data.formats import Rejected
from sftdist.data.sources import Source, iter_records, sources_from_config, with_format
from sftdist.errors import DataError

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _records(path, fmt="auto"):
    return list(iter_records(Source("s", fmt, 1.0, str(path))))


def test_jsonl_names_lines_and_counts_what_cannot_be_parsed(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\n{not json\n" + '{"x": "caf\xe9"}'.encode("latin-1") + b"\n")
    (w1, r1), (w3, r3), (w4, r4) = _records(path)
    assert w1.endswith("d.jsonl line 1") and r1 == GOOD
    assert w3.endswith("line 3") and isinstance(r3, Rejected) and r3.reason == "invalid_json"
    assert w4.endswith("line 4") and r4.reason == "not_utf8"


def test_json_parquet_and_dataset_directories_read_the_same(tmp_path):
    import datasets

    rows = [GOOD, {**GOOD, "meta": {"id": "b"}}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved_dict"))
    for name, label in (("d.json", "record 1"), ("d.parquet", "row 1"), ("saved", "row 1"), ("saved_dict", "row 1")):
        records = _records(tmp_path / name)
        assert [r["messages"] for _, r in records] == [GOOD["messages"]] * 2, name
        assert records[1][0].endswith(label)


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"a": 1}', "must hold a list of records, not dict"),
        ("[1, 2", "invalid JSON at line 1"),
    ],
)
def test_unreadable_json_files_are_errors_naming_the_file(tmp_path, content, message):
    (tmp_path / "d.json").write_text(content)
    with pytest.raises(DataError, match=message):
        _records(tmp_path / "d.json")


def test_missing_unsupported_and_not_a_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        _records(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        _records(tmp_path / "d.csv")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="neither a saved datasets directory nor a directory of data files"):
        _records(tmp_path / "empty_dir")


def test_format_is_detected_from_the_first_record_that_shows_it(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "stray"}\n[1, 2]\n{"instruction": "x", "output": "y"}\n{"text": "later"}\n')
    assert [fmt for _, _, fmt in with_format(Source("s", "auto", 1.0, str(path)))] == ["alpaca"] * 4
    assert [fmt for _, _, fmt in with_format(Source("s", "sharegpt", 1.0, str(path)))] == ["sharegpt"] * 4
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert [fmt for _, _, fmt in with_format(Source("s", "auto", 1.0, str(path)))] == [None, None]


def test_arrow_null_filled_keys_are_absent_and_deep_json_is_a_counted_line(tmp_path):
    import datasets

    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 1}]},
        {"messages": [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "yes"}]},
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))  # Arrow adds weight: null to row 2
    (_, _), (_, second) = _records(tmp_path / "d.parquet")
    assert second["messages"][1] == {"role": "assistant", "content": "yes"}
    (tmp_path / "deep.jsonl").write_text("[" * 100000 + "]" * 100000 + "\n")
    ((_, deep),) = _records(tmp_path / "deep.jsonl")
    assert deep.reason == "invalid_json"
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        _records(tmp_path / "broken.parquet")


def test_sources_from_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("chat.v2.jsonl", "a.jsonl", "b.json", "x/a.jsonl", "y/a.json"):  # (an empty file is refused)
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(json.dumps(GOOD) + "\n")
    assert [s.name for s in sources_from_config(DataConfig(demo_size=3), seed=0)] == ["demo"]
    one = sources_from_config(DataConfig(path=str(tmp_path / "chat.v2.jsonl"), format="alpaca"), seed=0)
    assert [(s.name, s.format) for s in one] == [("chat", "alpaca")]
    many = sources_from_config(
        DataConfig(sources=[SourceConfig(path="a.jsonl", weight=2.0), SourceConfig(path="b.json", name="bee")]), seed=0
    )
    assert [(s.name, s.weight) for s in many] == [("a", 2.0), ("bee", 1.0)]
    with pytest.raises(FileNotFoundError, match=r"data.sources\[0\].path='nope.jsonl': no such file"):
        sources_from_config(DataConfig(sources=[SourceConfig(path="nope.jsonl")]), 0)
    with pytest.raises(DataError, match="same name twice"):
        sources_from_config(DataConfig(sources=[SourceConfig(path="x/a.jsonl"), SourceConfig(path="y/a.json")]), 0)


def _json_records(path):
    return [r for _, r in _records(path)]


@pytest.mark.parametrize("block", [1, 2, 3, 7, 64, 1 << 20])
def test_a_json_list_is_read_a_block_at_a_time_as_it_would_be_whole(tmp_path, monkeypatch, block):
    """Records, numbers, strings with escapes and multi-byte characters cut at every place by the blocks read."""
    from sftdist.data import jsonstream

    monkeypatch.setattr(jsonstream, "_JSON_BLOCK", block)
    rows = [GOOD, {"text": 'é€😀 "quoted" \\ \n'}, 12345, -1.5e3, [], {}, "s", True, None, {"deep": [[{"x": [1]}]]}]
    for name, text in (
        ("compact.json", json.dumps(rows, ensure_ascii=False)),
        ("indented.json", json.dumps(rows, indent=2)),
        ("crlf.json", json.dumps(rows, indent=1).replace("\n", "\r\n")),
    ):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8") + b"\n")
        records = _records(path)
        assert [r for _, r in records] == rows, name
        assert records[3][0].endswith(f"{name} record 3")
    (tmp_path / "empty_list.json").write_text(" [ ] \n")
    with pytest.raises(DataError, match="empty_list.json is empty"):
        _records(tmp_path / "empty_list.json")


@pytest.mark.parametrize(
    "content,message",
    [
        ('[{"a": 1},\n{"a": 2},\n\n{"a": 3 "b"}]', "invalid JSON at line 4 \\(Expecting ',' delimiter\\)"),
        ('[{"a": 1},\n{"a": 2},\n\n{"a": 3 "b"},\n{"c": 1},\n{"c": 2}]', "invalid JSON at line 4 \\(Expecting ','"),
        ('[{"a": 1},\n{"a": 2}\n{"a": 3}]', "invalid JSON at line 3 \\(Expecting ',' delimiter\\)"),
        ('[{"a": 1},\n{"a": 2},\n]', "invalid JSON at line 3 \\(Expecting value\\)"),
        ('[{"a": 1},\n{"a": 2}', "invalid JSON at line 2 \\(the list is not closed\\)"),
        ('[{"a": 1}]\n[]', "invalid JSON at line 2 \\(Extra data\\)"),
        ('"a"', "must hold a list of records, not str"),
        ("7", "must hold a list of records, not int"),
    ],
)
@pytest.mark.parametrize("block", [4, None])  # (None: the 1 MB default, the whole file in one block)
def test_a_json_list_read_in_blocks_names_the_line_of_its_error(tmp_path, monkeypatch, content, message, block):
    from sftdist.data import jsonstream

    if block:
        monkeypatch.setattr(jsonstream, "_JSON_BLOCK", block)
    (tmp_path / "d.json").write_text(content)
    with pytest.raises(DataError, match=message):
        _records(tmp_path / "d.json")


@pytest.mark.parametrize("block", [1, 3, 12, None])
def test_a_json_list_that_is_not_utf8_names_the_byte(tmp_path, monkeypatch, block):
    from sftdist.data import jsonstream

    if block:
        monkeypatch.setattr(jsonstream, "_JSON_BLOCK", block)
    for content, at in (
        (b'[{"a": "\xc3\xa9\xe2\x82"}]', 10),  # (a 3-byte character cut short)
        (b'\xef\xbb\xbf[{"a": "ok"},\n {"a": "caf\xe9"}]', 28),  # (after a byte-order mark)
        (b"\xef", 0),  # (a byte-order mark cut short is not an empty file)
        (b"\xef\xbb", 0),
    ):
        (tmp_path / "d.json").write_bytes(content)
        with pytest.raises(DataError, match=f"not UTF-8 \\(.* at byte {at}\\)"):
            _records(tmp_path / "d.json")


def test_a_json_list_read_in_blocks_reads_what_json_loads_reads(tmp_path, monkeypatch):
    """Random lists (escapes, multi-byte characters, numbers, literals, nesting, white space), whole and with
    bytes changed, at several block sizes: the same records as json.loads, or an error where it has one."""
    import random

    from sftdist.data import jsonstream

    rng = random.Random(0)

    def value(depth=0):
        kind = rng.choice(["str", "num", "lit", "list", "dict"] if depth < 3 else ["str", "num", "lit"])
        if kind == "str":
            return "".join(rng.choice('ab "\\/\n\té€😀\u2028') for _ in range(rng.randint(0, 8)))
        if kind == "num":
            return rng.choice([0, -7, 12345678901234567890, 1.5, -2.5e-7, 3e300])
        if kind == "lit":
            return rng.choice([True, False, None])
        if kind == "list":
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {f"k{i}": value(depth + 1) for i in range(rng.randint(0, 3))}

    path = tmp_path / "d.json"
    for case in range(400):
        rows = [value() for _ in range(rng.randint(0, 5))]
        data = json.dumps(rows, indent=rng.choice([None, 1]), ensure_ascii=rng.random() < 0.5).encode()
        if case % 2:  # a byte changed, inserted or removed
            at = rng.randrange(len(data))
            data = data[:at] + rng.choice([b"", b",", b"]", b"{", b'"', b"\\", b"x", b" "]) + data[at + 1 :]
        path.write_bytes(data)
        try:
            expected = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            expected = ValueError
        for block in (1, 5, 64):
            monkeypatch.setattr(jsonstream, "_JSON_BLOCK", block)
            if expected is ValueError or not isinstance(expected, list) or not expected:
                with pytest.raises(DataError):
                    _records(path)
            else:
                assert [r for _, r in _records(path)] == expected, (data, block)


def test_an_invalid_record_is_said_without_reading_the_rest_of_the_file(tmp_path):
    """A bad record in a large .json list is an error at once: the rest of the file is not read into memory."""
    import tracemalloc

    path = tmp_path / "bad.json"
    with path.open("w") as f:
        f.write('[{"a": 1 "b": 2},\n' + ",\n".join(json.dumps({"pad": "x" * 1000, "i": i}) for i in range(8000)) + "]")
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="invalid JSON at line 1 \\(Expecting ',' delimiter\\)"):
            _records(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6e6, f"peak {peak / 1e6:.1f} MB for a {path.stat().st_size / 1e6:.0f} MB file"


def test_a_large_json_list_is_read_in_bounded_memory(tmp_path):
    """A 24 MB list of records is read holding about a block (1 MB) and a record, not the file."""
    import tracemalloc

    record = {**GOOD, "meta": {"pad": "x" * 2000}}
    path = tmp_path / "big.json"
    with path.open("w") as f:
        f.write(
            "[" + ",\n".join(json.dumps({**record, "meta": {**record["meta"], "i": i}}) for i in range(12000)) + "]"
        )
    assert path.stat().st_size > 24e6
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_records(Source("s", "auto", 1.0, str(path))))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 12000
    assert peak < 6e6, f"peak {peak / 1e6:.1f} MB reading a {path.stat().st_size / 1e6:.0f} MB file"
