"""A curriculum run as one job per phase (sftdist.cli.phases, behind slurm/curriculum.sh): the phases' step ranges
are the trainer's, each job's config is the run's with its phase's overrides and stop, and an override that
would change the run is refused before anything is submitted, naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sftdist.cli.phases import plan_phases
from sftdist.config import ConfigError
from sftdist.curriculum.sampler import CurriculumSampler, config_phases

RUN = ["curriculum=three_phase", "output_dir=runs/x"]


def test_the_phases_end_where_the_trainers_sampler_ends_them():
    ends, extras, configs = plan_phases([*RUN, "train.max_steps=200"], [])
    assert ends == [40, 120, 200]
    assert extras == [["train.stop_after_step=40"], ["resume=auto", "train.stop_after_step=120"], ["resume=auto"]]
    sampler = CurriculumSampler([0, 1, 2] * 20, config_phases(configs[0].curriculum.phases), 16, 200, seed=0)
    assert sampler.ends == ends
    assert [c.train.stop_after_step for c in configs] == [40, 120, None]  # the last job finishes the run


def test_a_phases_overrides_apply_to_its_job_only():
    _, extras, configs = plan_phases([*RUN, "resume=never"], [[], ["train.lr=5e-4", "train.micro_batch_tokens=2048"]])
    assert [c.train.lr for c in configs] == [1e-3, 5e-4, 1e-3]
    assert [c.train.micro_batch_tokens for c in configs] == [4096, 2048, 4096]
    assert extras[1][:2] == ["train.lr=5e-4", "train.micro_batch_tokens=2048"]
    # phase 1 starts as told (fresh, here); the later ones continue the run, whatever the common overrides say
    assert [c.resume for c in configs] == ["never", "auto", "auto"]


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.max_length=512", "phase 2's overrides change data.max_length 1024 -> 512"),
        ("model.num_layers=2", "phase 2's overrides change model.num_layers 4 -> 2"),
        ("train.global_batch_size=8", "train.global_batch_size 16 -> 8"),
        ("seed=1", "seed 0 -> 1"),
        ("train.max_steps=400", "train.max_steps 200 -> 400"),
        ("output_dir=elsewhere", "output_dir 'runs/x' -> 'elsewhere'"),
        ("curriculum.difficulty=length", "curriculum.difficulty 'meta' -> 'length'"),
        ("eval.every_steps=0", "the eval hold-out (eval.holdout_records, eval.every_steps=0) 64 -> 0"),
        ("eval.holdout_records=32", "eval.holdout_records, eval.every_steps=0) 64 -> 32"),
        ("strategy=zero3", "the checkpoint format (strategy) 'dcp' -> 'deepspeed'"),
    ],
)
def test_an_override_that_changes_the_run_is_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match="the phases are one run") as err:
        plan_phases(RUN, [[], [override]])
    assert message in str(err.value)


def test_plans_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="a run in phases needs a curriculum"):
        plan_phases(["curriculum=none"], [])
    with pytest.raises(ConfigError, match=r"overrides for 4 phases, but curriculum.phases has 3"):
        plan_phases(RUN, [[], [], [], ["train.lr=1e-4"]])
    with pytest.raises(ConfigError, match=r"curriculum.phases\[0\] has no step of its own at train.max_steps=2"):
        plan_phases([*RUN, "train.max_steps=2"], [])
    with pytest.raises(ConfigError, match=r"train.epochs=2.0: a run in phases needs train.max_steps"):
        plan_phases(["curriculum=three_phase", "train.epochs=2"], [])
    with pytest.raises(FileNotFoundError, match="data.path='/nope.jsonl': no such file or directory"):
        plan_phases([*RUN, "data.path=/nope.jsonl"], [])


def test_the_command_prints_the_ends_and_fails_with_one_line():
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "sftdist.cli.phases",
            "--phase",
            "",
            "--phase",
            " train.lr=1e-4  checkpoint.keep=3",
            *RUN,
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == [  # a phase's overrides split at white space, as slurm/curriculum.sh does
        "40 train.stop_after_step=40",
        "120 train.lr=1e-4 checkpoint.keep=3 resume=auto train.stop_after_step=120",
        "200 resume=auto",
    ]
    assert ok.stderr.splitlines() == ["phase 1: steps 1-40", "phase 2: steps 41-120", "phase 3: steps 121-200"]
    bad = subprocess.run(
        [sys.executable, "-m", "sftdist.cli.phases", "--phase", "", "--phase", "seed=3", *RUN],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("sftdist-train: config error: phase 2's overrides change seed 0 -> 3")
