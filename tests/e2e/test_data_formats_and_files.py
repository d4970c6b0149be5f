"""The formats and files users bring (issues 15 and 25): typed content parts (text, reasoning, tool calls),
role/content and from/value keys either way, TRL's prompt/completion, a system field, a byte-order mark and CRLF,
compressed files, directories and globs of shards, a DatasetDict split; each gives the samples of the plain file, or
is refused naming the file."""

from __future__ import annotations

import gzip
import json

import pytest

from helpers import SHARED, TEST_DATA, compose, fit_and_close, read_metrics
from sftdist.config import DataConfig
from sftdist.data.demo import generate_demo_conversations, load_demo_tokenizer
from sftdist.data.pipeline import prepare
from sftdist.errors import DataError
from sftdist.training import Trainer

TOKENIZER = load_demo_tokenizer()
TEMPLATE = TOKENIZER.chat_template
CONVERSATIONS = [c["messages"] for c in generate_demo_conversations(60, seed=7)]


def _prepare(path, **data) -> tuple[list, dict]:
    data = {"max_length": 512, **data}
    table, report = prepare(DataConfig(path=str(path), cache=False, **data), TOKENIZER, TEMPLATE, 0)
    assert report.records_in == (report.records_used + sum(report.rejected.values()) + sum(report.filtered.values()))
    return [(table[i]["input_ids"], table[i]["labels"]) for i in range(len(table))], report


