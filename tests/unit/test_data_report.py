"""DataReport, the typed data_report.json: it writes the keys every earlier version wrote, in their order, and reads
back what it wrote; a report of another version is named, not a TypeError."""

from __future__ import annotations

import json

import pytest

from sftdist.data.report import DataReport
from sftdist.errors import DataError

# data_report.json's keys as written before the report was typed, in their order (a run with eval sets and a
# curriculum; decontamination absent)
WRITTEN = [
    "records_in", "records_used", "samples", "split_records", "extra_context_tokens", "rejected", "filtered",
    "examples", "truncated", "adaptations", "sources", "num_tokens", "num_supervised_tokens", "end_of_turn_ids",
    "template_hash", "chat_template_kwargs", "tokenizer_hash", "fingerprint", "settings", "records_train",
    "records_eval", "train_samples_per_epoch", "train_rows_hash", "eval_sources", "curriculum",
]  # fmt: skip


def _report() -> DataReport:
    return DataReport(
        records_in=5, records_used=4, samples=4, split_records=0, extra_context_tokens=0, rejected={"too_long": 1},
        filtered={}, examples={"too_long": ["a.jsonl line 3"]}, truncated={"records": 0, "tokens": 0},
        adaptations={}, sources={"a": {"records_in": 5}}, num_tokens=100, num_supervised_tokens=40,
        end_of_turn_ids={"2": 4}, template_hash="t", chat_template_kwargs={}, tokenizer_hash="k", fingerprint="f",
        settings={"max_length": 64}, records_train=3, records_eval=1, train_samples_per_epoch=3, train_rows_hash="r",
        eval_sources={"held": {"records_in": 2}}, curriculum={"train": {"easy": 3}},
    )  # fmt: skip


def test_the_json_has_the_keys_of_before_in_their_order_and_reads_back():
    report = _report()
    written = json.loads(json.dumps(report.to_json()))
    assert list(written) == WRITTEN
    assert DataReport.from_json(written) == report
    prepared_only = DataReport.from_json({k: v for k, v in written.items() if k not in WRITTEN[-6:]})
    assert prepared_only.records_train is None and "records_train" not in prepared_only.to_json()


def test_a_report_of_another_version_is_named_not_a_type_error():
    written = _report().to_json()
    del written["split_records"], written["samples"]
    with pytest.raises(DataError, match="without samples, split_records: written by another sftdist version"):
        DataReport.from_json(written)
