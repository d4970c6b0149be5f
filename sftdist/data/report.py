"""What a preparation read, kept, rejected, filtered and truncated: counted as it goes (``Tally``), and said as a
typed ``DataReport``, whose JSON is a run's ``data_report.json`` and a prepared directory's manifest report.

    records_in = records_used + sum(rejected.values()) + sum(filtered.values())
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from sftdist.config import DataConfig
from sftdist.data.filters import RecordFilter
from sftdist.data.prepared import tokenizer_hash
from sftdist.data.sources import Source
from sftdist.data.template import template_hash
from sftdist.errors import DataError

log = logging.getLogger(__name__)
_MAX_EXAMPLES = 5  # examples kept per reason in the report


@dataclass
class DataReport:
    """data_report.json, typed. The preparation fills the first part; a run adds its split (``build_datasets``), its
    extra eval sets' reports and its curriculum's. Fields that are None are not written."""

    records_in: int
    records_used: int
    # Records whose template rewrites history become several serving-exact samples: how many, and the context
    # tokens their extra samples repeat (all of them but the longest one's)
    samples: int
    split_records: int
    extra_context_tokens: int
    rejected: dict[str, int]  # reason -> records, most common first
    filtered: dict[str, int]  # filter -> records
    examples: dict[str, list[str]]  # reason -> the first few records, named by file and line
    truncated: dict[str, int]  # {"records", "tokens"}
    adaptations: dict[str, int]  # what was adapted to the template -> records
    sources: dict[str, dict[str, Any]]  # per source: path, format, weight, the counts above, tokens
    num_tokens: int
    num_supervised_tokens: int
    end_of_turn_ids: dict[str, int]  # the token ids that end trained turns -> how often
    template_hash: str
    chat_template_kwargs: dict[str, Any]
    tokenizer_hash: str
    fingerprint: str
    settings: dict[str, Any]
    decontamination: dict[str, Any] | None = None
    # the run's split of the prepared records (sftdist.data.dataset.build_datasets)
    records_train: int | None = None
    records_eval: int | None = None
    train_samples_per_epoch: int | None = None
    train_rows_hash: str | None = None  # what the sample stream draws from: a resume must draw from the same rows
    eval_sources: dict[str, dict[str, Any]] | None = None  # eval.sources: each one's report
    curriculum: dict[str, Any] | None = None  # the difficulty buckets' report

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DataReport:
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in raw and f.default is dataclasses.MISSING]
        if missing:
            raise DataError(
                f"a data report without {', '.join(missing)}: written by another sftdist version; "
                "prepare the data again"
            )
        return cls(**{f.name: raw[f.name] for f in fields if f.name in raw})


class Tally:
    """Counts per reason, with the first few records named, per source, and the figures of the records used. The
    reading keeps one, each shard another (saved beside it, so that a continued preparation adds up the same);
    merged in record order, they are the report's."""

    def __init__(self):
        self.counts: dict[str, Counter] = {"rejected": Counter(), "filtered": Counter()}
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.by_source: dict[str, Counter] = defaultdict(Counter)  # records_in, rejected, filtered, used, tokens, ...
        self.formats: dict[str, str | None] = {}
        self.reasons_by_source: dict[str, Counter] = defaultdict(Counter)
        self.used = Counter()  # truncated_records, truncated_tokens
        self.adaptations = Counter()
        self.ends = Counter()  # the token ids that end trained turns

    def add(self, kind: str, reason: str, where: str, detail: str, source: str) -> None:
        self.counts[kind][reason] += 1
        self.by_source[source][kind] += 1
        self.reasons_by_source[source][reason] += 1
        if len(self.examples[reason]) < _MAX_EXAMPLES:
            self.examples[reason].append(f"{where}: {detail}" if detail else where)

    def merge(self, other: Tally) -> None:
        for kind, counts in other.counts.items():
            self.counts[kind].update(counts)
        for reason, examples in other.examples.items():
            self.examples[reason] = (self.examples[reason] + examples)[:_MAX_EXAMPLES]
        for name, counts in other.by_source.items():
            self.by_source[name].update(counts)
        for name, counts in other.reasons_by_source.items():
            self.reasons_by_source[name].update(counts)
        self.formats.update(other.formats)
        self.used.update(other.used)
        self.adaptations.update(other.adaptations)
        self.ends.update(other.ends)

    def to_json(self) -> dict:
        return {**vars(self), "ends": {str(k): v for k, v in self.ends.items()}}

    @classmethod
    def from_json(cls, saved: dict) -> Tally:
        tally = cls()
        tally.counts = {kind: Counter(c) for kind, c in saved["counts"].items()}
        tally.examples = defaultdict(list, saved["examples"])
        for name in ("by_source", "reasons_by_source"):
            setattr(tally, name, defaultdict(Counter, {k: Counter(v) for k, v in saved[name].items()}))
        tally.formats = saved["formats"]
        tally.used, tally.adaptations = Counter(saved["used"]), Counter(saved["adaptations"])
        tally.ends = Counter({int(k): v for k, v in saved["ends"].items()})
        return tally


