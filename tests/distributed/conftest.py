"""The one torchrun launch of the distributed scenarios, shared by this suite's test files, and the
single-process runs they are compared with."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import compose, fit_and_close, record_sample_steps, save_tiny_model, signal_during_step
from launching import launch_scenarios, load_scenarios, write_uneven_data
from sftdist.data.demo import generate_demo_conversations
from sftdist.training import Trainer

scenarios = load_scenarios()


@pytest.fixture(scope="session")
def launched(tmp_path_factory):
    """(OUT, data file, results): every scenario in one launch of two processes. Before it, the single-process
    checkpoint that the one_to_two scenario resumes on two processes."""
    out = tmp_path_factory.mktemp("dist")
    data = write_uneven_data(out / "data.jsonl")
    write_probe_model(out)
    save_tiny_model(out / "tied-bf16", dtype=torch.bfloat16, tie_word_embeddings=True)
    stopped = Trainer(compose(*scenarios.common(out, data), *scenarios.RESUME, f"output_dir={out / 'single-stopped'}"))
    signal_during_step(stopped, 3)
    assert fit_and_close(stopped)["stopped_by"] == "SIGUSR1"
    return out, data, launch_scenarios(out, data)


# Probes whose answers by the demo model after 25 steps end at very different lengths, in batches of 2: batch 0
# (rank 0) stops after ~14 tokens, batch 1 (rank 1) runs ~5x longer (the test checks that it does); batch 2 (rank 0,
# one probe) has no partner batch on rank 1, which runs a dummy in that round.
UNEVEN_PROBES = [
    ("short-0", "What is 7 + 5?"),
    ("short-1", "Compute 12 * 3."),
    ("long-0", "zzzz qqqq xxxx zzzz qqqq xxxx zzzz qqqq"),
    ("long-1", "~~~~ ```` |||| ~~~~ ```` |||| ~~~~"),
    ("short-2", "What is 9 - 4?"),
]


def write_probe_model(out) -> None:
    """OUT/probe-model/final (the demo model after 25 steps: some answers stop, some run on), the probes, and the
    probe scenario's second data source and extra eval set (demo conversations)."""
    for name, num, seed in (("demo.jsonl", 200, 11), ("extra-eval.jsonl", 24, 12)):
        convs = generate_demo_conversations(num, seed=seed)
        (out / name).write_text("".join(json.dumps(c) + "\n" for c in convs))
    fit_and_close(
        Trainer(
            compose(
                f"output_dir={out / 'probe-model'}",
                "train.max_steps=25",
                "data.demo_size=600",
                "eval.every_steps=0",
                "wandb.mode=disabled",
                f"data.cache_dir={out / 'cache'}",
            )
        )
    )
    lines = [
        {"id": i, "messages": [{"role": "user", "content": text}], "checks": {"stops": True, "regex": "#### "}}
        for i, text in UNEVEN_PROBES
    ]
    (out / "uneven-probes.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture(scope="session")
def single_lora(launched, tmp_path_factory):
    """One process, 3 LoRA steps, packed: what the 2-process LoRA fits must equal."""
    out, data, _ = launched
    run = tmp_path_factory.mktemp("single-lora")
    fit_and_close(Trainer(compose(*scenarios.common(out, data), *scenarios.LORA, f"output_dir={run}")))
    return run


@pytest.fixture(scope="session")
def single_process(launched, tmp_path_factory):
    """One process, 3 steps, packed and padded: what the 2-process fits must equal."""
    out, data, _ = launched
    runs = {}
    for packing in (True, False):
        run = tmp_path_factory.mktemp(f"single-{packing}")
        overrides = (*scenarios.common(out, data), f"data.packing={str(packing).lower()}", f"output_dir={run}")
        fit_and_close(Trainer(compose(*overrides)))
        runs[packing] = run
    return runs


@pytest.fixture(scope="session")
def single_resume_reference(launched, tmp_path_factory):
    """One process, the resume scenarios' 4 steps straight: (output_dir, [(step, sample indices), ...])."""
    out, data, _ = launched
    run = tmp_path_factory.mktemp("single-resume")
    trainer = Trainer(compose(*scenarios.common(out, data), *scenarios.RESUME, f"output_dir={run}"))
    samples = record_sample_steps(trainer)
    fit_and_close(trainer)
    return run, samples
