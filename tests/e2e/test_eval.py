"""What an eval measures beyond the demo: held-out probes with checks from their reference answers (tool calls
included), the loss per source and on extra eval sets, the probe set in sftdist-inspect, and a W&B start-up that
cannot hang a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TEST_DATA, compose, fit_and_close, read_metrics, save_tiny_model, wandb_history
from sftdist.data.demo import generate_demo_conversations
from sftdist.training import Trainer

GLAIVE = TEST_DATA / "glaive_toolcall_40.json"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """A tiny model, the vendored Glaive tool-call records and demo arithmetic as two sources, and an extra eval
    set never trained on."""
    tmp = tmp_path_factory.mktemp("eval")
    save_tiny_model(tmp / "model", max_position_embeddings=2048)
    demo = tmp / "arith.jsonl"
    demo.write_text("".join(json.dumps(r) + "\n" for r in generate_demo_conversations(120, seed=5)))
    calls = tmp / "calls.jsonl"  # Glaive conversations up to their first function call: answers that are tool calls
    records = json.loads(GLAIVE.read_text())
    for r in records:
        turns = r["conversations"]
        r["conversations"] = turns[: next((i + 1 for i, t in enumerate(turns) if t["from"] == "function_call"), 0)]
    calls.write_text("".join(json.dumps(r) + "\n" for r in records if r["conversations"]))
    general = tmp / "general.jsonl"
    general.write_text("".join(json.dumps(r) + "\n" for r in generate_demo_conversations(30, seed=77)))
    return tmp, calls, demo, general


def test_held_out_probes_per_source_loss_and_an_extra_eval_set(two_sources, tmp_path):
    tmp, calls, demo, general = two_sources
    run = tmp_path / "run"
    trainer = Trainer(
        compose(
            f"output_dir={run}",
            f"model.name_or_path={tmp / 'model'}",
            f"data.sources=[{{path: {calls}, name: glaive}}, {{path: {demo}, name: arith}}]",
            "data.max_length=2048",
            "train.max_steps=2",
            "train.global_batch_size=8",
            "eval.every_steps=2",
            "eval.holdout_records=24",
            "eval.probes.num=10",
            "eval.probes.max_new_tokens=8",
            f"eval.sources=[{{path: {general}, name: general}}]",
            "wandb.mode=disabled",
        )
    )
    probes = trainer.evaluator.probes
    assert len(probes) == 10 and all(p.prompt_ids and p.reference for p in probes)
    for probe in probes:  # the prompt is everything before the last trained answer, as trained
        assert trainer.tokenizer.decode(probe.prompt_ids).endswith("<|im_start|>assistant\n")
        assert probe.checks["stops"] is True and probe.checks["min_words"] <= probe.checks["max_words"]
    tool_calls = [p for p in probes if "tool_call" in p.checks]
    assert tool_calls and all(p.tools[0]["name"] in p.reference for p in tool_calls)  # Glaive's function calls
    fit_and_close(trainer)
    evals = [m for m in read_metrics(run, baseline=True) if "eval/loss" in m]
    assert [m["step"] for m in evals] == [0, 2]
    for m in evals:
        assert {"eval/loss/glaive", "eval/loss/arith", "eval/general/loss", "eval/format_pass_rate"} <= m.keys()
        assert (
            min(m["eval/loss/glaive"], m["eval/loss/arith"])
            <= m["eval/loss"]
            <= max(m["eval/loss/glaive"], m["eval/loss/arith"])
        )
    rows = [json.loads(line) for line in (run / "probes.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(r["tokens"] <= 8 for r in rows)
    assert all(r["checks"].keys() == probes[i % 10].checks.keys() for i, r in enumerate(rows))


def test_inspect_shows_the_probe_set_and_its_checks(tmp_path):
    proc = subprocess.run(
        [str(BIN / "sftdist-inspect"), "--samples", "0"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "probes: 16 from the demo's probe set, up to 128 new tokens each" in proc.stdout
    assert 'demo-1-medium: regex="(^|\\\\n)#### -?\\\\d+\\\\s*$", stops=true' in proc.stdout


def test_a_failed_online_wandb_start_up_warns_and_logs_offline(tmp_path):
    """No network (a W&B server address that refuses connections) and an unknown key: the start-up gives up after
    wandb.init_timeout_s, says so, and the run trains on, logging to an offline W&B run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {"WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    proc = subprocess.run(
        [
            str(BIN / "sftdist-train"),
            f"output_dir={tmp_path / 'run'}",
            "wandb.mode=online",
            "wandb.init_timeout_s=3",  # (refused at once or timed out: the same warning)
            "train.max_steps=2",
            "eval.every_steps=0",
            "data.demo_size=100",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,  # a hang fails the test
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B: the online start-up failed" in proc.stdout and "logging offline instead" in proc.stdout
    assert [row["train/loss"] for row in wandb_history(tmp_path / "run")] == [
        m["train/loss"] for m in read_metrics(tmp_path / "run")
    ]