def build_report(
    cfg: DataConfig,
    sources: list[Source],
    tally: Tally,
    digest: str,
    tokenizer: Any,
    template: str,
    record_filter: RecordFilter,
) -> DataReport:
    """The report of a finished preparation, from its merged tally."""
    per_source: dict[str, dict] = {}
    for s in sources:
        c = tally.by_source[s.name]
        per_source[s.name] = {
            "path": s.path,
            "format": tally.formats.get(s.name),
            "weight": s.weight,
            "records_in": c["records_in"],
            "records_used": c["used"],
            "rejected": c["rejected"],
            "filtered": c["filtered"],
            "reasons": dict(tally.reasons_by_source[s.name].most_common()),
            "samples": c["samples"],
            "split_records": c["split"],
            "extra_context_tokens": c["extra_context"],
            "num_tokens": c["tokens"],
            "num_supervised_tokens": c["supervised"],
            "supervised_fraction": round(c["supervised"] / max(1, c["tokens"]), 4),
        }
    records_in = sum(c["records_in"] for c in tally.by_source.values())
    report = DataReport(
        records_in=records_in,
        records_used=sum(c["used"] for c in tally.by_source.values()),
        samples=sum(c["samples"] for c in tally.by_source.values()),
        split_records=sum(c["split"] for c in tally.by_source.values()),
        extra_context_tokens=sum(c["extra_context"] for c in tally.by_source.values()),
        rejected=dict(tally.counts["rejected"].most_common()),
        filtered=dict(tally.counts["filtered"].most_common()),
        examples=dict(tally.examples),
        truncated={"records": tally.used["truncated_records"], "tokens": tally.used["truncated_tokens"]},
        adaptations=dict(tally.adaptations),
        sources=per_source,
        num_tokens=sum(c["tokens"] for c in tally.by_source.values()),
        num_supervised_tokens=sum(c["supervised"] for c in tally.by_source.values()),
        end_of_turn_ids={str(k): v for k, v in tally.ends.most_common()},
        template_hash=template_hash(template),
        chat_template_kwargs=dict(cfg.chat_template_kwargs),
        tokenizer_hash=tokenizer_hash(tokenizer),
        fingerprint=digest,
        settings={
            "max_length": cfg.max_length,
            "truncation": cfg.truncation,
            "empty_think": cfg.empty_think,
            "max_rejected_fraction": cfg.max_rejected_fraction,
        },
    )
    if record_filter.decontaminator is not None:
        report.decontamination = {
            "eval_file": cfg.filters.decontaminate,
            "ngram": cfg.filters.decontaminate_ngram,
            "eval_items_too_short": record_filter.decontaminator.num_too_short,
        }
    assert records_in == report.records_used + sum(report.rejected.values()) + sum(report.filtered.values())
    return report


def check_rejections(rejected: dict[str, int], examples: dict[str, list[str]], records_in: int, limit: float) -> None:
    """Stop when more than ``limit`` of the records were rejected, naming reasons and the first records."""
    total = sum(rejected.values())
    if records_in and total / records_in > limit:
        reasons = "; ".join(
            f"{reason}: {n} (first: {', '.join(e.split(': ')[0] for e in examples[reason][:3])})"
            for reason, n in Counter(rejected).most_common()
        )
        hint = (
            " Over-long records: raise data.max_length or set data.truncation=truncate."
            if "too_long" in rejected
            else ""
        )
        raise DataError(
            f"{total} of {records_in} records ({100 * total / records_in:.1f}%) were rejected, more than "
            f"data.max_rejected_fraction={limit}: {reasons}.{hint} sftdist-inspect shows the reasons "
            "in full; raise data.max_rejected_fraction to train on the rest anyway"
        )


def log_notes(report: DataReport) -> DataReport:
    """The report, after saying in the log what it holds that the user did not ask for: conversations the template
    renders differently from a server (several samples each, at a cost in context tokens), reasoning not trained."""
    for name, source in report.sources.items():
        if source.get("split_records"):
            log.info(
                "data: %s: the chat template renders %d of %d records differently from what a server renders at an "
                "earlier turn: they became %d serving-exact samples, repeating %d context tokens (%.1f%% of %d)",
                name,
                source["split_records"],
                source["records_used"],
                source["samples"] - (source["records_used"] - source["split_records"]),
                source["extra_context_tokens"],
                100 * source["extra_context_tokens"] / max(1, source["num_tokens"]),
                source["num_tokens"],
            )
    dropped = report.adaptations.get("reasoning_dropped")
    if dropped:
        log.warning(
            "data: %d records carry reasoning that the chat template does not render: it is not trained "
            "(reasoning_dropped; a template that renders reasoning_content trains it)",
            dropped,
        )
    return report


def with_threshold(report: DataReport, cfg: DataConfig) -> DataReport:
    """A report read back, checked against this run's data.max_rejected_fraction (not the writer's)."""
    check_rejections(report.rejected, report.examples, report.records_in, cfg.max_rejected_fraction)
    return dataclasses.replace(report, settings={**report.settings, "max_rejected_fraction": cfg.max_rejected_fraction})
