"""Records -> encoded samples -> (train, eval) split, with every record accounted for in a report.

Records in = records used for training + records held out for eval + records rejected (by reason).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from sftdist.config import DataConfig, EvalConfig
from sftdist.data.demo import generate_demo_conversations
from sftdist.data.sources import read_conversations
from sftdist.data.template import IGNORE_INDEX, encode_conversation
from sftdist.errors import DataError, InputError

_MAX_EXAMPLES = 5  # examples kept per rejection reason in the report


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids: the token itself where supervised, -100 elsewhere
    meta: dict[str, Any]

    @property
    def num_supervised(self) -> int:
        """Tokens that are next-token targets: the first token is never predicted."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def load_records(cfg: DataConfig, seed: int) -> list[dict]:
    """The configured records: the file at data.path, else the generated demo conversations."""
    if cfg.path is not None:
        return read_conversations(cfg.path, cfg.format)
    return generate_demo_conversations(cfg.demo_size, seed=seed)


def encode_records(records: list[dict], tokenizer: Any, chat_template: str | None,
                   max_length: int) -> tuple[list[Sample], dict]:
    """Encode every record; over-long ones and ones left with no supervised token are rejected and counted."""
    samples, rejected, examples = [], Counter(), {}
    num_tokens = num_supervised = 0
    for i, record in enumerate(records):
        where = record.get("where", f"record {i}")
        try:
            enc = encode_conversation(tokenizer, record["messages"], chat_template=chat_template,
                                      tools=record.get("tools"))
        except InputError as err:
            raise type(err)(f"{where}: {err}") from err
        reason = None
        if len(enc["input_ids"]) > max_length:
            reason = "too_long"
        elif all(label == IGNORE_INDEX for label in enc["labels"][1:]):
            reason = "no_supervised_tokens"
        if reason is not None:
            rejected[reason] += 1
            examples.setdefault(reason, [])
            if len(examples[reason]) < _MAX_EXAMPLES:
                examples[reason].append(f"{where} ({len(enc['input_ids'])} tokens)")
            continue
        sample = Sample(enc["input_ids"], enc["labels"], record.get("meta", {}))
        num_tokens += len(sample.input_ids)
        num_supervised += sample.num_supervised
        samples.append(sample)
    report = {
        "records_in": len(records),
        "records_encoded": len(samples),
        "rejected": dict(rejected),
        "rejected_examples": examples,
        "max_length": max_length,
        "num_tokens": num_tokens,
        "num_supervised_tokens": num_supervised,
    }
    return samples, report


def end_of_turn_ids(samples: list[Sample]) -> Counter:
    """How often each token id ends a supervised run (an assistant turn as the template closes it)."""
    ends: Counter = Counter()
    for s in samples:
        for i, label in enumerate(s.labels):
            if label != IGNORE_INDEX and (i + 1 == len(s.labels) or s.labels[i + 1] == IGNORE_INDEX):
                ends[label] += 1
    return ends


def split_holdout(samples: list[Sample], num_eval: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, eval): ``num_eval`` samples chosen by ``seed`` are held out; both keep file order."""
    if num_eval >= len(samples):
        raise DataError(
            f"eval.holdout_records={num_eval} leaves no training data: only {len(samples)} usable records; "
            "lower eval.holdout_records or set eval.every_steps=0"
        )
    held = set(np.random.default_rng([seed, 1]).permutation(len(samples))[:num_eval].tolist())
    train = [s for i, s in enumerate(samples) if i not in held]
    evals = [s for i, s in enumerate(samples) if i in held]
    return train, evals


def build_datasets(cfg: DataConfig, eval_cfg: EvalConfig, tokenizer: Any, chat_template: str | None,
                   seed: int) -> tuple[list[Sample], list[Sample], dict]:
    """(train samples, eval samples, report) for a run."""
    records = load_records(cfg, seed)
    samples, report = encode_records(records, tokenizer, chat_template, cfg.max_length)
    if not samples:
        raise DataError(f"no usable records: {report['rejected']} (examples: {report['rejected_examples']})")
    num_eval = eval_cfg.holdout_records if eval_cfg.every_steps > 0 else 0
    train, evals = split_holdout(samples, num_eval, seed) if num_eval else (samples, [])
    report.update(records_train=len(train), records_eval=len(evals))
    assert report["records_in"] == len(train) + len(evals) + sum(report["rejected"].values())
    return train, evals, report
