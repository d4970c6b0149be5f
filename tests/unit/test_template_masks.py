"""Assistant-only masks on real chat templates, with no per-template code in sftdist.

The six templates of ../shared/chat_templates (copies in tests/data, checked against the originals where
they are present) and several others written here, each with a tiny BPE tokenizer that knows its special tokens.
A mask is checked against what the test knows about the template (its end-of-turn marker) and against the text of
every message: each answer and its end-of-turn marker are trained on; no system, user or tool text, and
no generation prompt, ever is. Mutated masks (a user token trained on, the end-of-turn marker missing)
must fail the same check, so the check can fail.
"""

from __future__ import annotations

import json

import pytest

from helpers import SHARED, TEST_DATA, tiny_tokenizer
from sftdist.data import IGNORE_INDEX, encode_conversation
from sftdist.data.demo import generate_demo_conversations
from sftdist.data.formats import normalise
from sftdist.data.template import bind_template

TEMPLATES_DIR = TEST_DATA / "chat_templates"
GLAIVE = TEST_DATA / "glaive_toolcall_40.json"

# name -> (special tokens, bos, eos, end-of-turn marker the answers must end with, metaspace?)
SHARED_TEMPLATES = {
    "chatml": (["<|im_start|>", "<|im_end|>", "<s>"], "<s>", "<|im_end|>", "<|im_end|>", False),
    "llama-3-instruct": (
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|eot_id|>",
        False,
    ),
    "mistral-instruct": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>", True),
    "phi-3": (
        ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"],
        None,
        "<|endoftext|>",
        "<|end|>",
        False,
    ),
    "qwen2.5-instruct": (
        [
            "<|im_start|>",
            "<|im_end|>",
            "<tool_call>",
            "</tool_call>",
            "<tool_response>",
            "</tool_response>",
            "<|endoftext|>",
        ],
        None,
        "<|im_end|>",
        "<|im_end|>",
        False,
    ),
    "zephyr": (["<|user|>", "<|assistant|>", "<|system|>", "</s>", "<s>"], "<s>", "</s>", "</s>", False),
}

# Templates not in shared/: other families and shapes (no generation prompt, no system role, ...).
OTHER_TEMPLATES = {
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
        "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
        (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>", False),
    ),
    "llama-2-chat": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",
        (["<unk>", "<s>", "</s>"], "<s>", "</s>", "</s>", True),
    ),
    "vicuna": (
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
        "{% set loop_messages = messages[1:] %}"
        "{% else %}{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
        "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
        "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token + '\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}",
        (["<s>", "</s>"], "<s>", "</s>", "</s>", False),
    ),
    "alpaca-no-generation-prompt": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}",
        (["</s>"], None, "</s>", "</s>", False),
    ),
}


def _cases():
    return [pytest.param(name, id=name) for name in [*SHARED_TEMPLATES, *OTHER_TEMPLATES]]


def _setup(name: str):
    if name in SHARED_TEMPLATES:
        path = TEMPLATES_DIR / f"{name}.jinja"
        template, (specials, bos, eos, eot, metaspace) = path.read_text().strip(), SHARED_TEMPLATES[name]
    else:
        template, (specials, bos, eos, eot, metaspace) = OTHER_TEMPLATES[name]
    tokenizer = tiny_tokenizer(specials, bos=bos, eos=eos, metaspace=metaspace, template=template)
    return tokenizer, eot


def _multi_turn_conversations():
    """Distinct words per message, so a leaked prompt word is visible in the trained text."""
    convs = [r["messages"] for r in generate_demo_conversations(60, seed=11) if len(r["messages"]) >= 4][:8]
    convs.append(
        [
            {"role": "system", "content": "You answer tersely."},
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Again, please."},
            {"role": "assistant", "content": "Hello again!"},
        ]
    )
    return convs


def _runs(enc) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(enc["input_ids"], enc["labels"]):
        if label != IGNORE_INDEX:
            assert label == token, "a label must be its own token"
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return runs + ([current] if current else [])


