"""Streaming preparation (issue 15, part 3): records go through in chunks and are written a shard at a time,
reading never runs more than a bounded window ahead of encoding, a stopped preparation continues without encoding
its finished shards again, and none of it changes a sample or a count."""

from __future__ import annotations

import json
import logging

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import compose, fit_and_close, read_metrics
from sftdist.config import DataConfig
from sftdist.data import pipeline
from sftdist.data.demo import generate_demo_conversations, load_demo_tokenizer
from sftdist.data.pipeline import prepare, prepare_into
from sftdist.errors import ConfigError

TOKENIZER = load_demo_tokenizer()
TEMPLATE = TOKENIZER.chat_template
CONVS = generate_demo_conversations(240, seed=11)


def _lines() -> list[str]:
    """240 good records with, spread among them, bad ones of each stage (read, filter, encode) and duplicates."""
    lines = [json.dumps({"messages": c["messages"], "meta": c["meta"]}) for c in CONVS]
    for i in range(0, 240, 17):
        lines.insert(i, "{oops")  # read stage: invalid_json
        lines.insert(i + 3, lines[i + 5])  # read stage: exact_duplicate
        lines.insert(i + 7, json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}))
        too_long = [{"role": "user", "content": f"long {i} " * 400}, {"role": "assistant", "content": "ok"}]
        lines.insert(i + 9, json.dumps({"messages": too_long}))  # encode stage: too_long
    return lines


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(_lines()) + "\n")
    return path


def _rows(table) -> list:
    return [(r["input_ids"], r["labels"], r["source"], r["meta"], r["conv"]) for r in table]


def _config(path, tmp_path, **kwargs) -> DataConfig:
    return DataConfig(
        path=str(path), cache_dir=str(tmp_path / "cache"), max_length=256, max_rejected_fraction=1.0, **kwargs
    )


def _reaching_encoding(report: dict) -> int:
    """Records that passed reading and the filters that compare records (the rest never reach a chunk)."""
    return report.records_used + report.rejected.get("too_long", 0)


