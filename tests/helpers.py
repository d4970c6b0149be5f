"""Test helpers shared by the suites (importable as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
import string
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"  # the workplace's shared data; tests that need it skip without it
TEST_DATA = REPO / "tests" / "data"  # small vendored copies (see tests/data/README.md)


def compose(*overrides: str):
    """The validated SFTConfig that ``sftdist-train OVERRIDES`` would train with."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from sftdist.config import register_configs, to_schema

    register_configs()
    with initialize_config_module(config_module="sftdist.conf", version_base="1.3"):
        return to_schema(hydra_compose(config_name="sft", overrides=list(overrides)))


def python_in_root(code: str, *path_folders: Path):
    """``python -c code`` in the repository root, as a user runs a snippet or ``python -m`` there (the root first on
    sys.path), with ``path_folders`` after it; the test fails with its stderr unless it succeeds."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in path_folders)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_metrics(output_dir: Path, baseline: bool = False) -> list[dict]:
    """metrics.jsonl's rows of the training steps; with ``baseline``, the eval before training (step 0) too."""
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if baseline or row["step"] > 0]


def wandb_history(output_dir: Path) -> list[dict]:
    """The history rows (``{key: value}``) of a run's offline W&B run, read back from W&B's own .wandb file (a
    LevelDB-style log of protobuf records), not from what sftdist logged."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = Path(output_dir).glob("wandb/offline-run-*/run-*.wandb")
    data, block, position, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", "not a W&B data file"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        if kind == 1:  # a whole record
            records.append(chunk)
        elif kind in (2, 3):  # its first or a middle part
            pending = chunk if kind == 2 else pending + chunk
        elif kind == 4:  # its last part
            records.append(pending + chunk)
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.HasField("history"):
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def tiny_tokenizer(
    specials: list[str],
    *,
    bos: str | None = None,
    eos: str | None = None,
    metaspace: bool = False,
    template: str | None = None,
    vocab_size: int = 600,
):
    """A small BPE tokenizer trained here (no hub): byte-level like Llama-3/Qwen, or SentencePiece-style
    metaspace like Mistral, with a template's special tokens added as single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sftdist.data.demo import generate_demo_conversations

    tok = Tokenizer(models.BPE(unk_token=None))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        glaive = TEST_DATA / "glaive_toolcall_40.json"  # characters a SentencePiece vocab would cover
        alphabet = sorted(set(string.printable) | {"\u2581"} | set(glaive.read_text()))
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    corpus = [m["role"] + "\n" + m["content"] for r in generate_demo_conversations(500, seed=7) for m in r["messages"]]
    corpus += ["Hello! How can I help you today? The weather is sunny. Here is the recipe you asked for."] * 5
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, chat_template=template)