def check_mask(tokenizer, ct, messages, enc, eot: str, tools=None) -> None:
    """The oracle: raises AssertionError when the mask is wrong for this conversation."""
    adapted, tools, _ = ct.adapt(messages, tools)
    assert enc["input_ids"] == tokenizer(ct.render(adapted, tools=tools), add_special_tokens=False)["input_ids"]
    trained = [m for m in adapted if m["role"] == "assistant" and m.get("weight", 1) == 1]
    runs = [tokenizer.decode(r) for r in _runs(enc)]
    assert len(runs) == len(trained), (runs, [m["content"] for m in trained])
    prompt_texts = [
        m["content"].strip() for m in adapted if m["role"] != "assistant" and len(m["content"].strip()) >= 12
    ]
    for run, message in zip(runs, trained):
        expected = message["content"].strip() or message["tool_calls"][0]["function"]["name"]
        assert expected in run, (expected, run)
        assert run.rstrip().endswith(eot), f"{run!r} does not end with the end-of-turn marker {eot!r}"
        assert not any(text in run for text in prompt_texts), run  # nothing of a prompt-side message
        head = run[: run.index(expected)].lower()
        assert "user" not in head and "[inst]" not in head, head


@pytest.mark.parametrize("name", _cases())
def test_multi_turn_masks(name):
    tokenizer, eot = _setup(name)
    ct = bind_template(tokenizer, tokenizer.chat_template)
    for messages in _multi_turn_conversations():
        check_mask(tokenizer, ct, messages, encode_conversation(tokenizer, messages), eot)


def _glaive():
    return [normalise(r, "sharegpt") for r in json.loads(GLAIVE.read_text())]


@pytest.mark.parametrize("name", _cases())
def test_tool_calls_are_trained_and_tool_results_never(name):
    tokenizer, eot = _setup(name)
    ct = bind_template(tokenizer, tokenizer.chat_template)
    num_calls = 0
    for conv in _glaive():
        enc = encode_conversation(tokenizer, conv["messages"], tools=conv["tools"])
        check_mask(tokenizer, ct, conv["messages"], enc, eot, tools=conv["tools"])
        trained = "".join(tokenizer.decode(r) for r in _runs(enc))
        for m in conv["messages"]:
            if m["role"] == "tool":
                assert m["content"].strip() not in trained, "an observation was trained on"
            for call in m.get("tool_calls", []):  # trained as the template renders calls, or as their JSON
                assert call["function"]["name"] in trained, "a function call was not trained on"
                num_calls += 1
    assert num_calls > 10


def test_the_vendored_copies_match_the_shared_originals():
    if not (SHARED / "chat_templates").is_dir():
        pytest.skip(f"{SHARED} is absent: nothing to compare the copies in tests/data with")
    for name in [*SHARED_TEMPLATES, "qwen3", "glm4moe"]:
        assert (TEMPLATES_DIR / f"{name}.jinja").read_text() == (
            SHARED / "chat_templates" / f"{name}.jinja"
        ).read_text()
    original = json.loads((SHARED / "data" / "glaive_toolcall_en_demo.json").read_text())
    assert json.loads(GLAIVE.read_text()) == original[:40]


def test_capabilities_are_probed_from_the_template():
    caps = {}
    for name in ("chatml", "qwen2.5-instruct", "mistral-instruct", "llama-3-instruct"):
        tokenizer, _ = _setup(name)
        caps[name] = bind_template(tokenizer, tokenizer.chat_template).caps
    assert caps["qwen2.5-instruct"].tool_calls and caps["qwen2.5-instruct"].tool_role and caps["qwen2.5-instruct"].tools
    assert not caps["llama-3-instruct"].tools
    assert not caps["chatml"].tool_role and not caps["chatml"].tool_calls and caps["chatml"].system
    assert not caps["mistral-instruct"].tool_role and caps["mistral-instruct"].system
    gemma, _ = _setup("gemma")
    assert not bind_template(gemma, gemma.chat_template).caps.system


