"""The single-process loop on a CUDA device: same first loss as on CPU, and bf16 learns."""

from __future__ import annotations

import pytest

from helpers import compose, fit_and_close, read_metrics
from sftdist.training import Trainer

GOLDEN_FIRST_LOSS = 6.1755  # the CPU value (tests/e2e/test_train_demo.py)


def test_demo_on_cuda_matches_cpu_in_fp32_and_learns_in_bf16(tmp_path):
    fp32 = Trainer(
        compose(
            f"output_dir={tmp_path / 'fp32'}",
            "device=cuda",
            "train.max_steps=1",
            "eval.every_steps=0",
            "wandb.mode=disabled",
        )
    )
    assert fp32.device.type == "cuda"
    fit_and_close(fp32)
    assert read_metrics(tmp_path / "fp32")[0]["train/loss"] == pytest.approx(GOLDEN_FIRST_LOSS, rel=1e-4)

    fit_and_close(
        Trainer(
            compose(
                f"output_dir={tmp_path / 'bf16'}",
                "device=cuda",
                "precision=bf16",
                "train.max_steps=30",
                "eval.every_steps=0",
                "wandb.mode=disabled",
            )
        )
    )
    metrics = read_metrics(tmp_path / "bf16")
    assert metrics[-1]["train/loss"] < 0.4 * metrics[0]["train/loss"]
