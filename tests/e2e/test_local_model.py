"""model.name_or_path=DIR fine-tunes a local Hugging Face causal LM with its own tokenizer and template;
data.path=FILE reads messages records; data.chat_template=FILE overrides the template end to end."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import compose, fit_and_close, read_metrics, save_tiny_model
from sftdist.data.demo import generate_demo_conversations
from sftdist.training import Trainer

# A template that is not the tokenizer's: Zephyr-like, EOS-terminated answers.
ZEPHYR_LIKE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps({"messages": r["messages"], "meta": r["meta"]}) + "\n" for r in records))
    return path


@pytest.mark.parametrize("arch,dtype", [("qwen2", torch.float32), ("mistral", torch.bfloat16)])
def test_a_local_hf_model_fine_tunes_on_a_jsonl_file(tmp_path, arch, dtype):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    save_tiny_model(tmp_path / "model", arch, with_template=True, dtype=dtype)
    data = _write_jsonl(tmp_path / "chat.jsonl", generate_demo_conversations(200, seed=9))
    cfg = compose(
        f"output_dir={tmp_path / 'run'}",
        "wandb.mode=disabled",
        f"model.name_or_path={tmp_path / 'model'}",
        f"data.path={data}",
        "data.max_length=512",
        "train.max_steps=15",
        "train.lr=3e-3",
        "eval.every_steps=0",
    )
    with Trainer(cfg) as trainer:
        fit_and_close(trainer)
    metrics = read_metrics(tmp_path / "run")
    assert metrics[-1]["train/loss"] < 0.7 * metrics[0]["train/loss"]
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "final"))
    assert exported.config.model_type == arch and exported.config.num_hidden_layers == 2
    # Trained with fp32 masters, exported in the dtype the checkpoint came in.
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["dtype"] == str(dtype).split(".")[1]
    with safe_open(str(tmp_path / "run" / "final" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}


def test_a_tokenizer_without_a_template_needs_data_chat_template(tmp_path):
    from transformers import AutoTokenizer

    save_tiny_model(tmp_path / "model", "qwen2", with_template=False)
    data = _write_jsonl(tmp_path / "chat.jsonl", generate_demo_conversations(40, seed=1))
    common = (
        f"model.name_or_path={tmp_path / 'model'}",
        f"data.path={data}",
        "data.max_length=512",
        "train.max_steps=2",
        "eval.every_steps=0",
        "wandb.mode=disabled",
    )
    with pytest.raises(ValueError, match="has no chat template: pass data.chat_template=FILE"):
        Trainer(compose(f"output_dir={tmp_path / 'a'}", *common))
    assert not (tmp_path / "a").exists()  # a failed start leaves no trace

    (tmp_path / "t.jinja").write_text(ZEPHYR_LIKE)
    trainer = Trainer(compose(f"output_dir={tmp_path / 'b'}", *common, f"data.chat_template={tmp_path / 't.jinja'}"))
    first = trainer.train_set[0]
    text = trainer.tokenizer.decode(first.input_ids)
    assert text.startswith("<|user|>\n") and "<|im_start|>" not in text
    supervised = trainer.tokenizer.decode([t for t, lab in zip(first.input_ids, first.labels) if lab != -100])
    assert supervised.endswith("<|im_end|>") and "<|user|>" not in supervised
    fit_and_close(trainer)
    # The export serves with the template it was trained with.
    assert AutoTokenizer.from_pretrained(str(tmp_path / "b" / "final")).chat_template == ZEPHYR_LIKE


def test_generation_stops_where_the_trained_turns_end(tmp_path):
    """A template that closes turns with a token other than the tokenizer's EOS: the export stops there too."""
    from transformers import GenerationConfig

    save_tiny_model(tmp_path / "model", "qwen2", with_template=True)
    (tmp_path / "t.jinja").write_text(ZEPHYR_LIKE.replace("eos_token", "'<|endoftext|>'"))
    data = _write_jsonl(tmp_path / "chat.jsonl", generate_demo_conversations(40, seed=1))
    trainer = Trainer(
        compose(
            f"output_dir={tmp_path / 'run'}",
            f"model.name_or_path={tmp_path / 'model'}",
            f"data.path={data}",
            f"data.chat_template={tmp_path / 't.jinja'}",
            "data.max_length=512",
            "train.max_steps=1",
            "eval.every_steps=0",
            "wandb.mode=disabled",
        )
    )
    fit_and_close(trainer)
    stop = GenerationConfig.from_pretrained(str(tmp_path / "run" / "final")).eos_token_id
    ids = trainer.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert sorted(stop) == sorted(ids)


def test_a_plain_end_of_turn_token_never_becomes_a_stop_token(caplog):
    """Turns that end in an ordinary token (a marker the tokenizer splits, say): stopping there would cut
    generations wherever that token appears, so export keeps the model's own stop tokens and warns."""
    from sftdist.data.demo import load_demo_tokenizer
    from sftdist.run.export import stop_token_ids

    tokenizer = load_demo_tokenizer()
    plain, special = tokenizer.convert_tokens_to_ids(["\u010a", "<|im_end|>"])  # "\n" in byte-level BPE
    assert plain not in tokenizer.all_special_ids and plain != tokenizer.unk_token_id
    with caplog.at_level("WARNING"):
        assert stop_token_ids(tokenizer, {str(plain): 9}, current=None) is None
    assert "assistant turns do not end with special tokens (0% do" in caplog.text
    assert stop_token_ids(tokenizer, {str(special): 9, str(plain): 1}, current=None) == [special]
    # two special ends (GLM-4.5's answers end on the next header: <|user|>, or <|observation|> after a tool call)
    other = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert stop_token_ids(tokenizer, {str(special): 6, str(other): 4}, current=[7]) == [7, special, other]
    # a special end of under 1% of the turns is a stray, not a stop; one already a stop is not added twice
    assert stop_token_ids(tokenizer, {str(special): 990, str(other): 5, str(plain): 5}, current=[special]) == [special]