def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The samples of the plain messages file every other spelling must give."""
    path = tmp_path_factory.mktemp("ref") / "plain.jsonl"
    samples, report = _prepare(_jsonl(path, [{"messages": m} for m in CONVERSATIONS]))
    assert report.records_used == len(CONVERSATIONS)
    return samples


def _parts(text: str) -> list[dict]:
    """``text`` as OpenAI content parts, split in two."""
    half = len(text) // 2
    return [{"type": "text", "text": text[:half]}, {"type": "text", "text": text[half:]}]


def _prompt_completion(messages: list[dict]) -> dict:
    return {"prompt": messages[:-1], "completion": messages[-1:]}


SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}
SPELLINGS = {
    "content_parts": lambda m: {"messages": [{**t, "content": _parts(t["content"])} for t in m]},
    "messages_from_value": lambda m: {
        "messages": [{"from": SHAREGPT_ROLE[t["role"]], "value": t["content"]} for t in m]
    },
    "conversations_role_content": lambda m: {
        "conversations": [{"role": t["role"], "content": t["content"]} for t in m]
    },
    "system_field": lambda m: (
        {"system": m[0]["content"], "messages": m[1:]} if m[0]["role"] == "system" else {"messages": m}
    ),
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_each_spelling_of_a_conversation_gives_the_plain_file_s_samples(reference, tmp_path, spelling):
    path = _jsonl(tmp_path / "data.jsonl", [SPELLINGS[spelling](m) for m in CONVERSATIONS])
    samples, report = _prepare(path)
    assert report.rejected == {} and samples == reference, spelling


def test_prompt_completion_trains_the_completion_only(tmp_path):
    """TRL's conversational form: the prompt's own assistant turns are context, the completion is trained."""
    records = [_prompt_completion(m) for m in CONVERSATIONS]
    samples, report = _prepare(_jsonl(tmp_path / "pc.jsonl", records))
    assert report.records_used == len(CONVERSATIONS) and report.rejected == {}
    weighted = [
        {"messages": [*({**t, "weight": 0} if t["role"] == "assistant" else t for t in m[:-1]), m[-1]]}
        for m in CONVERSATIONS
    ]
    expected, _ = _prepare(_jsonl(tmp_path / "weighted.jsonl", weighted))
    assert samples == expected
    # the string form: one user turn, one trained answer
    strings = [{"prompt": "What is 2 + 2?", "completion": "4"}, {"prompt": "Name a colour.", "completion": "Red"}]
    (first, labels), *_ = _prepare(_jsonl(tmp_path / "strings.jsonl", strings))[0]
    trained = TOKENIZER.decode([t for t, label in zip(first, labels) if label != -100])
    assert trained.startswith("4") and "2 + 2" not in trained


@pytest.mark.parametrize(
    ("record", "reason", "detail"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "non_text_content",
            "messages[0].content[0] is a 'image_url' part",
        ),
        (
            {"system": "s", "messages": [{"role": "system", "content": "t"}, {"role": "user", "content": "u"}]},
            "two_system_prompts",
            "a 'system' field beside another system turn",
        ),
        ({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]}, "mixed_prompt_completion", "both"),
    ],
)
def test_what_cannot_be_used_is_rejected_under_its_own_reason(tmp_path, record, reason, detail):
    good = [_prompt_completion(m) if "prompt" in record else {"messages": m} for m in CONVERSATIONS[:30]]
    _, report = _prepare(_jsonl(tmp_path / "d.jsonl", [record, *good]), max_rejected_fraction=0.5)
    assert report.rejected == {reason: 1}
    (example,) = report.examples[reason]
    assert "d.jsonl line 1" in example and detail in example


def test_a_byte_order_mark_and_crlf_line_ends_lose_nothing(reference, tmp_path):
    lines = [json.dumps({"messages": m}) for m in CONVERSATIONS]
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    assert _prepare(path)[0] == reference
    (tmp_path / "windows.json").write_bytes(
        b"\xef\xbb\xbf" + json.dumps([{"messages": m} for m in CONVERSATIONS]).encode()
    )
    assert _prepare(tmp_path / "windows.json")[0] == reference


def test_compressed_files_shards_and_globs_read_as_one_source(reference, tmp_path):
    records = [json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS]
    with gzip.open(tmp_path / "all.jsonl.gz", "wt") as f:
        f.writelines(records)
    assert _prepare(tmp_path / "all.jsonl.gz")[0] == reference
    zstandard = pytest.importorskip("zstandard")
    (tmp_path / "all.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("".join(records).encode()))
    assert _prepare(tmp_path / "all.jsonl.zst")[0] == reference
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(3):  # train-00000.jsonl, train-00001.json.gz, train-00002.jsonl: sorted by name
        part = records[k * 20 : (k + 1) * 20]
        if k == 1:
            with gzip.open(shards / f"train-{k:05d}.json.gz", "wt") as f:
                json.dump([json.loads(r) for r in part], f)
        else:
            (shards / f"train-{k:05d}.jsonl").write_text("".join(part))
    (shards / "README.md").write_text("not data")
    for path in (shards, shards / "train-*"):  # (the directory's README.md is not a data file: left out)
        assert _prepare(path)[0] == reference
    _, report = _prepare(shards / "train-*", max_length=64, max_rejected_fraction=1.0)
    named = " ".join(report.examples["too_long"])  # each record still named by its file and line
    assert "train-00000.jsonl line 1" in named and report.sources["train"]["records_in"] == 60


def test_a_dataset_dict_split_is_chosen_by_data_split(reference, tmp_path):
    import datasets

    rows = [{"messages": m} for m in CONVERSATIONS]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:5]), "test": datasets.Dataset.from_list(rows)}
    ).save_to_disk(str(tmp_path / "dd"))
    assert _prepare(tmp_path / "dd", split="test")[0] == reference
    with pytest.raises(DataError, match="without the split 'validation' \\(it has train, test\\); set data.split"):
        _prepare(tmp_path / "dd", split="validation")
    from sftdist.training.evaluation import build_eval_sources  # an eval set from the same directory's test split

    sets, _ = build_eval_sources(
        compose(f"eval.sources=[{{path: {tmp_path / 'dd'}, split: test}}]"), TOKENIZER, TEMPLATE
    )
    assert len(sets["dd"]) == len(CONVERSATIONS)


def test_an_empty_file_and_a_glob_that_matches_nothing_are_named(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl is empty"):
        _prepare(tmp_path / "empty.jsonl")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="empty.json is empty"):
        _prepare(tmp_path / "empty.json")
    with pytest.raises(FileNotFoundError, match="data.path='.*nothing-\\*.jsonl': the pattern matches no file"):
        _prepare(tmp_path / "nothing-*.jsonl")


def test_a_glob_of_prompt_completion_shards_trains(tmp_path):
    for k in range(2):
        _jsonl(tmp_path / f"part-{k}.jsonl", [_prompt_completion(m) for m in CONVERSATIONS[k * 30 : (k + 1) * 30]])
    out = tmp_path / "run"
    overrides = (f"data.path={tmp_path / 'part-*.jsonl'}", "train.max_steps=2", "train.global_batch_size=8")
    fit_and_close(Trainer(compose(*overrides, "eval.every_steps=0", "wandb.mode=disabled", f"output_dir={out}")))
    report = json.loads((out / "data_report.json").read_text())
    assert report["records_in"] == report["records_used"] == 60 and report["sources"]["part"]["format"] == (
        "prompt_completion"
    )
    assert len(read_metrics(out)) == 2


# The samples the three shared data sets prepared to before issue 15's changes (demo tokenizer and template,
# max_length 2048, truncate): tests/data/shared_sample_hashes.json, written with the code of commit 0f6050d.
RECORDED = json.loads((TEST_DATA / "shared_sample_hashes.json").read_text())


@pytest.mark.skipif(not (SHARED / "data").is_dir(), reason="needs ../shared/data")
@pytest.mark.parametrize("name", sorted(RECORDED))
def test_the_shared_data_sets_give_the_samples_recorded_before(name):
    import hashlib

    cfg = DataConfig(path=str(SHARED / "data" / name), cache=False, max_length=2048, truncation="truncate")
    table, report = prepare(cfg, TOKENIZER, TEMPLATE, 0)
    whole, blocks, block = hashlib.sha256(), [], hashlib.sha256()
    for i in range(len(table)):
        row = table[i]
        digest = hashlib.sha256(json.dumps([row["input_ids"], row["labels"], row["source"]]).encode()).digest()
        whole.update(digest)
        block.update(digest)
        if (i + 1) % 1000 == 0:
            blocks.append(block.hexdigest()[:16])
            block = hashlib.sha256()
    blocks.append(block.hexdigest()[:16])
    recorded = RECORDED[name]
    assert (report.records_in, report.rejected, report.filtered) == (
        recorded["records_in"],
        recorded["rejected"],
        recorded["filtered"],
    )
    assert len(table) == recorded["rows"] and blocks == recorded["blocks_of_1000"]  # (the first block that differs)
    assert whole.hexdigest() == recorded["sha256"]


def test_either_spelling_keeps_everything_a_turn_says():
    """role/content turns in `conversations` keep their weight and tool calls; a from/value function_call in
    `messages` is a tool call, not text."""
    from sftdist.data.formats import normalise

    conv = normalise(
        {
            "conversations": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "draft", "weight": 0},
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": "a"},
            ]
        },
        "sharegpt",
    )
    assert conv["messages"][1] == {"role": "assistant", "content": "draft", "weight": 0}
    call = '{"name": "f", "arguments": {"x": 1}}'
    conv = normalise(
        {
            "messages": [
                {"from": "human", "value": "q"},
                {"from": "function_call", "value": call},
                {"from": "gpt", "value": "a"},
            ]
        },
        "messages",
    )
    assert conv["messages"][1]["tool_calls"] == [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]


def test_a_system_field_equal_to_the_system_turn_is_one_prompt_and_alpaca_keys_stay_alpaca():
    from sftdist.data.formats import detect_format, normalise

    record = {
        "system": "s",
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
        ],
    }
    assert [m["role"] for m in normalise(record, "messages")["messages"]] == ["system", "user", "assistant"]
    assert detect_format({"instruction": "i", "output": "o", "prompt": "p", "completion": "c"}) == "alpaca"
    assert normalise({"completion": "c", "prompt": None}, "prompt_completion").reason == "missing_field"
    assert normalise({"prompt": " ", "completion": "c"}, "prompt_completion").reason == "empty_prompt"


def test_directories_leave_out_hidden_folders_and_metadata_and_refuse_mixed_splits(reference, tmp_path):
    from sftdist.data.sources import source_files, source_name

    shards = tmp_path / "hub"
    (shards / ".ipynb_checkpoints").mkdir(parents=True)
    _jsonl(shards / "train-0.jsonl", [{"messages": m} for m in CONVERSATIONS])
    _jsonl(shards / ".ipynb_checkpoints" / "train-0.jsonl", [{"messages": m} for m in CONVERSATIONS[:3]])
    (shards / "dataset_infos.json").write_text("{}")
    assert source_files("data.path", str(shards)) == [shards / "train-0.jsonl"]
    assert _prepare(shards)[0] == reference
    _jsonl(shards / "test-0.jsonl", [{"messages": m} for m in CONVERSATIONS[:3]])
    with pytest.raises(DataError, match="holds the shards of several splits \\(test, train\\)"):
        _prepare(shards)
    assert _prepare(shards / "train-*")[0] == reference
    (shards / "train-1.jsonl").write_text("")
    with pytest.raises(DataError, match="train-1.jsonl is empty"):
        source_files("data.path", str(shards / "train-*"))
    assert [source_name(p) for p in ("data/train-*.parquet", "data/**/*.jsonl", "*.jsonl")] == ["train", "data", "data"]


QWEN3 = TEST_DATA / "chat_templates" / "qwen3.jinja"


def _qwen3():
    """A tokenizer that knows Qwen3's special tokens, with Qwen3's own template."""
    from helpers import tiny_tokenizer

    specials = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"]
    return tiny_tokenizer(specials, eos="<|im_end|>", template=QWEN3.read_text()), QWEN3.read_text()


def test_reasoning_and_tool_call_parts_render_where_qwen3_puts_them(tmp_path):
    """A multi-turn reasoning + tool-use file in typed content parts (LLaMA-Factory's `value` spelling) on Qwen3's own
    template: nothing rejected, the samples of the same conversations written with `reasoning_content` and
    `tool_calls`, every turn's think block and tool call trained once, where the template puts them (Qwen3 drops the
    reasoning of turns before the last user turn, so a record becomes one sample per user turn)."""
    tokenizer, template = _qwen3()
    call = {"name": "add", "arguments": {"a": 2, "b": 3}}
    typed, plain = [], []
    for i in range(12):
        question, thought = f"What is {i} + 3?", f"Add {i} and 3."
        typed_turns = [
            {"role": "user", "content": question},
            {
                "role": "assistant",
                "content": [{"type": "reasoning", "value": thought}, {"type": "tool_call", "value": json.dumps(call)}],
            },
            {"role": "tool", "content": "5"},
            {
                "role": "assistant",
                "content": [{"type": "reasoning", "text": "Read it."}, {"type": "text", "text": "5."}],
            },
            {"role": "user", "content": "Thanks, and times two?"},
            {
                "role": "assistant",
                "content": [{"type": "reasoning", "value": "Double."}, {"type": "text", "value": "10."}],
            },
        ]
        plain_turns = [
            typed_turns[0],
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": thought,
                "tool_calls": [{"type": "function", "function": call}],
            },
            typed_turns[2],
            {"role": "assistant", "content": "5.", "reasoning_content": "Read it."},
            typed_turns[4],
            {"role": "assistant", "content": "10.", "reasoning_content": "Double."},
        ]
        typed.append({"messages": typed_turns})
        plain.append({"messages": plain_turns})

    def samples(records, name):
        config = DataConfig(path=_jsonl(tmp_path / name, records), cache=False, max_length=512)
        config.filters.exact_dedup = False
        table, report = prepare(config, tokenizer, template, 0)
        assert report.rejected == {} and report.records_used == len(records), report.rejected
        assert report.split_records == len(records) and report.samples == 2 * len(records)
        return [(table[i]["input_ids"], table[i]["labels"]) for i in range(len(table))]

    ours = samples(typed, "typed.jsonl")
    assert ours == samples(plain, "plain.jsonl")
    trained = "".join(tokenizer.decode([t for t, y in zip(ids, labels) if y != -100]) for ids, labels in ours)
    assert trained.count("<|im_end|>") == 3 * 12 and trained.count("<think>\nAdd ") == 12
    assert trained.count("<think>\nRead it.\n</think>\n\n5.<|im_end|>") == 12
    assert trained.count("<think>\nDouble.\n</think>\n\n10.<|im_end|>") == 12
    assert trained.count('<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>') == 12
    assert "Thanks" not in trained and "What is" not in trained


def test_qwen3_without_thinking_keeps_the_empty_think_block_in_the_prompt(tmp_path):
    """Answers without reasoning on Qwen3: by default the template inserts an empty think block in the answer, which
    data.empty_think says to train or (the default) keep as context; with
    `data.chat_template_kwargs={enable_thinking: false}` the generation prompt holds it, as a server passing the same
    argument renders it, and the answer alone is trained whatever empty_think says."""
    tokenizer, template = _qwen3()
    firsts = [m[: next(i for i, t in enumerate(m) if t["role"] == "assistant") + 1] for m in CONVERSATIONS[:8]]
    path = _jsonl(tmp_path / "a.jsonl", [{"messages": m} for m in firsts])
    trained, texts = {}, {}
    for name, kwargs, empty_think in (
        ("default", {}, "mask"),
        ("train", {}, "train"),
        ("no_thinking", {"enable_thinking": False}, "mask"),
        ("no_thinking_train", {"enable_thinking": False}, "train"),
    ):
        config = DataConfig(
            path=path, cache=False, max_length=512, chat_template_kwargs=kwargs, empty_think=empty_think
        )
        table, report = prepare(config, tokenizer, template, 0)
        assert report.rejected == {} and report.chat_template_kwargs == kwargs
        rows = [(table[i]["input_ids"], table[i]["labels"]) for i in range(len(table))]
        trained[name] = [tokenizer.decode([t for t, y in zip(ids, labels) if y != -100]) for ids, labels in rows]
        texts[name] = [tokenizer.decode(ids) for ids, _ in rows]
        prompts = [tokenizer.decode(ids[: labels.index(next(y for y in labels if y != -100))]) for ids, labels in rows]
    answers = [f"{m[-1]['content']}<|im_end|>" for m in firsts]
    assert trained["default"] == answers and texts["default"] == texts["train"]  # (the same tokens, fewer trained)
    assert trained["train"] == [f"<think>\n\n</think>\n\n{a}" for a in answers]
    assert trained["no_thinking"] == trained["no_thinking_train"] == answers
    assert all(p.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") for p in prompts)  # (the last loop's)
    # an answer with reasoning cannot be served so: the prompt closes the think block the answer would fill
    question, answer = {"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "#### 2"}
    reasoned = [{"messages": [question, {**answer, "reasoning_content": "Think first."}]}]
    config = DataConfig(
        path=_jsonl(tmp_path / "r.jsonl", reasoned + [{"messages": m} for m in firsts]),
        cache=False,
        max_length=512,
        chat_template_kwargs={"enable_thinking": False},
        max_rejected_fraction=0.5,
    )
    _, report = prepare(config, tokenizer, template, 0)
    assert report.rejected == {"not_servable": 1} and report.records_used == len(firsts)


def test_reasoning_a_template_does_not_render_is_counted_and_said(reference, tmp_path, caplog):
    """The demo's ChatML template renders no reasoning: records that carry it give the plain samples, counted as
    reasoning_dropped and said in the log, so nobody believes their reasoning traces were trained."""
    records = [{"messages": [*m[:-1], {**m[-1], "reasoning_content": "Step by step."}]} for m in CONVERSATIONS]
    with caplog.at_level("WARNING"):
        samples, report = _prepare(_jsonl(tmp_path / "r.jsonl", records))
    assert samples == reference and report.adaptations == {"reasoning_dropped": len(CONVERSATIONS)}
    assert f"{len(CONVERSATIONS)} records carry reasoning that the chat template does not render" in caplog.text
