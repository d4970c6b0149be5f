"""encode_conversation: training tokens are the template's tokens; labels are assistant output only."""

from __future__ import annotations

import pytest

from sftdist.data import IGNORE_INDEX, TemplateSplitError, encode_conversation

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5\n#### 5"},
    {"role": "user", "content": "Now add 4 to that."},
    {"role": "assistant", "content": "5 + 4 = 9\n#### 9"},
]


def _supervised_runs(enc):
    """Maximal runs of consecutive supervised tokens, as token id lists."""
    runs, current = [], []
    for token, label in zip(enc["input_ids"], enc["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_tokens_are_exactly_the_rendered_template(demo_tokenizer):
    enc = encode_conversation(demo_tokenizer, CONVERSATION)
    text = demo_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert enc["input_ids"] == demo_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(enc["labels"]) == len(enc["input_ids"]) and enc["num_truncated_tokens"] == 0


def test_labels_are_each_answer_and_its_end_of_turn_marker(demo_tokenizer):
    tok = demo_tokenizer
    enc = encode_conversation(tok, CONVERSATION)
    expected = [
        tok(m["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        for m in CONVERSATION
        if m["role"] == "assistant"
    ]
    assert _supervised_runs(enc) == expected
    # Neither system, user, the assistant header, nor the newline after <|im_end|> is supervised.
    supervised_text = "".join(tok.decode(run) for run in _supervised_runs(enc))
    for never in ("Be brief", "What is", "Now add", "assistant", "<|im_start|>"):
        assert never not in supervised_text


def test_tool_results_are_never_supervised(demo_tokenizer):
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "call weather()"},
        {"role": "tool", "content": "sunny 21C"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    enc = encode_conversation(demo_tokenizer, messages)
    runs = [demo_tokenizer.decode(r) for r in _supervised_runs(enc)]
    assert runs == ["call weather()<|im_end|>", "It is sunny.<|im_end|>"]


def test_a_chat_template_argument_overrides_the_tokenizer_template(demo_tokenizer):
    template = (
        "{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
    )
    enc = encode_conversation(demo_tokenizer, CONVERSATION[1:3], chat_template=template)
    assert demo_tokenizer.decode(enc["input_ids"]).startswith("[user] What is 2 + 3?")
    assert [demo_tokenizer.decode(r) for r in _supervised_runs(enc)] == ["2 + 3 = 5\n#### 5<|im_end|>"]


def test_a_template_that_rewrites_earlier_turns_gives_a_sample_per_turn_as_served(demo_tokenizer):
    """Renders an earlier answer's content away: the single render is not what a server saw at the second turn, so
    each turn is a sample of its own that starts with its prompt and trains its answer once; encode_conversation
    refuses to pretend it is one sample."""
    from sftdist.data.samples import encode_samples

    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '<|im_start|>a\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(TemplateSplitError, match="2 serving-exact samples"):
        encode_conversation(demo_tokenizer, CONVERSATION, chat_template=template)
    samples = encode_samples(demo_tokenizer, CONVERSATION, chat_template=template)
    tok = demo_tokenizer
    for sample, i in zip(samples, (2, 4), strict=True):
        text = tok.apply_chat_template(
            CONVERSATION[:i], chat_template=template, add_generation_prompt=True, tokenize=False
        )
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        target = tok(CONVERSATION[i]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert sample["input_ids"] == prompt + target
        assert _supervised_runs(sample) == [target]


def test_a_template_that_writes_no_stop_after_an_answer_is_rejected_naming_it(demo_tokenizer):
    from sftdist.data.template import template_hash

    template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(TemplateSplitError, match="writes no special token after an answer") as err:
        encode_conversation(demo_tokenizer, CONVERSATION[1:3], chat_template=template)
    assert err.value.reason == "no_stop" and f"sha256:{template_hash(template)}" in str(err.value)
    assert "ends on '2 + 3 = 5\\n#### 5'" in str(err.value)


def test_a_template_error_is_reported_not_swallowed(demo_tokenizer):
    template = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first please') }}{% endif %}x"
    with pytest.raises(TemplateSplitError, match="system first please"):
        encode_conversation(demo_tokenizer, CONVERSATION[1:3], chat_template=template)


def test_no_template_is_a_clear_error(demo_tokenizer):
    demo_tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template: pass data.chat_template=FILE"):
        encode_conversation(demo_tokenizer, CONVERSATION)


def test_max_length_truncates_and_counts(demo_tokenizer):
    full = encode_conversation(demo_tokenizer, CONVERSATION)
    cut = encode_conversation(demo_tokenizer, CONVERSATION, max_length=20)
    assert cut["input_ids"] == full["input_ids"][:20] and cut["labels"] == full["labels"][:20]
    assert cut["num_truncated_tokens"] == len(full["input_ids"]) - 20


def test_a_token_that_straddles_prompt_and_answer_is_split_as_a_server_tokenizes(demo_tokenizer):
    from tokenizers import processors

    # "A: " ends the prompt with a space that byte-level BPE glues to the answer's first word (" books") in one pass.
    # A server tokenizes the prompt alone ("A", ":", " ") and the model writes "books": those are the tokens trained,
    # whatever the tokenizer's offsets trimming.
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\n' }}"
        "{% else %}{{ 'A: ' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}"
    )
    messages = [{"role": "user", "content": "What do you sell?"}, {"role": "assistant", "content": "books"}]
    tok = demo_tokenizer
    prompt = tok("Q: What do you sell?\nA: ", add_special_tokens=False)["input_ids"]
    answer = tok("books<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok("Q: What do you sell?\nA: books<|im_end|>", add_special_tokens=False)["input_ids"] != prompt + answer
    for trim in (False, True):
        tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=trim)
        enc = encode_conversation(tok, messages, chat_template=template)
        assert enc["input_ids"][: len(prompt) + len(answer)] == prompt + answer and _supervised_runs(enc) == [answer]


def test_weight_zero_turns_stay_in_context_unsupervised(demo_tokenizer):
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["weight"] = 0
    enc = encode_conversation(demo_tokenizer, messages)
    assert enc["input_ids"] == encode_conversation(demo_tokenizer, CONVERSATION)["input_ids"]
    assert [demo_tokenizer.decode(r) for r in _supervised_runs(enc)] == ["5 + 4 = 9\n#### 9<|im_end|>"]


def test_tools_reach_the_template(demo_tokenizer):
    template = (
        "{% if tools %}{{ '<|im_start|>system\nTools: ' + tools | map(attribute='name') | join(',') + "
        "'<|im_end|>\n' }}{% endif %}" + demo_tokenizer.chat_template
    )
    enc = encode_conversation(
        demo_tokenizer, CONVERSATION[1:3], chat_template=template, tools=[{"name": "calc"}, {"name": "search"}]
    )
    assert demo_tokenizer.decode(enc["input_ids"]).startswith("<|im_start|>system\nTools: calc,search<|im_end|>")
    assert [demo_tokenizer.decode(r) for r in _supervised_runs(enc)] == ["2 + 3 = 5\n#### 5<|im_end|>"]


def test_a_merged_newline_and_space_is_split_whatever_the_offsets_trimming():
    """GPT-NeoX-style tokenizers trim white space from offsets: the token '\\n ' (the prompt's newline and the
    answer's first space) then looks as if it ended before the answer. The sample still holds the prompt's tokens and
    the answer's, each tokenized alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    for trim in (True, False):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=trim)
        tok.train_from_iterator(
            ["assistant\n  Hello world"] * 50,
            trainers.BpeTrainer(
                vocab_size=300,
                special_tokens=["<|im_start|>", "<|im_end|>"],
                show_progress=False,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            ),
        )
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|im_end|>", chat_template=CONVERSATION_TEMPLATE
        )
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  Hello world"}]
        enc = encode_conversation(tokenizer, messages)
        text = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        answer = tokenizer("  Hello world<|im_end|>", add_special_tokens=False)["input_ids"]
        assert enc["input_ids"][: len(prompt) + len(answer)] == prompt + answer and _supervised_runs(enc) == [answer]


CONVERSATION_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


THINKING_TEMPLATE = (  # reads `thinking` (gpt-oss style); records carry `reasoning_content`
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and m.thinking %}<think>{{ m.thinking }}</think>{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_reasoning_reaches_the_template_under_the_name_it_reads_and_is_supervised(demo_tokenizer):
    from sftdist.data.formats import normalise

    record = {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "two and two"},
        ]
    }
    conv = normalise(record, "messages")
    assert conv["messages"][1]["reasoning_content"] == "two and two"  # kept by normalisation
    enc = encode_conversation(demo_tokenizer, conv["messages"], chat_template=THINKING_TEMPLATE)
    assert "<think>two and two</think>4" in demo_tokenizer.decode(enc["input_ids"])
    supervised = demo_tokenizer.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX])
    assert supervised == "<think>two and two</think>4<|im_end|>"


def test_a_template_file_that_does_not_parse_is_named(tmp_path):
    from sftdist.data.template import load_chat_template
    from sftdist.errors import ConfigError

    path = tmp_path / "broken.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}")
    with pytest.raises(ConfigError, match=r"data.chat_template='.*broken.jinja': the chat template does not parse"):
        load_chat_template(str(path))


# Every way a template reads a message's fields: present and missing keys, keys named like dict methods,
# attr(), nested dicts, the loop's counters and methods, dict methods the sandbox allows.
_ATTRIBUTE_PROBE = (
    "{% for m in messages %}"
    "[{{ m.role }}|{{ m.content }}|{{ m.missing is defined }}|{{ m.items is defined }}|{{ m.get('role') }}"
    "|{{ m['role'] }}|{{ m | attr('role') }}|{{ m.keys() | list | length }}|{{ m.extra.inner if m.extra }}"
    "|{{ (m.extra.missing is defined) if m.extra else '' }}"
    "|{{ loop.index0 }}{{ loop.last }}{{ loop.first }}{{ loop.length }}{{ loop.revindex }}{{ loop.cycle('x', 'y') }}"
    "|{{ m.values is defined }}]"
    "{% endfor %}"
    "{% if add_generation_prompt %}<gen>{% endif %}"
)


def test_the_fast_renderer_renders_what_apply_chat_template_renders(demo_tokenizer):
    """Our renderer answers a plain dict's fields without the sandbox's failed attribute lookup: the same text for
    every way of reading a field, and the same refusals of unsafe attributes."""
    import jinja2

    from sftdist.data.template import ChatTemplate

    ct = ChatTemplate(demo_tokenizer, _ATTRIBUTE_PROBE)
    messages = [
        {"role": "user", "content": "hi", "extra": {"inner": "deep"}},
        {"role": "assistant", "content": "yo", "items": "shadowed by dict.items", "values": 3},
    ]
    for gen in (False, True):
        ours = ct.render(messages, add_generation_prompt=gen)
        assert ours == demo_tokenizer.apply_chat_template(
            messages, chat_template=_ATTRIBUTE_PROBE, tokenize=False, add_generation_prompt=gen
        )
    assert ours.startswith("[user|hi|False|True|user|user||3|deep|False|0FalseTrue22x|True][assistant|yo|False|True|")
    for unsafe in ("{{ messages[0].__class__.__mro__ }}", "{{ messages[0].update({}) }}", "{{ messages | attr(1) }}"):
        with pytest.raises((jinja2.exceptions.SecurityError, TypeError)):
            demo_tokenizer.apply_chat_template(messages, chat_template=unsafe, tokenize=False)
        with pytest.raises(TemplateSplitError, match="failed to render"):
            ChatTemplate(demo_tokenizer, unsafe).render(messages)


def test_json_is_serialised_once_per_conversation_and_stays_exact(demo_tokenizer):
    """Within one conversation's renders each value is serialised to JSON once; values the template builds and
    drops (whose ids Python reuses) still serialise to themselves, and the spans' text is apply_chat_template's."""
    from sftdist.data.samples import assistant_char_spans
    from sftdist.data.template import ChatTemplate

    ct = ChatTemplate(
        demo_tokenizer,
        "{% for m in messages %}{% for i in range(3) %}{{ [i, m.content] | tojson }}{% endfor %}"
        "{{ m.args | tojson(indent=1) if m.args is defined }}{{ m.args | tojson }}<|im_end|>{% endfor %}",
    )
    messages = [
        {"role": "user", "content": "a", "args": {"x": [1, 2]}},
        {"role": "assistant", "content": "b", "args": {"y": "é"}},
    ]
    text, _ = assistant_char_spans(ct, messages)
    assert text == demo_tokenizer.apply_chat_template(messages, chat_template=ct.template, tokenize=False)
    assert text.startswith('[0, "a"][1, "a"][2, "a"]{\n "x": [\n  1,\n  2\n ]\n}{"x": [1, 2]}<|im_end|>[0, "b"]')
    calls = []  # (what was serialised, not the values: holding them would keep their ids from being reused)
    tojson = ct._json.tojson
    ct._json.tojson = lambda *a, **k: calls.append(repr(a[0])) or tojson(*a, **k)
    assert assistant_char_spans(ct, messages)[0] == text
    # Rendered twice (in full, and up to the assistant turn), each args dict is serialised once per indent (not
    # four times: the user's is in both renders); each temporary list once per render.
    assert calls.count("{'x': [1, 2]}") == 2 and calls.count("{'y': 'é'}") == 2
    assert calls.count("[0, 'a']") == 2


@pytest.mark.parametrize(
    "template",
    [
        # a lazy tojson option (a map generator): never remembered, each render its own
        "{% for m in messages %}{{ messages[0] | tojson(separators=[loop.index|string, ':']|map('trim')) }}\n"
        "{% endfor %}",
        "{% set g = [',', ':']|map('trim') %}{{ messages[0]|tojson(separators=g) }}|"
        "{{ messages[0]|tojson(separators=g) }}",
        # loop.last reads ahead into an item that fails: the sandbox makes it undefined, not an error
        "{% for x in [{'a': 1}, [1]] | map('dictsort') %}[{{ loop.last }}]{% endfor %}{{ messages[0].content }}",
    ],
)
def test_template_oddities_render_or_fail_as_apply_chat_template_does(demo_tokenizer, template):
    from sftdist.data.samples import assistant_char_spans
    from sftdist.data.template import ChatTemplate

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    try:
        expected = demo_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    except Exception:
        expected = None
    ct = ChatTemplate(demo_tokenizer, template)
    if expected is None:
        with pytest.raises(TemplateSplitError):
            assistant_char_spans(ct, messages)
    else:
        assert ct.render(messages) == expected
        with ct.one_conversation():
            assert ct.render(messages[:1], add_generation_prompt=True) is not None
            assert ct.render(messages) == expected


FLAG_TEMPLATE = (  # a template argument that changes the generation prompt, as Qwen3's enable_thinking does
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}<think></think>"
    "{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if quiet %}<think></think>{% endif %}{% endif %}"
)


def test_chat_template_arguments_reach_every_render_as_apply_chat_template_passes_them(demo_tokenizer):
    from sftdist.data.template import bind_template

    plain = encode_conversation(demo_tokenizer, CONVERSATION, chat_template=FLAG_TEMPLATE)
    quiet = encode_conversation(
        demo_tokenizer, CONVERSATION, chat_template=FLAG_TEMPLATE, chat_template_kwargs={"quiet": True}
    )
    expected = demo_tokenizer.apply_chat_template(CONVERSATION, chat_template=FLAG_TEMPLATE, tokenize=False, quiet=True)
    assert demo_tokenizer.decode(quiet["input_ids"]) == expected
    # the empty think block is the generation prompt's with the argument (context), the answer's without it
    assert [demo_tokenizer.decode(r) for r in _supervised_runs(quiet)] == [
        "2 + 3 = 5\n#### 5<|im_end|>",
        "5 + 4 = 9\n#### 9<|im_end|>",
    ]
    assert demo_tokenizer.decode(_supervised_runs(plain)[0]) == "<think></think>2 + 3 = 5\n#### 5<|im_end|>"
    ct = bind_template(demo_tokenizer, FLAG_TEMPLATE, {"quiet": True})
    assert ct is bind_template(demo_tokenizer, FLAG_TEMPLATE, {"quiet": True})  # cached per arguments
    assert ct is not bind_template(demo_tokenizer, FLAG_TEMPLATE)
    assert ct.render(CONVERSATION[:2], add_generation_prompt=True).endswith("<|im_start|>assistant\n<think></think>")


OPENS_THINK_TEMPLATE = (  # opens a think block in its generation prompt that a turn without reasoning never renders
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.reasoning_content %}<think>\n{{ m.reasoning_content }}"
    "</think>\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if not no_think %}<think>\n{% endif %}{% endif %}"
)


def test_a_template_that_cannot_serve_its_own_renders_is_refused_naming_the_argument_that_fixes_it(demo_tokenizer):
    from sftdist.data.template import check_serving
    from sftdist.errors import ConfigError

    never = OPENS_THINK_TEMPLATE.replace("<think>\n{% endif %}{% endif %}", "[A]{% endif %}{% endif %}")
    with pytest.raises(ConfigError) as refused:  # neither an answer with reasoning nor one without continues "[A]"
        check_serving(demo_tokenizer, never, {})
    message = str(refused.value)
    assert "cannot serve its own renders: its generation prompt ends '[A]' where the assistant turn it" in message
    assert "(an answer without reasoning) renders 'PROBE_A1<|im_end|>" in message
    assert "'data.chat_template_kwargs={no_think: true}' makes it consistent" in message
    check_serving(demo_tokenizer, never, {"no_think": True})
    check_serving(demo_tokenizer, demo_tokenizer.chat_template, {})
    with pytest.raises(ConfigError, match="no template argument \\(true or false\\) fixes it"):
        check_serving(demo_tokenizer, never.replace("not no_think", "true"), {})


def test_a_template_that_serves_answers_with_reasoning_only_rejects_the_others_as_not_servable(demo_tokenizer, caplog):
    from sftdist.data.template import check_serving

    with caplog.at_level("WARNING"):
        check_serving(demo_tokenizer, OPENS_THINK_TEMPLATE, {})  # said, not refused: reasoning data serves
    assert "cannot serve some of its own renders" in caplog.text and "{no_think: true}" in caplog.text
    question = {"role": "user", "content": "2+2?"}
    thought = {"role": "assistant", "content": "4", "reasoning_content": "two and two"}
    encode_conversation(demo_tokenizer, [question, thought], chat_template=OPENS_THINK_TEMPLATE)
    with pytest.raises(TemplateSplitError, match="the generation prompt ends .<think>.n. where the turn") as err:
        encode_conversation(demo_tokenizer, [question, {"role": "assistant", "content": "4"}], OPENS_THINK_TEMPLATE)
    assert err.value.reason == "not_servable"


def test_the_fix_named_serves_both_kinds_and_may_flip_an_argument_the_run_set(demo_tokenizer, caplog):
    from sftdist.data.template import bind_template, check_serving

    # `quiet` closes an empty block in the prompt and in answers without reasoning: those then serve, and answers
    # with reasoning no longer do; `no_think` opens no block at all: both serve
    moves = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.reasoning_content %}<think>\n{{ m.reasoning_content }}</think>\n"
        "{% elif quiet %}<think></think>{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% if quiet %}<think></think>{% elif not no_think %}"
        "<think>\n{% endif %}{% endif %}"
    )
    assert bind_template(demo_tokenizer, moves, {"quiet": True}).serving_problem(False) is None  # (it fixes one kind)
    with caplog.at_level("WARNING"):
        check_serving(demo_tokenizer, moves, {})
    assert "{no_think: true}" in caplog.text and "quiet" not in caplog.text  # (quiet moves the problem)
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_serving(demo_tokenizer, moves, {"no_think": False})  # the run's own argument, flipped
    assert "'data.chat_template_kwargs={no_think: true}' makes it consistent" in caplog.text


def test_reasoning_a_template_does_not_render_is_counted_as_dropped(demo_tokenizer):
    from sftdist.data.template import bind_template

    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "r"}]
    chatml = bind_template(demo_tokenizer, demo_tokenizer.chat_template)
    thinking = bind_template(demo_tokenizer, THINKING_TEMPLATE)
    assert not chatml.caps.reasoning and thinking.caps.reasoning
    assert chatml.adapt(messages)[2] == ["reasoning_dropped"] and thinking.adapt(messages)[2] == []
    assert chatml.adapt(messages[:1] + [{"role": "assistant", "content": "4"}])[2] == []


GLM_TOKENS = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<think>", "</think>"]
GLM_TOKENS += ["<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"]
GLM_TOKENS += ["<tool_response>", "</tool_response>", "<|endoftext|>"]


def test_glm_answers_end_on_the_header_that_follows_them_which_export_makes_a_stop_token():
    """GLM-4.5 writes no end-of-turn marker: the next header (<|user|>, or <|observation|> after a tool call) is the
    stop a server uses. It is trained at the end of each answer (after the last one too), and the export's stop
    tokens name both."""
    from helpers import TEST_DATA, tiny_tokenizer
    from sftdist.data.template import bind_template
    from sftdist.run.export import stop_token_ids

    template = (TEST_DATA / "chat_templates" / "glm4moe.jinja").read_text()
    tokenizer = tiny_tokenizer(GLM_TOKENS, eos="<|endoftext|>", template=template)
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2}}}
    messages = [
        {"role": "user", "content": "Add 2."},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "It is 4."},
    ]
    enc = encode_conversation(tokenizer, messages)
    runs = [tokenizer.decode(r) for r in _supervised_runs(enc)]
    assert runs[0].endswith("</tool_call><|observation|>") and runs[1] == "It is 4.<|user|>"  # (empty think masked)
    assert tokenizer.decode(enc["input_ids"]).endswith("It is 4.<|user|>")  # the stop after the last answer
    caps = bind_template(tokenizer, template).caps
    assert (caps.answer_stop, caps.call_stop) == ("<|user|>", "<|observation|>")
    talk = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    talk += [{"role": "user", "content": "More"}, {"role": "assistant", "content": "Sure"}]
    talked = encode_conversation(tokenizer, talk)
    assert [tokenizer.decode(r) for r in _supervised_runs(talked)] == [
        "Hello<|user|>",
        "Sure<|user|>",
    ]
    from sftdist.cli.inspect import role_token_counts  # (sftdist-inspect: the trained headers are the assistant's)

    counts = role_token_counts(
        bind_template(tokenizer, template),
        tokenizer,
        {"messages": talk, "tools": None},
        talked["input_ids"],
        talked["labels"],
    )
    assert counts["user"][1] == 0 and sum(n for n, _ in counts.values()) == len(talked["input_ids"])
    # the last answer with reasoning (the re-render after a user turn would drop it), and one ending on a tool call
    thought = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "reasoning_content": "r"}]
    runs = [tokenizer.decode(r) for r in _supervised_runs(encode_conversation(tokenizer, thought))]
    assert runs == ["\n<think>r</think>\nHello<|user|>"]
    runs = [tokenizer.decode(r) for r in _supervised_runs(encode_conversation(tokenizer, messages[:2]))]
    assert len(runs) == 1 and runs[0].endswith("</tool_call><|observation|>")
    ends = {str(r[-1]): 1 for r in _supervised_runs(enc)}
    user, observation = tokenizer.convert_tokens_to_ids(["<|user|>", "<|observation|>"])
    assert sorted(stop_token_ids(tokenizer, ends, current=None)) == sorted([user, observation])


def test_a_template_with_an_end_of_turn_token_trains_no_header(demo_tokenizer):
    from sftdist.data.template import bind_template

    caps = bind_template(demo_tokenizer, demo_tokenizer.chat_template).caps
    assert caps.answer_stop == caps.call_stop == ""
    enc = encode_conversation(demo_tokenizer, CONVERSATION)
    assert [demo_tokenizer.decode(r) for r in _supervised_runs(enc)] == [
        "2 + 3 = 5\n#### 5<|im_end|>",
        "5 + 4 = 9\n#### 9<|im_end|>",
    ]
    assert demo_tokenizer.decode(enc["input_ids"]).endswith("#### 9<|im_end|>\n")  # nothing appended
