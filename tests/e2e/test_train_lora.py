"""LoRA (model.lora.*) on one process: the demo learns with the base frozen bit for bit, only the adapters train and are
checkpointed, a stopped run resumes exactly, and both exports (the adapter in peft's format, the merged model) give
the trained model's logits."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import bitwise_equal, compose, fit_and_close, read_metrics, save_tiny_model
from sftdist.config import LoRAConfig
from sftdist.errors import ConfigError
from sftdist.model import build_model
from sftdist.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, base_name, is_adapter
from sftdist.run.export import export_checkpoint
from sftdist.training import Trainer

LORA = (
    "model.lora.enabled=true",
    "data.demo_size=300",
    "train.global_batch_size=8",
    "train.max_steps=12",
    "checkpoint.every_steps=4",
    "checkpoint.keep=3",
    "eval.every_steps=6",
    "eval.probes.max_new_tokens=24",
    "wandb.mode=disabled",
)


def _base(trainer: Trainer) -> torch.nn.Module:
    """The run's base model as it was built, without adapters."""
    return build_model(dataclasses.replace(trainer.cfg.model, lora=LoRAConfig()), trainer.tokenizer, trainer.cfg.seed)


def adapters(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / ADAPTER_WEIGHTS))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """12 LoRA steps on the demo (dropout 0.05, the default); the trainer is kept for its model."""
    out = tmp_path_factory.mktemp("lora")
    trainer = Trainer(compose(*LORA, f"output_dir={out}"))
    fit_and_close(trainer)
    return out, trainer


def test_lora_learns_and_the_base_weights_stay_bitwise_unchanged(lora_run):
    out, trainer = lora_run
    losses = [m["train/loss"] for m in read_metrics(out)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    base = dict(_base(trainer).named_parameters())
    trained = dict(trainer.model.named_parameters())
    frozen = {n: p for n, p in trained.items() if not is_adapter(n)}
    assert {base_name(n) for n in frozen} == set(base)
    assert all(torch.equal(p, base[base_name(n)]) and not p.requires_grad for n, p in frozen.items())
    # The optimizer holds the adapters and nothing else; they moved (B starts at zero).
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for n, p in trained.items() if is_adapter(n)}
    assert all(p.abs().sum() > 0 for n, p in trained.items() if ".lora_B." in n)


