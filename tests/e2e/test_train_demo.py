"""The embedded demo end to end: it learns, its outputs follow the contract (the session's default demo), and, in
process, the update is the same however the step is cut into micro-batches."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from helpers import REPO, compose, fit_and_close, max_relative_difference, python_in_root, read_metrics
from sftdist.data.batching import collate_packed
from sftdist.data.dataset import Sample
from sftdist.errors import ConfigError
from sftdist.run.layout import MARKER
from sftdist.run.state import TrainerState
from sftdist.training import Trainer, lr_at
from sftdist.training.nonfinite import DivergedError

REQUIRED_METRICS = {
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/tokens_per_s",
    "train/supervised_tokens",
    "train/padding_fraction",
    "train/budget_fill",
    "train/packing_efficiency",
}
# The loss of step 1 (before any update) of the default demo with seed 0 on this CPU build of torch.
# It pins data generation, tokenizer, template masking, data order and model init together.
GOLDEN_FIRST_LOSS = 6.1755


def _train(tmp_path, *overrides):
    cfg = compose(f"output_dir={tmp_path}", "wandb.mode=disabled", *overrides)
    with Trainer(cfg) as trainer:
        return trainer, trainer.fit()


def test_demo_learns(default_demo):
    """The default demo (the session's, tests/e2e/conftest.py): its first loss pins data generation, tokenizer,
    template masking, data order and model init together; each eval is lower than the one before."""
    out, _ = default_demo
    assert read_metrics(out)[0]["train/loss"] == pytest.approx(GOLDEN_FIRST_LOSS, abs=2e-4)
    evals = [m["eval/loss"] for m in read_metrics(out, baseline=True) if "eval/loss" in m]
    assert len(evals) == 5 and all(a > b for a, b in zip(evals, evals[1:])), evals


def test_run_directory_follows_the_contract(default_demo):
    out, proc = default_demo
    assert "peak lr 0.001 (the default for the tiny demo model)" in proc.stdout  # train.lr unset
    metrics = read_metrics(out)
    assert all(REQUIRED_METRICS <= m.keys() for m in metrics)
    assert all(m["train/supervised_tokens"] > 0 and m["train/tokens_per_s"] > 0 for m in metrics)
    assert all(m["train/padding_fraction"] == 0 and 0 < m["train/budget_fill"] <= 1 for m in metrics)  # packed
    assert all(m["train/packing_efficiency"] == m["train/budget_fill"] for m in metrics)  # the old key, kept
    train = compose().train  # the defaults the run used
    assert [m["train/lr"] for m in metrics] == pytest.approx([lr_at(s, train) for s in range(200)])
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.train.max_steps == 200 and saved.output_dir == str(out)
    report = json.loads((out / "data_report.json").read_text())
    assert report["records_in"] == report["records_train"] + report["records_eval"] + sum(report["rejected"].values())
    assert report["records_eval"] == 64


def test_final_is_a_hugging_face_directory_with_the_trained_weights(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path
    trainer, _ = _train(out, "train.max_steps=2", "eval.every_steps=0", "data.demo_size=200")
    final = out / "final"
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(final))
    tokenizer = AutoTokenizer.from_pretrained(str(final))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    trained = trainer.strategy.full_state_dict(trainer.model)
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    trainer.model.eval()
    with torch.no_grad():  # the trainer's model runs packed attention; one sample is a packed row of one
        packed = collate_packed([Sample(ids[0].tolist(), [-100] * ids.shape[1], {})], 64)
        assert torch.allclose(model(ids).logits, trainer.runner.logits(packed), atol=1e-5)
    assert (
        model.generation_config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    )


def test_the_readme_snippet_runs_in_the_repository_root(default_demo):
    """README's "Try the result" snippet, read from README.md now, run in the repository root (where a folder named
    like a package transformers imports broke it) on this module's demo; only the run's path is changed."""
    out, _ = default_demo
    readme = (REPO / "README.md").read_text()
    snippet = readme.split("Try the result", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert snippet.count('"outputs/sft/final"') == 2, snippet
    proc = python_in_root(snippet.replace('"outputs/sft/final"', repr(str(out / "final"))))
    assert "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n" in proc.stdout, proc.stdout


def test_chat_template_arguments_are_recorded_for_the_server_and_key_the_data(default_demo, tmp_path):
    _train(tmp_path, "train.max_steps=1", "eval.every_steps=0", "data.chat_template_kwargs={enable_thinking: false}")
    info = json.loads((tmp_path / "final" / "sftdist_training.json").read_text())
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert info["chat_template_kwargs"] == report["chat_template_kwargs"] == {"enable_thinking": False}
    assert not (tmp_path / "wandb").exists()  # wandb.mode=disabled writes nothing
    plain = json.loads((default_demo[0] / "data_report.json").read_text())
    assert plain["chat_template_kwargs"] == {}
    # the demo's template ignores the argument, but prepared data is keyed by it: a cache never mixes the two
    assert report["fingerprint"] != plain["fingerprint"]
    assert report["num_tokens"] == plain["num_tokens"]


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        _train(tmp_path / name, "train.max_steps=3", "eval.every_steps=0", f"seed={seed}")
        runs[name] = [m["train/loss"] for m in read_metrics(tmp_path / name)]
    assert runs["a"] == runs["b"]
    assert runs["a"][0] != runs["c"][0]


@pytest.mark.parametrize(
    "variant",
    [
        ("data.packing=true", "train.micro_batch_tokens=256"),
        ("data.packing=false", "train.micro_batch_tokens=4096"),
        ("data.packing=false", "train.micro_batch_tokens=256"),
    ],
    ids=["packed-small-budget", "padded", "padded-small-budget"],
)
def test_packing_and_the_micro_batch_budget_do_not_change_the_update(tmp_path, variant):
    """Invariant 1 on one process: 3 steps packed in one micro-batch per step, or packed in many, or padded,
    give the same weights up to summation order."""
    common = (
        "train.max_steps=3",
        "eval.every_steps=0",
        "train.global_batch_size=12",
        "data.max_length=256",
        "data.demo_size=300",
    )
    one, r1 = _train(tmp_path / "one", *common, "data.packing=true", "train.micro_batch_tokens=4096")
    other, r2 = _train(tmp_path / "other", *common, *variant)
    assert r1["train/micro_batches"] == 1 and one.runner.attention == "sdpa"
    if variant[1].endswith("256"):
        assert r2["train/micro_batches"] >= 4
    w1, w2 = one.strategy.full_state_dict(one.model), other.strategy.full_state_dict(other.model)
    assert max_relative_difference(w2, w1) < 1e-5  # summation order (FACTS: ~3e-6); wrong normalisations ~1e-2
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "other")
    for a, b in zip(m1, m2):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
        assert a["train/supervised_tokens"] == b["train/supervised_tokens"]
        assert a["train/padding_fraction"] == 0 and a["train/budget_fill"] > 0
        if variant[0] == "data.packing=false":  # padded rows: some padding, and the budgets hold it too
            assert 0 < b["train/padding_fraction"] < 1 and b["train/budget_fill"] <= 1 - b["train/padding_fraction"]


def test_bf16_trains_close_to_fp32(tmp_path):
    """The same samples and weights in bf16 autocast: the first loss within bf16's rounding of fp32's, and it trains.
    (Small steps: bf16 matrix products are ~10x slower than fp32 on this CPU.)"""
    common = ("train.max_steps=3", "eval.every_steps=0", "train.global_batch_size=4", "data.demo_size=200")
    losses = {}
    for precision in ("fp32", "bf16"):
        _, result = _train(tmp_path / precision, *common, f"precision={precision}")
        losses[precision] = [m["train/loss"] for m in read_metrics(tmp_path / precision)]
        assert math.isfinite(result["train/loss"])
    assert losses["bf16"][0] == pytest.approx(losses["fp32"][0], rel=2e-2) and losses["bf16"][0] != losses["fp32"][0]
    assert losses["bf16"][-1] < losses["bf16"][0]


def test_over_long_conversations_are_rejected_and_counted(tmp_path):
    trainer, _ = _train(
        tmp_path,
        "train.max_steps=1",
        "eval.every_steps=0",
        "data.max_length=60",
        "data.demo_size=300",
        "data.max_rejected_fraction=0.9",
    )
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["rejected"]["too_long"] > 0 and len(report["examples"]["too_long"]) == 5
    assert report["records_train"] + report["rejected"]["too_long"] == 300
    assert max(int(x) for x in trainer.train_set.lengths) <= 60


def test_eval_steps_are_logged_even_off_the_log_cadence(tmp_path):
    _train(tmp_path, "train.max_steps=7", "train.log_every_steps=4", "eval.every_steps=3")
    logged = {m["step"]: m for m in read_metrics(tmp_path)}
    assert sorted(logged) == [1, 3, 4, 6, 7]
    assert [s for s, m in sorted(logged.items()) if "eval/loss" in m] == [3, 6, 7]


def test_speed_options_do_not_change_the_update(tmp_path):
    """Activation checkpointing (full, through the older key, and selective), model.compile and the plain loss give
    the update of the default run; checkpointing really recomputes (each block's MLP starts twice per micro-batch) and
    compiling really compiles."""
    common = ("train.max_steps=2", "eval.every_steps=0", "data.demo_size=200")
    runs = {
        "default": (),
        "full": ("model.gradient_checkpointing=true",),
        "selective": ("model.activation_checkpointing=selective",),
        "compile": ("model.compile=true",),
        "naive loss": ("train.loss_impl=naive",),
    }
    weights, calls = {}, {}
    for name, extra in runs.items():
        with Trainer(compose(f"output_dir={tmp_path / name}", "wandb.mode=disabled", *common, *extra)) as trainer:
            mlp, count = trainer.model.model.layers[0].mlp, []
            mlp.register_forward_pre_hook(lambda *_, count=count: count.append(1))
            torch._dynamo.utils.counters.clear()
            trainer.fit()
            compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
            weights[name], calls[name] = trainer.strategy.full_state_dict(trainer.model), (len(count), compiled)
    # 2 steps of one micro-batch each; compiled code runs no Python hooks
    assert calls == {
        "default": (2, False),
        "full": (4, False),
        "selective": (4, False),
        "compile": (1, True),
        "naive loss": (2, False),
    }
    assert all(max_relative_difference(w, weights["default"]) < 1e-5 for w in weights.values())


@pytest.mark.parametrize("allowed", [0, 2])
def test_a_diverged_model_stops_the_run_with_a_checkpoint_before_export(tmp_path, allowed, caplog):
    """Every step non-finite (a model broken from the start): left out, counted, and after more than
    train.skip_nonfinite_steps in a row the run stops in one line, with a checkpoint of the weights it had."""
    trainer = Trainer(
        compose(
            f"output_dir={tmp_path}", "wandb.mode=disabled", "train.max_steps=5", "eval.every_steps=0",
            "data.demo_size=200", f"train.skip_nonfinite_steps={allowed}",
        )
    )  # fmt: skip
    with torch.no_grad():
        trainer.model.model.norm.weight.fill_(float("nan"))
    last = allowed + 1
    checkpoint = tmp_path / "checkpoints" / f"step_{last}"
    message = (
        "step 1: the loss is nan and the gradient norm nan"
        if last == 1
        else f"steps 1 to {last}: the loss or the gradient norm is not finite, {last} in a row"
    )
    with pytest.raises(DivergedError) as err:
        fit_and_close(trainer)
    assert str(err.value) == (
        f"{message} (train.skip_nonfinite_steps={allowed}); {checkpoint} holds the weights of step 0; lower "
        "train.lr, or check the data and precision"
    )
    assert isinstance(err.value, FloatingPointError) and not (tmp_path / "final").exists()
    assert [m["train/skipped_steps"] for m in read_metrics(tmp_path)] == list(range(1, last + 1))
    assert (checkpoint / MARKER).is_file() and TrainerState.read(checkpoint).nonfinite_in_a_row == last
    assert "step 1 skipped: the loss is nan and the gradient norm nan" in caplog.text
    assert "its samples: demo row " in caplog.text


def test_epochs_set_the_steps_from_the_training_set_and_the_phases_key_on_them(tmp_path):
    trainer, _ = _train(
        tmp_path, "train.epochs=2", "data.demo_size=60", "train.global_batch_size=8", "eval.every_steps=0",
        "curriculum=three_phase", "curriculum.difficulty=length", "checkpoint.every_steps=0",
    )  # fmt: skip
    samples, steps = len(trainer.train_set), math.ceil(2 * len(trainer.train_set) / 8)
    assert trainer.cfg.train.max_steps == steps and trainer.sampler.ends[-1] == steps
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert 2 <= metrics[-1]["train/epoch"] < 2 + 8 / samples
    assert OmegaConf.load(tmp_path / "config.yaml").train.max_steps == steps  # what the run used


def test_a_global_batch_larger_than_the_data_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.global_batch_size=64 is larger than the 50 training records"):
        Trainer(
            compose(
                f"output_dir={tmp_path}",
                "wandb.mode=disabled",
                "data.demo_size=50",
                "eval.every_steps=0",
                "train.global_batch_size=64",
            )
        )


def test_final_records_the_template_and_export_warns_when_it_changed(default_demo, tmp_path, caplog):
    from sftdist.data.template import template_hash
    from sftdist.run.export import check_export_template

    out, _ = default_demo
    info = json.loads((out / "final" / "sftdist_training.json").read_text())
    report = json.loads((out / "data_report.json").read_text())
    template = (out / "final" / "chat_template.jinja").read_text()
    assert info["template_hash"] == template_hash(template) == report["template_hash"]
    assert check_export_template(out / "final")
    changed = tmp_path / "final"
    shutil.copytree(out / "final", changed)
    (changed / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with caplog.at_level("WARNING"):
        assert not check_export_template(changed)
    assert "is not the one the model was trained with" in caplog.text
