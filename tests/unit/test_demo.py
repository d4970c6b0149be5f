"""The embedded demo: deterministic data in three buckets with checkable answers, and its tokenizer."""

from __future__ import annotations

import json
import re
from collections import Counter

from sftdist.data.demo import (
    ANSWER_PREFIX,
    DEMO_CHAT_TEMPLATE,
    DEMO_TOKENIZER_DIR,
    DIFFICULTIES,
    generate_demo_conversations,
    train_demo_tokenizer,
)

STEP = re.compile(r"^(-?\d+) ([-+*]) (-?\d+) = (-?\d+)$")


def test_demo_data_is_a_pure_function_of_the_seed():
    assert generate_demo_conversations(50, seed=3) == generate_demo_conversations(50, seed=3)
    assert generate_demo_conversations(50, seed=3) != generate_demo_conversations(50, seed=4)


def test_demo_buckets_are_balanced_and_labelled():
    records = generate_demo_conversations(3000, seed=0)
    counts = Counter(r["meta"]["difficulty"] for r in records)
    assert set(counts) == set(DIFFICULTIES)
    assert all(abs(n / len(records) - 1 / 3) < 0.03 for n in counts.values()), counts
    assert all(r["meta"]["source"] == "demo" for r in records)


def test_hard_conversations_are_multi_turn_and_the_others_single_turn():
    for r in generate_demo_conversations(600, seed=1):
        turns = sum(m["role"] == "assistant" for m in r["messages"])
        assert (turns >= 2) == (r["meta"]["difficulty"] == "hard")
        roles = [m["role"] for m in r["messages"] if m["role"] != "system"]
        assert roles == ["user", "assistant"] * turns  # alternating, user first


def test_every_answer_shows_correct_steps_and_ends_with_the_answer_line():
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for r in generate_demo_conversations(600, seed=2):
        for m in r["messages"]:
            if m["role"] != "assistant":
                continue
            *steps, last = m["content"].split("\n")
            assert steps and last.startswith(ANSWER_PREFIX)
            for line in steps:
                a, op, b, c = STEP.match(line).groups()
                assert ops[op](int(a), int(b)) == int(c), line
            assert int(last[len(ANSWER_PREFIX) :]) == int(STEP.match(steps[-1]).group(4))


def test_the_shipped_tokenizer_is_what_the_code_trains(tmp_path):
    train_demo_tokenizer().save_pretrained(str(tmp_path))
    fresh = json.loads((tmp_path / "tokenizer.json").read_text())
    shipped = json.loads((DEMO_TOKENIZER_DIR / "tokenizer.json").read_text())
    assert fresh["model"]["vocab"] == shipped["model"]["vocab"]
    assert fresh["model"]["merges"] == shipped["model"]["merges"]
    assert fresh["added_tokens"] == shipped["added_tokens"]


def test_demo_tokenizer_has_its_template_and_special_tokens(demo_tokenizer):
    tok = demo_tokenizer
    assert tok.chat_template == DEMO_CHAT_TEMPLATE
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: lossless
    assert [tok.decode([i]) for i in tok("1234", add_special_tokens=False)["input_ids"]] == list("1234")


def test_the_shipped_probe_set_is_what_the_code_generates_and_checks_the_answer_format(tmp_path):
    from sftdist.data.demo import DEMO_PROBES, generate_demo_conversations, write_demo_probes
    from sftdist.metrics.probes import Probe, Response, check, load_probe_file

    write_demo_probes(tmp_path / "probes.jsonl")
    assert (tmp_path / "probes.jsonl").read_text() == DEMO_PROBES.read_text()
    probes = load_probe_file(DEMO_PROBES)
    assert len(probes) == 16 and {p.id.rsplit("-", 1)[1] for p in probes} == {"easy", "medium", "hard"}
    # the demo's own answers pass; an answer without the final line, or that never stops, does not
    answer = generate_demo_conversations(1)[0]["messages"][-1]["content"]
    assert check(probes[0], Response(answer, 9, True)).passed
    assert not check(probes[0], Response(answer.rsplit("\n", 1)[0], 9, True)).passed
    assert not check(probes[0], Response(answer, 9, False)).passed
    assert not check(Probe("x", probes[0].checks), Response("#### twelve", 2, True)).passed
