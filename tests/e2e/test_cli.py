"""sftdist-train as users run it: a subprocess with Hydra overrides, W&B offline, clear failures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import assert_real_plot, html_images, read_metrics, wandb_history

REQUIRED_METRICS = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/supervised_tokens"}


def _sftdist_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("sftdist-train", path=os.path.dirname(sys.executable)) or "sftdist-train"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


EVAL_METRICS = {
    "eval/loss",
    "eval/format_pass_rate",
    "eval/format/regex",
    "eval/format/stops",
    "eval/repetition_rate",
    "eval/distinct_2",
    "eval/eos_rate",
    "eval/response_tokens",
}


def test_the_default_demo_learns_and_leaves_the_contract_outputs(default_demo):
    out, proc = default_demo
    metrics = read_metrics(out)
    assert len(metrics) == 200 and all(REQUIRED_METRICS <= m.keys() for m in metrics)
    first, last = metrics[0]["train/loss"], metrics[-1]["train/loss"]
    assert last < 0.2 * first, (first, last)
    assert OmegaConf.load(out / "config.yaml").train.max_steps == 200
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in (out / "final").iterdir()
    }
    assert "step 200/200" in proc.stdout  # not a TTY: plain progress lines instead of a bar


def test_the_default_demo_learns_its_answer_format_and_logs_every_eval_metric(default_demo):
    """Evals before training (step 0) and every 50 steps: every probe metric in metrics.jsonl and in W&B's own
    files; the demo's format (the "#### <number>" line, then the end of the turn) goes from none to nearly all."""
    out, _ = default_demo
    evals = [m for m in read_metrics(out, baseline=True) if "eval/loss" in m]
    assert [m["step"] for m in evals] == [0, 50, 100, 150, 200]
    assert all(EVAL_METRICS <= m.keys() for m in evals)
    rates = [m["eval/format_pass_rate"] for m in evals]
    assert rates[0] <= 0.2 and rates[-1] >= 0.9, rates
    assert evals[0]["eval/eos_rate"] < evals[-1]["eval/eos_rate"]
    history = wandb_history(out)
    logged = {key for row in history for key in row}
    assert (REQUIRED_METRICS | EVAL_METRICS) <= logged and "eval/probe_samples/nrows" in logged
    tables = [row for row in history if "eval/probe_samples/nrows" in row]  # appended to, not re-logged whole
    assert [t["eval/probe_samples/increment_num"] for t in tables] == [0, 1, 2, 3, 4]  # 16 new rows each time
    assert [t["eval/probe_samples/nrows"] for t in tables] == [16, 32, 48, 64, 80]
    assert [row["eval/format_pass_rate"] for row in history if "eval/format_pass_rate" in row] == rates
    probes = [json.loads(line) for line in (out / "probes.jsonl").read_text().splitlines()]
    assert len(probes) == 5 * 16 and {p["step"] for p in probes} == {0, 50, 100, 150, 200}
    last = [p for p in probes if p["step"] == 200]
    assert sum(p["passed"] for p in last) / 16 == rates[-1] and all(
        set(p["checks"]) == {"regex", "stops"} for p in last
    )


