"""The data pipeline end to end: every record accounted for, bad data reported or stopped, truncation,
caching, parallel encoding, prepared directories and weighted sources."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import SHARED, compose, read_metrics
from sftdist.config import DataConfig, EvalConfig, FiltersConfig, SourceConfig
from sftdist.data.dataset import build_datasets, mixing_weights
from sftdist.data.demo import generate_demo_conversations, load_demo_tokenizer
from sftdist.data.pipeline import prepare
from sftdist.errors import ConfigError, DataError
from sftdist.run.lock import RunLock
from sftdist.training import Trainer

TOKENIZER = load_demo_tokenizer()
TEMPLATE = TOKENIZER.chat_template
GOOD = [json.dumps({"messages": r["messages"], "meta": r["meta"]}) for r in generate_demo_conversations(200, seed=5)]
BAD = {  # line -> the reason it must be counted under
    "invalid_json": "{oops",
    "unknown_role": json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
    "no_assistant_turn": json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
    "missing_field": json.dumps({"text": "not a conversation"}),
    "too_long": json.dumps(
        {"messages": [{"role": "user", "content": "long " * 400}, {"role": "assistant", "content": "ok"}]}
    ),
}


def _prepare(lines, tmp_path, **data):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(path=str(path), cache=False, max_length=256, **data)
    return prepare(cfg, TOKENIZER, TEMPLATE, seed=0)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    picks=st.lists(st.sampled_from(["good", "duplicate", *BAD]), min_size=1, max_size=25),
    good_start=st.integers(0, 150),
)
def test_every_record_is_used_rejected_or_filtered(tmp_path, picks, good_start):
    lines, expected, good = [], {}, iter(GOOD[good_start:])
    first_good = next(good)
    for i, kind in enumerate(picks + ["good"]):  # at least one usable record
        if kind == "good":
            lines.append(next(good))
        elif kind == "duplicate":
            lines.append(first_good)
            expected["exact_duplicate"] = expected.get("exact_duplicate", 0) + 1
        else:  # over-long records are valid conversations: distinct, or dedup would count the repeats
            lines.append(BAD[kind].replace("long ", f"long{i} ", 1))
            expected[kind] = expected.get(kind, 0) + 1
    lines.insert(0, first_good)
    _, report = _prepare(lines, tmp_path, max_rejected_fraction=1.0)
    assert report.records_in == len(lines)
    assert report.records_in == (report.records_used + sum(report.rejected.values()) + sum(report.filtered.values()))
    assert {**report.rejected, **report.filtered} == expected
    assert report.records_used == picks.count("good") + 2


def test_a_few_bad_records_train_and_are_reported(tmp_path):
    lines = GOOD[:100] + [BAD["invalid_json"], BAD["unknown_role"]]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    with Trainer(
        compose(
            f"output_dir={out}",
            f"data.path={tmp_path / 'chat.jsonl'}",
            "train.max_steps=2",
            "eval.every_steps=0",
            "wandb.mode=disabled",
        )
    ) as trainer:
        trainer.fit()
    report = json.loads((out / "data_report.json").read_text())
    assert report["rejected"] == {"invalid_json": 1, "unknown_role": 1}
    assert report["examples"]["invalid_json"][0].startswith(f"{tmp_path / 'chat.jsonl'} line 101: invalid JSON")
    assert report["examples"]["unknown_role"][0].startswith(f"{tmp_path / 'chat.jsonl'} line 102: messages[0].role")
    assert len(read_metrics(out)) == 2


def test_mostly_bad_data_stops_naming_reasons_and_lines(tmp_path):
    lines = GOOD[:3] + [BAD["invalid_json"]] * 4 + [BAD["unknown_role"]] * 2
    with pytest.raises(DataError) as info:
        _prepare(lines, tmp_path)
    message = str(info.value)
    assert "6 of 9 records (66.7%) were rejected, more than data.max_rejected_fraction=0.05" in message
    assert "invalid_json: 4 (first: " in message and "data.jsonl line 4, " in message and "line 5" in message
    assert "unknown_role: 2 (first: " in message and "line 8" in message


def _multi_turn(n_turns: int, answer_words: int) -> str:
    messages = []
    for t in range(n_turns):
        messages += [
            {"role": "user", "content": f"question {t}"},
            {"role": "assistant", "content": " ".join(f"w{t}x{k}" for k in range(answer_words))},
        ]
    return json.dumps({"messages": messages})


def test_truncation_keeps_whole_turns_and_counts_what_it_cuts(tmp_path):
    long_prompt = json.dumps(
        {
            "messages": [
                {"role": "user", "content": " ".join(f"q{k}" for k in range(300))},
                {"role": "assistant", "content": "fine"},
            ]
        }
    )
    lines = [_multi_turn(3, 16), _multi_turn(1, 400), long_prompt]  # turns of ~100 tokens; max_length 256
    table, report = _prepare(lines, tmp_path, truncation="truncate", max_rejected_fraction=1.0)
    assert report.rejected == {"truncated_to_nothing": 1} and report.truncated["records"] == 2
    whole_turns, cut_answer = list(table)
    assert whole_turns["labels"][-1] == TOKENIZER.convert_tokens_to_ids("<|im_end|>")
    decoded = TOKENIZER.decode(whole_turns["input_ids"])
    assert decoded.count("<|im_start|>assistant") == 2 and decoded.endswith("<|im_end|>")  # 2 whole turns of 3
    assert cut_answer["length"] == 256 and cut_answer["num_supervised"] > 0  # no turn fits whole: cut at 256
    full = [
        len(
            TOKENIZER(
                TOKENIZER.apply_chat_template(json.loads(line)["messages"], tokenize=False), add_special_tokens=False
            )["input_ids"]
        )
        for line in lines[:2]
    ]
    assert report.truncated["tokens"] == full[0] - whole_turns["length"] + full[1] - 256
    _, dropped = _prepare(lines + [GOOD[0]], tmp_path, truncation="drop", max_rejected_fraction=1.0)
    assert dropped.rejected == {"too_long": 3} and dropped.records_used == 1
    with pytest.raises(DataError, match="no usable records: rejected {'too_long': 3}"):
        _prepare(lines, tmp_path, truncation="drop", max_rejected_fraction=1.0)


def test_the_cache_is_keyed_by_content_and_parallel_encoding_is_identical(tmp_path, caplog):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(GOOD) + "\n")
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), max_length=256, num_proc=1)
    first, report = prepare(cfg, TOKENIZER, TEMPLATE, seed=0)
    with caplog.at_level("INFO"):
        again, report_again = prepare(cfg, TOKENIZER, TEMPLATE, seed=0)
    assert "from the cache" in caplog.text and report_again == report
    parallel, _ = prepare(DataConfig(**{**cfg.__dict__, "num_proc": 2, "cache": False}), TOKENIZER, TEMPLATE, seed=0)
    assert first["input_ids"] == again["input_ids"] == parallel["input_ids"]
    assert first["labels"] == parallel["labels"]
    path.write_text("\n".join(GOOD[:-1]) + "\n")  # new content, new fingerprint
    _, changed = prepare(cfg, TOKENIZER, TEMPLATE, seed=0)
    assert changed.fingerprint != report.fingerprint and changed.records_in == len(GOOD) - 1


def test_weighted_sources_and_a_holdout_that_never_trains(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(GOOD[:40]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(GOOD[40:80]) + "\n")
    cfg = DataConfig(
        sources=[
            SourceConfig(path=str(tmp_path / "a.jsonl"), weight=2.0),
            SourceConfig(path=str(tmp_path / "b.jsonl"), weight=0.5),
        ],
        cache=False,
    )
    train, evals, report = build_datasets(cfg, EvalConfig(every_steps=10, holdout_records=10), TOKENIZER, TEMPLATE, 0)
    names = np.asarray(train.table["source"])
    a_rows = [r for r in train.rows if names[r] == "a"]
    b_rows = [r for r in train.rows if names[r] == "b"]
    a_unique, b_unique = len(set(a_rows)), len(set(b_rows))
    assert len(a_rows) == 2 * a_unique and a_unique + b_unique + 10 <= 80
    assert len(b_rows) == round(0.5 * (80 - 10 - a_unique))
    assert not set(train.rows) & set(evals.rows)
    assert report.train_samples_per_epoch == len(train.rows) and report.records_eval == 10
    assert train[0].meta["difficulty"] in ("easy", "medium", "hard")  # meta is carried through


def test_mixing_weights_follow_the_temperature_and_keep_the_epochs_size():
    records, weights = {"big": 1000, "small": 10}, {"big": 1.0, "small": 1.0}
    assert mixing_weights(weights, records, 1.0) == weights  # today's proportions, untouched
    for t in (2.0, 4.0):
        applied = mixing_weights(weights, records, t)
        drawn = {k: applied[k] * n for k, n in records.items()}
        assert sum(drawn.values()) == pytest.approx(1010)
        assert drawn["small"] / drawn["big"] == pytest.approx((10 / 1000) ** (1 / t))
    both = mixing_weights({"big": 1.0, "small": 3.0}, records, 2.0)  # explicit weights multiply
    assert both["small"] * 10 / (both["big"] * 1000) == pytest.approx(3 * (10 / 1000) ** 0.5)


def test_temperature_mixing_lifts_a_rare_source_to_its_share_per_step(tmp_path):
    """Two sources of 1,000 and 10 records, data.mixing_temperature=2: over 100 steps the rare source's share of the
    stream is n ** (1/2)'s within one sample per step; data_report.json and each step's metrics say the mixture."""
    for name, n, seed in (("big", 1000, 21), ("small", 10, 22)):
        convs = generate_demo_conversations(n, seed=seed)
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
    cfg = compose(
        f"data.sources=[{{path: {tmp_path / 'big.jsonl'}}}, {{path: {tmp_path / 'small.jsonl'}}}]",
        "data.mixing_temperature=2", "train.max_steps=100", "train.stop_after_step=2", "train.global_batch_size=16",
        "eval.every_steps=0", "wandb.mode=disabled", f"data.cache_dir={tmp_path / 'cache'}",
        f"output_dir={tmp_path / 'run'}",
    )  # fmt: skip
    with Trainer(cfg) as trainer:
        n = {k: s["records_used"] for k, s in trainer.data_report.sources.items()}
        share = n["small"] ** 0.5 / (n["big"] ** 0.5 + n["small"] ** 0.5)
        names = trainer.train_set.source_names()
        drawn = [int((names[trainer.sampler.indices(step)] == "small").sum()) for step in range(100)]
        assert abs(sum(drawn) - share * 100 * 16) <= 100
        assert trainer.data_report.sources["small"]["train_share"] == pytest.approx(share, abs=1 / len(names))
        trainer.fit()
    assert [m["data/source/small"] * 16 for m in read_metrics(tmp_path / "run")] == drawn[:2]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["sources"]["small"]["mixing_weight"] > 9 * report["sources"]["big"]["mixing_weight"]
    assert report["sources"]["small"]["train_samples"] + report["sources"]["big"]["train_samples"] == len(names)


def test_filters_are_counted_in_the_report(tmp_path):
    eval_file = tmp_path / "eval.jsonl"
    contaminated = generate_demo_conversations(300, seed=5)[150]
    eval_file.write_text(
        json.dumps(
            {
                "instruction": contaminated["messages"][-2]["content"] + " " + contaminated["messages"][-1]["content"],
                "output": "x",
            }
        )
        + "\n"
    )
    _, report = _prepare(
        GOOD[:200], tmp_path, filters=FiltersConfig(decontaminate=str(eval_file), decontaminate_ngram=8)
    )
    assert report.filtered.get("contaminated", 0) >= 1
    assert report.decontamination["eval_file"] == str(eval_file)


def _sftdist(cmd: str, *args: str, cwd) -> subprocess.CompletedProcess:
    exe = shutil.which(cmd, path=str(sys.executable).rsplit("/", 1)[0])
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_a_second_preparation_into_the_same_directory_is_refused_naming_the_first(tmp_path):
    """sftdist-prepare holds a lock beside its output_dir (the directory is moved into place whole): while another
    process holds it, a preparation stops in one line naming it, exit 2, and writes nothing."""
    (tmp_path / "chat.jsonl").write_text("\n".join(GOOD[:20]) + "\n")
    prepared = tmp_path / "prepared"
    first = RunLock(prepared, path=tmp_path / "prepared.lock", holder="the preparation")
    first.acquire()  # (an open file of this process: the other process is refused as by another preparation)
    try:
        proc = _sftdist(
            "sftdist-prepare", f"output_dir={prepared}", f"data.path={tmp_path / 'chat.jsonl'}", cwd=tmp_path
        )
    finally:
        first.release()
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith(
        f"sftdist-prepare: error: output_dir='{prepared}' is in use by the preparation of process {os.getpid()} on "
    )
    assert not prepared.exists()
    again = _sftdist("sftdist-prepare", f"output_dir={prepared}", f"data.path={tmp_path / 'chat.jsonl'}", cwd=tmp_path)
    assert again.returncode == 0 and (prepared / "data_report.json").is_file(), again.stderr[-2000:]


def test_prepare_once_then_train_and_inspect_the_prepared_directory(tmp_path):
    (tmp_path / "chat.jsonl").write_text("\n".join(GOOD) + "\n")
    prepared = tmp_path / "prepared"
    proc = _sftdist("sftdist-prepare", f"output_dir={prepared}", f"data.path={tmp_path / 'chat.jsonl'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (prepared / "data_report.json").is_file() and (prepared / "tokenizer" / "tokenizer.json").is_file()

    with Trainer(
        compose(
            f"output_dir={tmp_path / 'run'}",
            f"data.prepared={prepared}",
            "train.max_steps=2",
            "eval.every_steps=0",
            "wandb.mode=disabled",
        )
    ) as trainer:
        trainer.fit()
    assert len(read_metrics(tmp_path / "run")) == 2

    with pytest.raises(ConfigError, match="rendered with another chat template"):
        (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")
        Trainer(
            compose(
                f"output_dir={tmp_path / 'x'}",
                f"data.prepared={prepared}",
                f"data.chat_template={tmp_path / 't.jinja'}",
                "wandb.mode=disabled",
            )
        )
    with pytest.raises(ConfigError, match=r"rendered with data.chat_template_kwargs=\{\}, this run's are \{'x': 1\}"):
        Trainer(
            compose(f"output_dir={tmp_path / 'y'}", f"data.prepared={prepared}", "data.chat_template_kwargs={x: 1}")
        )
    with pytest.raises(ConfigError, match="set one of data.path, data.sources and data.prepared"):
        compose(f"data.prepared={prepared}", f"data.path={tmp_path / 'chat.jsonl'}")

    shown = _sftdist("sftdist-inspect", str(prepared), "--samples", "1", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "records in 200, used 200" in shown.stdout and "[[" in shown.stdout
    assert "assistant" in shown.stdout and "user " in shown.stdout
    as_override = _sftdist("sftdist-inspect", f"data.prepared={prepared}", "--samples", "1", cwd=tmp_path)
    assert as_override.returncode == 0, as_override.stderr[-2000:]
    assert "records in 200, used 200" in as_override.stdout
    missing = _sftdist("sftdist-inspect", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode == 2 and "is not a prepared-data directory" in missing.stderr


@pytest.mark.parametrize(
    "name,fmt",
    [
        ("alpaca_en_demo.json", "alpaca"),
        ("glaive_toolcall_en_demo.json", "sharegpt"),
        ("gsm8k_train_alpaca.json", "alpaca"),
    ],
)
def test_the_shared_data_sets_prepare(name, fmt):
    path = SHARED / "data" / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared data is not part of the project)")
    cfg = DataConfig(path=str(path), cache=False, max_length=4096, truncation="truncate")
    table, report = prepare(cfg, TOKENIZER, TEMPLATE, seed=0)
    assert report.sources[path.name.split(".")[0]]["format"] == fmt
    assert sum(report.rejected.values()) <= 0.01 * report.records_in
    assert report.records_used == len(table) > 0.8 * report.records_in


def test_inspect_shows_every_rejection_where_training_would_stop(tmp_path):
    lines = GOOD[:3] + [BAD["invalid_json"]] * 4
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    shown = _sftdist(
        "sftdist-inspect", f"data.path={tmp_path / 'chat.jsonl'}", "--samples", "1", "--color", "never", cwd=tmp_path
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "rejected invalid_json: 4" in shown.stdout and "chat.jsonl line 4: invalid JSON" in shown.stdout
    bad = _sftdist("sftdist-inspect", "data.foo=1", cwd=tmp_path)
    assert bad.returncode == 2 and "sftdist-inspect: config error" in bad.stderr


def test_a_cache_written_with_a_lax_threshold_still_stops_a_strict_run(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(GOOD[:3] + [BAD["invalid_json"]] * 4) + "\n")
    lax = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), max_length=256, max_rejected_fraction=1.0)
    _, report = prepare(lax, TOKENIZER, TEMPLATE, seed=0)  # e.g. sftdist-inspect, which shows every rejection
    assert report.rejected == {"invalid_json": 4}
    strict = DataConfig(**{**lax.__dict__, "max_rejected_fraction": 0.05})
    with pytest.raises(DataError, match=r"4 of 7 records .* invalid_json: 4 \(first: .*data.jsonl line 4"):
        prepare(strict, TOKENIZER, TEMPLATE, seed=0)


def test_source_weights_are_this_runs_even_from_the_cache(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(GOOD[:40]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(GOOD[40:80]) + "\n")

    def rows(weight_a):
        cfg = DataConfig(
            sources=[
                SourceConfig(path=str(tmp_path / "a.jsonl"), weight=weight_a),
                SourceConfig(path=str(tmp_path / "b.jsonl"), weight=1.0),
            ],
            cache_dir=str(tmp_path / "cache"),
        )
        train, _, report = build_datasets(cfg, EvalConfig(every_steps=0), TOKENIZER, TEMPLATE, 0)
        names = np.asarray(train.table["source"])
        return sum(names[r] == "a" for r in train.rows), report

    once, report = rows(1.0)
    thrice, report_cached = rows(3.0)  # same fingerprint: the cache is hit
    assert report_cached.fingerprint == report.fingerprint
    assert (once, thrice) == (40, 120) and report_cached.sources["a"]["weight"] == 3.0