def test_the_adapter_export_loads_with_peft_and_the_merged_export_gives_its_logits(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, trainer = lora_run
    final, merged_dir = out / "final", out / "final_merged"
    config = json.loads((final / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (16, 32.0, "LORA")
    assert config["base_model_name_or_path"] is None  # the tiny demo model: rebuilt from the seed
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    for directory in (final, merged_dir):  # both serve with the trained template and stop at its end of turn
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        assert tokenizer.chat_template == trainer.tokenizer.chat_template
        stops = json.loads((directory / "generation_config.json").read_text())["eos_token_id"]
        stop_tokens = trainer.hf.stop_tokens
        assert stop_tokens and set(stop_tokens) <= set([stops] if isinstance(stops, int) else stops)
    assert not (final / "config.json").exists() and not (final / "model.safetensors").exists()

    base = _base(trainer)
    with_adapter = PeftModel.from_pretrained(base, str(final)).eval()
    loaded = {k.removeprefix("base_model.model."): v for k, v in with_adapter.state_dict().items()}
    assert bitwise_equal(loaded, {k: v for k, v in trainer.model.state_dict().items()})  # the trained model itself
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    ids = torch.tensor([trainer.train_set[i].input_ids[:64] for i in range(3)])
    with torch.no_grad():
        ours, merged_logits = (m(input_ids=ids).logits for m in (with_adapter, merged))
        untrained = _base(trainer)(input_ids=ids).logits
    assert (merged_logits - ours).abs().max() < 1e-4 < (untrained - ours).abs().max()


def test_lora_checkpoints_hold_the_adapters_and_their_optimizer_state_only(lora_run):
    import torch.distributed.checkpoint as dcp

    out, trainer = lora_run
    state = out / "checkpoints" / "step_12" / "state"
    keys = dcp.FileSystemReader(str(state)).read_metadata().state_dict_metadata
    model_keys = {k[len("model.") :] for k in keys if k.startswith("model.")}
    assert model_keys == {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    adapter_bytes = sum(p.numel() * 4 for p in trainer.model.parameters() if p.requires_grad)
    size = sum(f.stat().st_size for f in state.rglob("*") if f.is_file())
    # The adapters, two AdamW moments, and DCP's metadata (measured: 3.36x the adapters' bytes, 4.2 MB)...
    assert 3 * adapter_bytes <= size < 3.5 * adapter_bytes
    # ...where full fine-tuning's would hold every weight and its moments (41 MB for the demo model).
    assert size < 0.11 * 3 * 4 * trainer.runner.num_params


def test_a_stopped_and_resumed_lora_run_equals_the_uninterrupted_one(lora_run, tmp_path):
    out, _ = lora_run
    first = fit_and_close(Trainer(compose(*LORA, f"output_dir={tmp_path}", "train.stop_after_step=5")))
    assert first["stopped_at"] == 5
    second = Trainer(compose(*LORA, f"output_dir={tmp_path}"))
    assert second.resume_from.name == "step_5" and second.start_step == 5  # (the stop writes its checkpoint)
    fit_and_close(second)
    # Dropout (0.05) draws from the restored RNG: identical losses, bitwise adapters.
    assert [m["train/loss"] for m in read_metrics(tmp_path)] == [m["train/loss"] for m in read_metrics(out)]
    assert bitwise_equal(adapters(tmp_path), adapters(out))


def test_sftdist_export_of_a_lora_checkpoint_writes_both_exports(lora_run, tmp_path):
    out, _ = lora_run
    exported = export_checkpoint(out / "checkpoints" / "step_12", tmp_path / "exported")
    assert bitwise_equal(load_file(str(exported / ADAPTER_WEIGHTS)), adapters(out))
    merged = load_file(str(tmp_path / "exported_merged" / "model.safetensors"))
    assert bitwise_equal(merged, load_file(str(out / "final_merged" / "model.safetensors")))
    only = export_checkpoint(out / "checkpoints" / "step_12", tmp_path / "adapter-only", merged=False)
    assert (only / ADAPTER_WEIGHTS).is_file() and not (tmp_path / "adapter-only_merged").exists()


def test_lora_on_a_bf16_model_directory_exports_a_bf16_merged_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    save_tiny_model(tmp_path / "base", dtype=torch.bfloat16)
    run = tmp_path / "run"
    overrides = (*LORA[:3], "train.max_steps=2", "eval.every_steps=0", "wandb.mode=disabled", "data.max_length=512")
    args = (*overrides, f"model.name_or_path={tmp_path / 'base'}", "model.lora.target_modules=[q_proj,v_proj]")
    fit_and_close(Trainer(compose(*args, f"output_dir={run}")))
    config = json.loads((run / "final" / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert {k.split(".")[-3] for k in adapters(run)} == {"q_proj", "v_proj"}
    merged = load_file(str(run / "final_merged" / "model.safetensors"))
    assert {v.dtype for v in merged.values()} == {torch.bfloat16}
    # peft loads the adapter on the base named in its config
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(run / "final"))
    assert bitwise_equal({k: v for k, v in loaded.state_dict().items() if "lora_" in k}, _peft_keys(adapters(run)))
    # ...and so does transformers' own loading of final/ (the contract: AutoModelForCausalLM loads final/), which
    # gives the merged model's logits
    direct = AutoModelForCausalLM.from_pretrained(str(run / "final"), dtype=torch.float32)
    merged_model = AutoModelForCausalLM.from_pretrained(str(run / "final_merged"), dtype=torch.float32)
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        difference = (direct(input_ids=ids).logits - merged_model(input_ids=ids).logits).abs().max()
    assert difference < 0.05  # (the merged weights are rounded to bf16, the base's dtype)


def _peft_keys(saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors' keys as a PeftModel's state dict names them."""
    return {k.replace(".weight", ".default.weight"): v for k, v in saved.items()}


def test_lora_with_activation_checkpointing_gives_the_same_update(tmp_path):
    short = (*LORA[:3], "model.lora.dropout=0.0", "train.max_steps=2", "eval.every_steps=0", "wandb.mode=disabled")
    for name, extra in (("plain", ()), ("checkpointed", ("model.activation_checkpointing=full",))):
        fit_and_close(Trainer(compose(*short, *extra, f"output_dir={tmp_path / name}")))
    a, b = adapters(tmp_path / "plain"), adapters(tmp_path / "checkpointed")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_unknown_target_modules_are_refused_naming_the_model_layers(tmp_path):
    with pytest.raises(ConfigError, match=r"model.lora.target_modules=\['attn_q'\].*down_proj, gate_proj"):
        Trainer(compose(*LORA, "model.lora.target_modules=[attn_q]", f"output_dir={tmp_path}"))
    assert not any(tmp_path.iterdir())


def test_qlora_is_refused_on_cpu_at_start(tmp_path):
    save_tiny_model(tmp_path / "base")
    args = (*LORA, f"model.name_or_path={tmp_path / 'base'}", "model.lora.load_in_4bit=true", "device=cpu")
    with pytest.raises(ConfigError, match="load_in_4bit=true \\(QLoRA\\) needs a CUDA device"):
        Trainer(compose(*args, f"output_dir={tmp_path / 'run'}"))
    assert not (tmp_path / "run").exists()


def test_a_lora_checkpoint_of_a_tied_model_leaves_the_tied_head_out(tmp_path):
    import torch.distributed.checkpoint as dcp

    short = (*LORA[:3], "train.max_steps=1", "eval.every_steps=0", "wandb.mode=disabled")
    trainer = Trainer(compose(*short, "model.tie_word_embeddings=true", f"output_dir={tmp_path}"))
    fit_and_close(trainer)
    keys = dcp.FileSystemReader(str(tmp_path / "checkpoints" / "step_1" / "state")).read_metadata().state_dict_metadata
    saved = {k.removeprefix("model.") for k in keys if k.startswith("model.")}
    assert saved == {n for n, p in trainer.model.named_parameters() if p.requires_grad}  # not lm_head.weight


def test_a_changed_base_model_is_refused_by_resume_and_by_the_merged_export(tmp_path):
    """A LoRA checkpoint holds the adapters only: resuming or merging onto other base files would silently be wrong."""
    import os

    from sftdist.run.checkpoint import CheckpointError
    from sftdist.run.export import ExportError

    save_tiny_model(tmp_path / "base")
    args = (*LORA[:3], "train.max_steps=2", "eval.every_steps=0", "wandb.mode=disabled", "data.max_length=512")
    args = (*args, f"model.name_or_path={tmp_path / 'base'}", f"output_dir={tmp_path / 'run'}")
    fit_and_close(Trainer(compose(*args, "train.stop_after_step=1")))
    weights = tmp_path / "base" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten, say
    with pytest.raises(CheckpointError, match="base model files"):
        Trainer(compose(*args))
    checkpoint = tmp_path / "run" / "checkpoints" / "step_1"
    with pytest.raises(ExportError, match="the base model's files .* changed since this adapter was trained"):
        export_checkpoint(checkpoint, tmp_path / "exported")
    export_checkpoint(checkpoint, tmp_path / "exported", merged=False)  # the adapter alone is still right
    assert (tmp_path / "exported" / ADAPTER_WEIGHTS).is_file()


def test_an_export_without_the_merged_model_removes_an_earlier_one(lora_run, tmp_path):
    out, _ = lora_run
    checkpoint = out / "checkpoints" / "step_12"
    export_checkpoint(checkpoint, tmp_path / "exported")
    assert (tmp_path / "exported_merged").is_dir()
    export_checkpoint(checkpoint, tmp_path / "exported", merged=False)
    assert not (tmp_path / "exported_merged").exists()  # it would pass for this adapter's merge