def full_grads(trainer) -> dict:
    """The full, reduced gradients by parameter name on CPU, after a step's backward and before its optimizer step,
    whatever the strategy; every rank calls it (ZeRO-3 gathers) and gets them."""
    module = trainer.strategy.unwrap(trainer.model)
    if trainer.strategy.name == "zero3":
        from deepspeed.utils import safe_get_full_grad

        grads = {name: (safe_get_full_grad(p), p.ds_shape) for name, p in module.named_parameters()}
        return {name: g.detach().cpu().reshape(shape).clone() for name, (g, shape) in grads.items() if g is not None}
    grads = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
    return {
        name: (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().cpu().clone() for name, g in grads.items()
    }


def fit_and_close(trainer) -> dict:
    """``trainer.fit()`` the way the entry point runs it: ``close()`` after, whatever happens."""
    try:
        return trainer.fit()
    finally:
        trainer.close()


def signal_during_step(trainer, step: int, signum: int | None = None, rank: int = 0) -> None:
    """Send ``signum`` (SIGUSR1) to this process while the 1-based step ``step`` trains, on rank ``rank`` only: what
    a scheduler's preemption notice does. The run is expected to stop at the end of that step."""
    import os
    import signal

    original = trainer.runner.train_step
    counter = iter(range(trainer.start_step + 1, 10**9))

    def train_step(micro_batches):
        if next(counter) == step and trainer.strategy.rank == rank:
            os.kill(os.getpid(), signum or signal.SIGUSR1)
        return original(micro_batches)

    trainer.runner.train_step = train_step


def poison_steps(trainer, steps, rank: int | None = 0) -> None:
    """The forwards of the 0-based ``steps`` give NaN (the model's final norm's output times NaN), on ``rank`` only
    (None: every rank): what one broken batch or a bf16 overflow does to a step."""
    training = {"step": None}
    feed = trainer.feed.steps

    def tracked(start, stop):
        for step, samples, micro_batches in feed(start, stop):
            training["step"] = step
            yield step, samples, micro_batches

    def hook(module, args, output):
        if training["step"] in steps and (rank is None or trainer.strategy.rank == rank):
            return output * float("nan")
        return None

    trainer.feed.steps = tracked
    trainer.strategy.unwrap(trainer.model).model.norm.register_forward_hook(hook)


def drop_steps(trainer, steps) -> None:
    """The 0-based ``steps`` never train: the run of a stream without those steps' batches."""
    feed = trainer.feed.steps
    trainer.feed.steps = lambda start, stop: (item for item in feed(start, stop) if item[0] not in steps)


def record_sample_steps(trainer) -> list:
    """[(0-based step, its sample indices), ...] of the steps the trainer trains, in order (the loop reads each step's
    samples ahead, while the step before trains: a step read but never trained, after a stop, is not in the list)."""
    seen: list = []
    read: dict = {}
    indices, steps = trainer.sampler.indices, trainer.feed.steps

    def recorded_indices(step):
        read[step] = list(indices(step))
        return read[step]

    def trained_steps(start, stop):
        for step, samples, micro_batches in steps(start, stop):
            seen.append((step, read[step]))
            yield step, samples, micro_batches

    trainer.sampler.indices, trainer.feed.steps = recorded_indices, trained_steps
    return seen


def save_tiny_model(directory, arch: str = "llama", with_template: bool = True, dtype=None, **config) -> None:
    """A tiny random causal LM of ``arch`` (llama, qwen2, mistral) with the demo tokenizer, saved as a local Hugging
    Face directory; ``config`` overrides its config (``attention_dropout=0.3``, ...)."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from sftdist.data.demo import load_demo_tokenizer

    tokenizer = load_demo_tokenizer()
    if not with_template:
        tokenizer.chat_template = None
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[arch]
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model_cls(config_cls(**{**settings, **config})).to(dtype or torch.float32).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def final_weights(run) -> dict:
    """The weights of a run's final/ export."""
    from safetensors.torch import load_file

    return load_file(str(Path(run) / "final" / "model.safetensors"))


def adapter_weights(run) -> dict:
    """The adapters of a LoRA run's final/ export."""
    from safetensors.torch import load_file

    return load_file(str(Path(run) / "final" / "adapter_model.safetensors"))


def bitwise_equal(a: dict, b: dict) -> bool:
    import torch

    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)


def max_relative_difference(a: dict, b: dict) -> float:
    """Largest per-tensor ||a - b|| / ||b||: the measure of FACTS.md. (An element-wise maximum is the wrong
    yardstick after AdamW: a gradient near eps turns summation-order noise into a visible update.)"""
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in b)


def assert_real_plot(path: Path) -> None:
    """A PNG of sftdist-report's size that is a real plot, not a blank canvas."""
    import matplotlib.image
    import numpy as np

    from sftdist.cli.report import DPI, FIGSIZE

    pixels = matplotlib.image.imread(str(path))
    assert pixels.shape[:2] == (int(FIGSIZE[1] * DPI), int(FIGSIZE[0] * DPI)), path
    assert np.std(pixels[..., :3]) > 0.05, f"{path} is (nearly) blank"


VOID_ELEMENTS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def html_images(path: Path) -> dict[str, str]:
    """The images of an HTML page ({data-file: src}), after checking that the page parses: every element closed in
    order, nothing left open."""
    from html.parser import HTMLParser

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.open: list[str] = []
            self.images: dict[str, str] = {}

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                attrs = dict(attrs)
                self.images[attrs["data-file"]] = attrs["src"]
            if tag not in VOID_ELEMENTS:
                self.open.append(tag)

        def handle_endtag(self, tag):
            assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
            self.open.pop()

    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert page.open == [], f"{path}: elements left open: {page.open}"
    return page.images
