"""Training tokens are serving tokens, checked without the implementation.

For every assistant turn ``i`` of a conversation, this checker renders ``prompt_i`` (the turns before it, generation
prompt on) and ``through_i`` (the turns through it) with ``apply_chat_template`` and tokenizes the prompt and the
turn's target (what ``through_i`` adds, through its end of turn) each alone. The prepared samples (``prepare``, as a
run makes them) must hold, for every turn, a sample that starts with tok(prompt_i) + tok(target_i) and trains exactly
the target there; each sample trains nothing but such targets, so no user, system or tool text, and every turn is
trained once. Checked on the shared templates (the two that rewrite history, Qwen3 and GLM-4.5, among them) and five
more of 2025-26's (gpt-oss, Qwen3.6, Nemotron 3 Nano, LFM2.5, Phi-3.5), on multi-turn conversations with and without
reasoning and with a system prompt; nothing may be rejected.
"""

from __future__ import annotations

import json

import pytest

from helpers import TEST_DATA, tiny_tokenizer
from sftdist.config import DataConfig
from sftdist.data.pipeline import prepare

IGNORE = -100
_QWEN = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"]
_QWEN += ["<tool_response>", "</tool_response>", "<|endoftext|>"]
_GLM = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<think>", "</think>"]
_GLM += ["<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "<|endoftext|>"]

# name -> (file, special tokens, eos, metaspace?)
TEMPLATES = {
    "chatml": ("chatml", ["<|im_start|>", "<|im_end|>", "<s>"], "<|im_end|>", False),
    "llama-3-instruct": (
        "llama-3-instruct",
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
        False,
    ),
    "mistral-instruct": ("mistral-instruct", ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "</s>", True),
    "phi-3": ("phi-3", ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"], "<|endoftext|>", False),
    "qwen2.5-instruct": ("qwen2.5-instruct", _QWEN, "<|im_end|>", False),
    "zephyr": ("zephyr", ["<|user|>", "<|assistant|>", "<|system|>", "</s>", "<s>"], "</s>", False),
    "qwen3": ("qwen3", _QWEN, "<|im_end|>", False),
    "glm4moe": ("glm4moe", _GLM, "<|endoftext|>", False),
    # five more, as TRL's trl/chat_templates keeps them (Apache-2.0)
    "gpt-oss": (
        "gptoss",
        ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>", "<|endoftext|>"],
        "<|return|>",
        False,
    ),
    "qwen3.6": ("qwen3-6", _QWEN, "<|im_end|>", False),
    "nemotron-3-nano": ("nemotron-3-nano", _QWEN, "<|im_end|>", False),
    "lfm2.5": (
        "lfm2-2-5",
        ["<|startoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|tool_call_start|>"]
        + ["<|tool_call_end|>"],
        "<|im_end|>",
        False,
    ),
    "phi-3.5": (
        "phi-3.5",
        ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"],
        "<|endoftext|>",
        False,
    ),
}

BOS = {"mistral-instruct": "<s>", "llama-3-instruct": "<|begin_of_text|>"}


def _template(file: str) -> str:
    return (TEST_DATA / "chat_templates" / f"{file}.jinja").read_text()


def _conversations() -> list[tuple[str, list[dict]]]:
    """(which turns reason, messages): multi-turn, with and without reasoning, with and without a system prompt;
    distinct words per message."""

    def talk(system: bool, reasoning: str) -> list[dict]:
        out = [{"role": "system", "content": "You are terse and exact."}] if system else []
        for turn, (question, answer) in enumerate(
            [("What is seven plus two?", "Nine."), ("Double that number.", "Eighteen."), ("Halve it.", "Nine again.")]
        ):
            out.append({"role": "user", "content": question})
            message = {"role": "assistant", "content": answer}
            if reasoning == "all" or (reasoning == "last" and turn == 2):
                message["reasoning_content"] = f"Compute step {turn} carefully."
            out.append(message)
        return out

    talks = [(reasoning, talk(system, reasoning)) for system in (True, False) for reasoning in ("none", "all", "last")]
    return [*talks, ("all", talk(True, "all")[:5])]


def _stop(tokenizer, template: str, specials: list[str], through: str, messages: list[dict], i: int, kwargs) -> str:
    """What ends turn i where the template writes no end-of-turn token of its own (GLM-4.5): the white space and the
    header that follow the answer when the next turn comes (the turn the conversation has next, else a user turn)."""
    specials = sorted(specials, key=len, reverse=True)
    if through.rstrip().endswith(tuple(specials)):
        return ""
    nxt = messages[i + 1] if i + 1 < len(messages) else {"role": "user", "content": "And then?"}
    follow = tokenizer.apply_chat_template(messages[: i + 1] + [nxt], chat_template=template, tokenize=False, **kwargs)
    answer = messages[i]["content"]  # (distinct words: found where the answer ends, its reasoning kept or not)
    rest = follow[follow.rindex(answer, 0, follow.index(nxt["content"])) + len(answer) :]
    body = rest.lstrip()
    token = next(t for t in specials if body.startswith(t))
    return rest[: len(rest) - len(body) + len(token)]


def _expected(tokenizer, template: str, specials: list[str], messages: list[dict], kwargs: dict) -> list[tuple]:
    """(tok(prompt_i), tok(target_i)) of every assistant turn."""

    def tok(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    out = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(
            messages[:i], chat_template=template, tokenize=False, add_generation_prompt=True, **kwargs
        )
        through = tokenizer.apply_chat_template(messages[: i + 1], chat_template=template, tokenize=False, **kwargs)
        assert through.startswith(prompt), (prompt[-40:], through[len(prompt) - 40 :])
        target = through[len(prompt) :].rstrip() + _stop(tokenizer, template, specials, through, messages, i, kwargs)
        out.append((tok(prompt), tok(target)))
    return out


def _check(samples: list[tuple[list[int], list[int]]], expected: list[tuple[list[int], list[int]]]) -> None:
    claimed = [set() for _ in samples]
    for prompt, target in expected:
        a, b = len(prompt), len(prompt) + len(target)
        homes = [
            k
            for k, (ids, labels) in enumerate(samples)
            if ids[:b] == prompt + target and labels[a:b] == target and not (set(range(a, b)) & claimed[k])
        ]
        assert homes, f"no sample starts with the turn's prompt and trains its target {target[:8]}..."
        claimed[homes[0]] |= set(range(a, b))
    for (_, labels), mine in zip(samples, claimed):
        assert {j for j, y in enumerate(labels) if y != IGNORE} == mine  # (nothing else trained: no user text)
    assert sum(len(c) for c in claimed) == sum(len(t) for _, t in expected)  # (each turn once)


# Templates that take an argument for answers without reasoning: a server passes it per request, so each group of
# conversations is prepared with its own (a conversation that reasons on some turns only has turns that no one setting
# serves: Nemotron's prompt opens a think block, or closes an empty one, for every turn alike).
KWARGS = {"nemotron-3-nano": {"none": {"enable_thinking": False}, "all": {}}}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_every_turn_is_trained_once_on_exactly_what_a_server_renders(name, tmp_path):
    (file, specials, eos, metaspace), bos = TEMPLATES[name], BOS.get(name)
    template = _template(file)
    tokenizer = tiny_tokenizer(specials, bos=bos, eos=eos, metaspace=metaspace, template=template)
    groups: dict[str, list] = {}
    for reasoning, messages in _conversations():
        if messages[0]["role"] == "system":  # (a template that renders no system prompt gets the conversation without)
            text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
            if messages[0]["content"] not in text:
                messages = messages[1:]
        kwargs = KWARGS[name].get(reasoning) if name in KWARGS else {}
        if kwargs is not None:
            groups.setdefault(json.dumps(kwargs), []).append(messages)
    split = 0
    for key, convs in groups.items():
        kwargs = json.loads(key)
        path = tmp_path / "talk.jsonl"
        path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs))
        config = DataConfig(
            path=str(path), cache=False, max_length=4096, empty_think="train", chat_template_kwargs=kwargs
        )
        config.filters.exact_dedup = False  # (the same words with and without reasoning: both kept)
        table, report = prepare(config, tokenizer, template, 0)
        assert report.rejected == {} and report.records_used == len(convs), report.examples
        parts = table["part"]
        starts = [i for i, p in enumerate(parts) if p == 0] + [len(parts)]
        assert len(starts) - 1 == len(convs)
        for messages, a, b in zip(convs, starts, starts[1:]):
            samples = [(table[i]["input_ids"], table[i]["labels"]) for i in range(a, b)]
            _check(samples, _expected(tokenizer, template, specials, messages, kwargs))
            split += len(samples) > 1
        assert report.split_records == sum(len([p for p in parts[a:b] if p]) > 0 for a, b in zip(starts, starts[1:]))
    if name in ("qwen3", "glm4moe", "gpt-oss", "phi-3.5"):  # (these rewrite history: some records are split)
        assert split


def test_the_checker_fails_a_sample_that_trains_a_user_token_or_misses_a_turn():
    prompt, target = [1, 2, 3], [4, 5]
    good = ([1, 2, 3, 4, 5], [IGNORE, IGNORE, IGNORE, 4, 5])
    _check([good], [(prompt, target)])
    with pytest.raises(AssertionError):
        _check([([1, 2, 3, 4, 5], [IGNORE, IGNORE, 3, 4, 5])], [(prompt, target)])  # a prompt token trained
    with pytest.raises(AssertionError):
        _check([good], [(prompt, target), ([1, 2, 3, 4, 5, 6], [7])])  # a turn with no sample
    with pytest.raises(AssertionError):
        _check([([1, 2, 9, 4, 5], good[1])], [(prompt, target)])  # not the prompt tokenized alone


QWEN3 = TEST_DATA / "chat_templates" / "qwen3.jinja"


def test_split_records_stay_together_and_inspect_says_how_they_were_split(tmp_path):
    """Qwen3 on two-turn reasoning conversations: each record is two samples (rows in a row); the eval split and the
    source weights take a record's samples together; sftdist-inspect marks them and the audit counts what the split
    repeats."""
    import numpy as np

    from sftdist.cli.inspect import inspect_data
    from sftdist.data.dataset import split_and_weight

    records = []
    for i in range(30):
        talk = [_conversations()[1][1][j] for j in range(1, 5)]  # (user, assistant, user, assistant; reasoning)
        talk[0] = {**talk[0], "content": f"What is {i} plus two?"}
        records.append({"messages": talk})
    path = tmp_path / "talk.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = tiny_tokenizer(_QWEN, eos="<|im_end|>", template=QWEN3.read_text())
    table, report = prepare(DataConfig(path=str(path), cache=False), tokenizer, QWEN3.read_text(), 0)
    assert (report.records_used, report.samples, report.split_records) == (30, 60, 30)
    assert report.sources["talk"]["extra_context_tokens"] == report.extra_context_tokens > 0
    assert table["part"] == [0, 1] * 30
    for weight in (1.0, 1.5):
        train, held, _ = split_and_weight(table, {"talk": weight}, 7, seed=3)
        assert len(held) == 14 and not set(train) & set(held)
        for rows in (train, held):
            record = np.asarray(rows) // 2
            assert all(np.count_nonzero(record == r) % 2 == 0 for r in set(record.tolist()))  # (both samples)
    shown = inspect_data([f"data.path={path}", f"data.chat_template={QWEN3}", "data.cache=false"], 2, None, False, 500)
    assert "serving-exact samples: 30 records rendered differently at an earlier turn became 60 samples" in shown
    assert "sample 1 of 2 of its record" in shown and "sample 2 of 2 of its record" in shown
    assert "[[<think>\nCompute step 1 carefully.\n</think>\n\nEighteen.<|im_end|>]]" in shown