def _small_shards(monkeypatch, chunk: int = 7, shard_chunks: int = 3, first: int = 2) -> None:
    """Chunks of 2, 4, then 7 conversations, 3 chunks a shard (the first shard 13 conversations, then 21)."""
    monkeypatch.setattr(pipeline, "_FIRST_CHUNK", first)
    monkeypatch.setattr(pipeline, "_CHUNK", chunk)
    monkeypatch.setattr(pipeline, "_SHARD_CHUNKS", shard_chunks)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_many_small_shards_give_the_samples_and_report_of_one(data_file, tmp_path, monkeypatch, num_proc):
    one_table, one_report = prepare(_config(data_file, tmp_path, cache=False), TOKENIZER, TEMPLATE, 0)
    _small_shards(monkeypatch)
    table, report = prepare(_config(data_file, tmp_path, num_proc=num_proc), TOKENIZER, TEMPLATE, 0)
    (cached,) = [p for p in (tmp_path / "cache" / "prepared").iterdir() if p.is_dir()]
    files = json.loads((cached / "state.json").read_text())["_data_files"]
    assert len(files) == 1 + -(-(_reaching_encoding(report) - 13) // 21)  # 2 + 4 + 7, then three chunks of seven
    assert _rows(table) == _rows(one_table)
    assert report == one_report  # counts, examples (first five, in record order), tokens, ends, per source
    assert set(report.rejected) == {"invalid_json", "missing_field", "too_long"}
    assert report.filtered == {"exact_duplicate": 15}
    assert report.records_in == report.records_used + 15 + sum(report.rejected.values())
    # a saved dataset, memory-mapped: datasets itself reads the directory
    assert _rows(datasets.load_from_disk(str(cached))) == _rows(one_table)


def test_reading_never_runs_more_than_a_window_ahead_of_encoding(data_file, tmp_path, monkeypatch):
    """Workers encode in other processes while a thread of the pool reads: without the window, the reader would
    read the whole input into memory before the first chunk came back."""
    _small_shards(monkeypatch, chunk=5, shard_chunks=4)
    progresses, ahead = [], []

    class Watched(pipeline.ReadProgress):  # (reading happens in this process's main thread)
        def __init__(self, sources):
            super().__init__(sources)
            progresses.append(self)

    written = [0]
    real_record_batch = pipeline.record_batch

    def record_batch(encoded, keep, texts):
        written[0] += len(encoded["status"])  # records that reached encoding, this chunk's included
        ahead.append(progresses[0].records - written[0])
        return real_record_batch(encoded, keep, texts)

    monkeypatch.setattr(pipeline, "ReadProgress", Watched)
    monkeypatch.setattr(pipeline, "record_batch", record_batch)
    _, report = prepare(_config(data_file, tmp_path, num_proc=2, cache=False), TOKENIZER, TEMPLATE, 0)
    window_records = (2 * 2 + 1 + 1) * 5  # the chunks in flight and one being formed
    read_stage_left_out = report.records_in - _reaching_encoding(report)
    assert max(ahead) <= window_records + read_stage_left_out < report.records_in / 2


def test_a_stopped_preparation_continues_without_encoding_its_finished_shards(data_file, tmp_path, monkeypatch):
    _small_shards(monkeypatch)
    whole, whole_report = prepare(_config(data_file, tmp_path, cache=False), TOKENIZER, TEMPLATE, 0)
    out = tmp_path / "prepared"
    real_finish = pipeline.ShardWriter.finish

    def stop_after_three_shards(self, shard, summary):
        real_finish(self, shard, summary)
        if len(self.finished) == 3:
            raise KeyboardInterrupt  # Ctrl-C, or a preempted job

    with monkeypatch.context() as stopped:
        stopped.setattr(pipeline.ShardWriter, "finish", stop_after_three_shards)
        with pytest.raises(KeyboardInterrupt):
            prepare_into(_config(data_file, tmp_path, cache=False), TOKENIZER, TEMPLATE, 0, out)
    assert not out.exists() and len(list((tmp_path / "prepared.partial").glob("shard-*.json"))) == 3

    encoded = []
    real_encode = pipeline.encode_chunks

    def counting(chunks, *args):
        yield from real_encode((encoded.append(len(convs)) or (tag, convs) for tag, convs in chunks), *args)

    monkeypatch.setattr(pipeline, "encode_chunks", counting)
    report = prepare_into(_config(data_file, tmp_path, cache=False), TOKENIZER, TEMPLATE, 0, out)
    assert sum(encoded) == _reaching_encoding(report) - 13 - 2 * 21  # three shards: not encoded again
    assert report == whole_report
    assert _rows(datasets.load_from_disk(str(out))) == _rows(whole)
    assert not (tmp_path / "prepared.partial").exists()

    encoded.clear()  # the same data again: nothing to do
    assert prepare_into(_config(data_file, tmp_path, cache=False), TOKENIZER, TEMPLATE, 0, out) == report
    assert encoded == []


STOP_SCRIPT = """
import sys
from pathlib import Path
from sftdist.config import DataConfig
from sftdist.data import encode, pipeline, prepared
from sftdist.data.demo import load_demo_tokenizer

where = sys.argv[2]
def boom(*args, **kwargs):
    raise OSError(28, "No space left on device")
if where == "writer":  # the parent, mid-way (the pool busy, chunks in flight)
    real = prepared.ShardWriter.write
    calls = []
    def write(self, shard, batch):
        calls.append(1)
        if len(calls) == 3:
            boom()
        return real(self, shard, batch)
    pipeline.ShardWriter.write = write
elif where == "worker":  # a worker's encoding (forked: it sees this module's change)
    encode.encode_chunk = boom
pipeline._CHUNK = 5
tok = load_demo_tokenizer()
cfg = DataConfig(path=sys.argv[1], cache=False, max_length=256, num_proc=2, max_rejected_fraction=1.0)
pipeline.prepare_into(cfg, tok, tok.chat_template, 0, Path(sys.argv[3]))
"""


@pytest.mark.parametrize("where", ["writer", "worker"])
def test_an_error_on_either_side_of_the_pool_stops_the_preparation_at_once(data_file, tmp_path, where):
    """With encoding workers, an error in the parent (a full disk) or in a worker ends the run with that error:
    the pool is never left waiting on a reader blocked for room."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", STOP_SCRIPT, str(data_file), where, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "No space left on device" in proc.stderr


def test_unfinished_work_of_other_settings_is_not_continued(data_file, tmp_path, monkeypatch):
    _small_shards(monkeypatch)
    partial = tmp_path / "prepared.partial"
    partial.mkdir()
    (partial / "fingerprint").write_text("another configuration")  # or the same data cut into other shards
    (partial / "shard-00000.arrow").write_text("not this data")
    (partial / "shard-00000.json").write_text("{}")
    prepare_into(_config(data_file, tmp_path, cache=False), TOKENIZER, TEMPLATE, 0, tmp_path / "prepared")
    assert len(datasets.load_from_disk(str(tmp_path / "prepared"))) > 200


def test_a_directory_that_is_not_prepared_data_is_refused_before_any_work(data_file, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not a prepared-data directory: refusing to replace it"):
        prepare_into(_config(data_file, tmp_path), TOKENIZER, TEMPLATE, 0, tmp_path / "taken")
    assert not (tmp_path / "taken.partial").exists()


def test_progress_says_records_tokens_and_time_left(data_file, tmp_path, monkeypatch, caplog):
    _small_shards(monkeypatch)
    monkeypatch.setattr(pipeline, "_PROGRESS_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="sftdist.data.pipeline"):
        prepare(_config(data_file, tmp_path, cache=False), TOKENIZER, TEMPLATE, 0)
    lines = [r.getMessage() for r in caplog.records]
    running = [line for line in lines if "records read (" in line]
    assert running and all("records/s" in line and "tokens/s" in line and " left" in line for line in running)
    shares = [int(line.split("records read (")[1].split("%")[0]) for line in running]
    assert shares == sorted(shares) and shares[-1] >= 90
    assert any(line.startswith("data: prepared ") and "records/s" in line for line in lines)


def test_parquet_is_read_a_batch_at_a_time_with_every_row_named(tmp_path):
    rows = [{"messages": c["messages"]} for c in generate_demo_conversations(2500, seed=3)]
    rows[2100]["messages"] = [{"role": "robot", "content": "x"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet", row_group_size=700)
    _, report = prepare(
        DataConfig(path=str(tmp_path / "data.parquet"), cache=False, max_length=256), TOKENIZER, TEMPLATE, 0
    )
    assert report.records_in == 2500 and report.rejected == {"unknown_role": 1}
    assert report.examples["unknown_role"][0].startswith(f"{tmp_path / 'data.parquet'} row 2100")


def test_a_run_trains_from_a_sharded_cache(data_file, tmp_path, monkeypatch):
    from sftdist.training import Trainer

    _small_shards(monkeypatch)
    trainer = Trainer(
        compose(
            f"output_dir={tmp_path / 'run'}",
            f"data.path={data_file}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_length=256",
            "data.max_rejected_fraction=1.0",
            "train.max_steps=2",
            "eval.every_steps=0",
            "wandb.mode=disabled",
        )
    )
    fit_and_close(trainer)
    assert len(read_metrics(tmp_path / "run")) == 2