def test_sftdist_report_plots_the_default_demo(default_demo, tmp_path):
    out, _ = default_demo
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "sftdist-report"), str(out), "--out", str(tmp_path / "report")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    written = [line.split("wrote ", 1)[1] for line in proc.stdout.splitlines() if " wrote " in line]
    names = {Path(p).name for p in written}
    assert {"loss.png", "format_pass_rate.png", "eos_rate.png", "lr.png", "report.html"} <= names
    for path in written:
        if path.endswith(".png"):
            assert_real_plot(Path(path))
    assert set(html_images(tmp_path / "report" / "report.html")) == names - {"report.html"}
    assert "no curriculum plot" in proc.stdout  # the demo has no curriculum: said, not drawn blank


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "train.global_batch_sizee=8",
            "sftdist-train: config error: unknown key train.global_batch_sizee (did you mean train.global_batch_size?)",
        ),
        ("strateg=fsdp2", "sftdist-train: config error: unknown key strateg (did you mean strategy?)"),
        ("+train.foo=1", "sftdist-train: config error: unknown key train.foo; valid keys under train: max_steps"),
        ("train.max_steps=abc", "full_key: train.max_steps"),
        ("precision=fp16", "sftdist-train: config error: precision='fp16' is not one of: fp32, bf16"),
        (
            "strategy=fsdp2",
            "sftdist-train: error: strategy=fsdp2 needs a process group, but this process was not started by torchrun",
        ),
        (
            "data.path=/nonexistent.jsonl",
            "sftdist-train: error: data.path='/nonexistent.jsonl': no such file or directory",
        ),
    ],
)
def test_mistakes_fail_at_start_with_a_message_naming_the_key(tmp_path, override, message):
    proc = _sftdist_train(f"output_dir={tmp_path / 'run'}", override, cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    if "config error" in message:  # one line, exit status 2 (a value of the wrong type is still Hydra's message)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_cfg_job_prints_the_composed_config(tmp_path):
    proc = _sftdist_train("train.lr=0.5", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert OmegaConf.create(proc.stdout).train.lr == 0.5
    assert not list(tmp_path.iterdir())  # printing the config writes nothing


def test_a_sweep_needs_an_output_dir_per_job(tmp_path):
    common = ("-m", "seed=0,1", "train.max_steps=1", "eval.every_steps=0", "data.demo_size=100", "wandb.mode=disabled")
    shared = _sftdist_train(*common, f"output_dir={tmp_path / 'same'}", cwd=tmp_path)
    assert shared.returncode == 2 and "is shared by several jobs of this multirun" in shared.stderr
    apart = _sftdist_train(*common, f"output_dir={tmp_path}/s${{seed}}", cwd=tmp_path)
    assert apart.returncode == 0, apart.stderr[-2000:]
    assert (tmp_path / "s0" / "final").is_dir() and (tmp_path / "s1" / "final").is_dir()


@pytest.mark.parametrize(
    "override",
    [
        "precision=fp16",
        "data.path=/nonexistent.jsonl",
        "model.name_or_path=/nonexistent",
        "model.name_or_path=/tmp",  # a directory, but not a model's
        "data.chat_template=/nonexistent.jinja",
        "data.prepared=/tmp",
        "strategy=zero3 strategy.deepspeed_config=/nonexistent.json",
    ],
)
def test_check_finds_the_runs_own_start_errors_without_training(tmp_path, override):
    """``--check`` (what slurm/sft.sh runs before srun) fails with the line the run itself fails with at start."""
    checked = _sftdist_train("--check", f"output_dir={tmp_path / 'run'}", *override.split(), cwd=tmp_path)
    assert checked.returncode == 2 and checked.stdout == ""
    assert checked.stderr.startswith("sftdist-train: ") and len(checked.stderr.splitlines()) == 1
    if not override.startswith("strategy=zero3"):  # (a zero3 run stops earlier, without torchrun)
        run = _sftdist_train(f"output_dir={tmp_path / 'run'}", *override.split(), cwd=tmp_path)
        assert run.returncode == 2 and run.stderr.splitlines()[-1] == checked.stderr.strip()
    assert not (tmp_path / "run").exists()


def test_check_passes_a_good_config_and_writes_nothing(tmp_path):
    checked = _sftdist_train("--check", f"output_dir={tmp_path / 'run'}", "train.max_steps=3", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == f"sftdist-train: the config and its inputs are good (output_dir={tmp_path / 'run'})\n"
    assert not list(tmp_path.iterdir())


def test_check_given_the_launchs_world_size_refuses_what_the_processes_would(tmp_path):
    """slurm/sft.sh passes WORLD_SIZE (nodes x processes per node): a global batch the ranks cannot share, or
    strategy=none on several processes, fails before any process starts, as the run would fail at start."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    exe = shutil.which("sftdist-train", path=os.path.dirname(sys.executable))
    cases = {
        ("strategy=ddp", "3"): "train.global_batch_size=16 is not divisible by the 3 processes (world size)",
        ("strategy=none", "2"): "strategy=none trains in one process, but this was launched with WORLD_SIZE=2",
        ("strategy=fsdp2", "8"): None,
    }
    for (override, world), message in cases.items():
        proc = subprocess.run(
            [exe, "--check", override], cwd=tmp_path, env={**env, "WORLD_SIZE": world}, capture_output=True, text=True
        )
        if message is None:
            assert proc.returncode == 0, proc.stderr
        else:
            assert proc.returncode == 2 and proc.stderr.startswith(f"sftdist-train: error: {message}"), proc.stderr