@pytest.mark.parametrize("name", ["chatml", "llama-3-instruct", "gemma"])
def test_a_wrong_mask_fails_the_check(name):
    tokenizer, eot = _setup(name)
    ct = bind_template(tokenizer, tokenizer.chat_template)
    messages = _multi_turn_conversations()[-1]
    enc = encode_conversation(tokenizer, messages)
    check_mask(tokenizer, ct, messages, enc, eot)  # the right mask passes

    first_trained = enc["labels"].index(next(label for label in enc["labels"] if label != IGNORE_INDEX))
    leaked = {**enc, "labels": list(enc["labels"])}
    leaked["labels"][first_trained - 2] = leaked["input_ids"][first_trained - 2]  # a prompt token trained on
    with pytest.raises(AssertionError):
        check_mask(tokenizer, ct, messages, leaked, eot)

    eot_id = tokenizer.convert_tokens_to_ids(eot)
    no_eos = {
        **enc,
        "labels": [IGNORE_INDEX if t == eot_id else label for t, label in zip(enc["input_ids"], enc["labels"])],
    }
    with pytest.raises(AssertionError, match="end-of-turn marker"):
        check_mask(tokenizer, ct, messages, no_eos, eot)


def test_system_prompts_fold_into_the_first_user_turn_where_the_template_refuses_them():
    tokenizer, eot = _setup("gemma")
    messages = _multi_turn_conversations()[-1]
    enc = encode_conversation(tokenizer, messages)
    assert "system_in_user" in enc["adaptations"]
    text = tokenizer.decode(enc["input_ids"])
    assert "<start_of_turn>user\nYou answer tersely.\n\nSay hello." in text


def test_a_template_without_a_generation_prompt_trains_the_header_it_makes_the_model_write():
    tokenizer, eot = _setup("alpaca-no-generation-prompt")
    enc = encode_conversation(
        tokenizer, [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]
    )
    assert [tokenizer.decode(r) for r in _runs(enc)] == ["### Response:\nHi.</s>"]


@pytest.mark.parametrize("name", _cases())
def test_rendering_equals_apply_chat_template_and_the_one_sample_check_is_exact(name):
    """Our renderer is apply_chat_template's (tools included); where the single render passes the cheap check (only
    each prompt's tail after its last special token tokenized again), it holds the very tokens and labels of the
    turns each tokenized alone."""
    from dataclasses import replace

    from sftdist.data.labels import backend_tokenizer, label_many, texts_to_tokenize
    from sftdist.data.samples import render_many

    tokenizer, _ = _setup(name)
    ct = bind_template(tokenizer, tokenizer.chat_template)
    convs = [(m, None) for m in _multi_turn_conversations()]
    convs += [(c["messages"], c["tools"]) for c in _glaive()[:15]]
    for messages, tools in convs:
        adapted, adapted_tools, _ = ct.adapt(messages, tools)
        for upto in range(1, len(adapted) + 1):
            for gen in (False, True):
                assert ct.render(adapted[:upto], gen, adapted_tools) == tokenizer.apply_chat_template(
                    adapted[:upto], tools=adapted_tools, tokenize=False, add_generation_prompt=gen
                )
    backend = backend_tokenizer(tokenizer)
    rendered = render_many(ct, convs)
    alone = [replace(r, single=False) for r in rendered]  # (every turn tokenized alone)
    checked = label_many(backend, rendered, backend.encode_batch(texts_to_tokenize(rendered)))
    exact = label_many(backend, alone, backend.encode_batch(texts_to_tokenize(alone)))
    ones = 0
    for r, ours, theirs in zip(rendered, checked, exact):
        assert r.error is None and len(theirs["samples"]) == 1  # (these templates keep history as it was served)
        if len(ours["samples"]) == 1:
            ones += 1
            (one,), (each,) = ours["samples"], theirs["samples"]
            n = len(each["input_ids"])
            assert one["input_ids"][:n] == each["input_ids"] and one["labels"][:n] == each["labels"]
            assert set(one["labels"][n:]) <= {IGNORE_INDEX} and one["input_ids"] == backend.encode(r.full).ids
        else:
            assert ours["samples"] == theirs["samples"]
    assert ones >= len(convs) // 2
