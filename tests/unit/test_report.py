"""sftdist-report on crafted run directories: real plots (not blank, of the stated size), a resumed run as one run,
two runs overlaid, the curriculum's phases, and one HTML page that parses and holds every plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from helpers import assert_real_plot, html_images
from sftdist.cli.report import build_report, load_run
from sftdist.errors import InputError


def _write_run(directory: Path, steps: int = 30, curriculum: bool = False, scale: float = 1.0) -> Path:
    directory.mkdir(parents=True)
    rows = [{"step": 0, "eval/loss": 6.0 * scale, "eval/format_pass_rate": 0.0, "eval/eos_rate": 0.0}]
    for step in range(1, steps + 1):
        row = {
            "step": step,
            "train/loss": scale * (6 * math.exp(-step / 10) + 0.5),
            "train/lr": 1e-3 * min(1, step / 3),
            "train/grad_norm": 3 / step,
            "train/tokens_per_s": 500 + step,
            "train/padding_fraction": 0.0,
        }
        if step % 10 == 0:
            row |= {
                "eval/loss": scale * (5 * math.exp(-step / 10) + 0.6),
                "eval/math/loss": 2.0 + step / 100,  # an extra eval set (eval.sources)
                "eval/format_pass_rate": step / steps,
                "eval/repetition_rate": 0.3 - step / 200,
                "eval/eos_rate": step / steps,
                "checkpoint/best_step": 20 if step >= 20 else step,  # (checkpoint.keep_best: best at step 20)
                "checkpoint/best": 1.5,
            }
        if curriculum:
            phase = 1 if step <= 6 else 2 if step <= 18 else 3
            weights = {1: (0.9, 0.1, 0.0), 2: (0.3, 0.5, 0.2), 3: (0.1, 0.4, 0.5)}[phase]
            row |= {"data/phase": phase} | {f"data/frac_{b}": w for b, w in zip(("easy", "medium", "hard"), weights)}
        rows.append(row)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 31, "train/lo')
    probe = {"id": "p0", "prompt": "What is 2 + 2?", "response": "2 + 2 = 4\n#### 4", "tokens": 9, "stopped": True}
    probes = [{**probe, "step": s, "passed": s > 0, "checks": {"regex": s > 0, "stops": True}} for s in (0, steps)]
    (directory / "probes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probes) + '{"step": 31, "id": "p')
    (directory / "data_report.json").write_text(json.dumps({"records_in": 100, "records_used": 98}))
    return directory


def test_a_run_gets_every_plot_it_has_data_for_and_one_html_page(tmp_path, capsys):
    run = _write_run(tmp_path / "run", curriculum=True)
    out, drawn = build_report([run])
    assert out == run / "report"
    assert drawn == [
        "loss",
        "format_pass_rate",
        "repetition_rate",
        "eos_rate",
        "tokens_per_s",
        "lr",
        "grad_norm",
        "padding_fraction",
        "curriculum",
    ]
    for name in drawn:
        assert_real_plot(out / f"{name}.png")
    images = html_images(out / "report.html")
    assert set(images) == {f"{name}.png" for name in drawn}
    assert all(src.startswith("data:image/png;base64,") and len(src) > 5000 for src in images.values())
    page = (out / "report.html").read_text()
    assert "first -&gt; last eval/format_pass_rate" in page and "0 -&gt; 1" in page
    assert "<th>best checkpoint (checkpoint.keep_best)</th><td>step 20 (1.5)</td>" in page  # (and marked on loss.png)
    assert "Probe answers of run at step 30" in page and "#### 4" in page and "records_used" in page
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(drawn) + 1 and all(line.startswith("sftdist-report: wrote ") for line in printed)


def test_two_runs_overlaid_and_plots_without_data_said_not_drawn(tmp_path, capsys):
    a, b = _write_run(tmp_path / "a"), _write_run(tmp_path / "b", scale=1.3)
    out, drawn = build_report([a, b], tmp_path / "compare")
    assert "curriculum" not in drawn and "no curriculum plot" in capsys.readouterr().out
    for name in drawn:
        assert_real_plot(out / f"{name}.png")
    page = (out / "report.html").read_text()
    assert "<h2>a</h2>" in page and "<h2>b</h2>" in page


def test_a_resumed_run_is_one_run(tmp_path):
    """After a resume metrics.jsonl holds one row per step (the rows after the checkpoint are replaced); a row cut
    by a kill is skipped."""
    run = load_run(_write_run(tmp_path / "run"))
    assert [r["step"] for r in run.rows] == list(range(31)) and run.extra_eval_sets() == ["math"]
    assert run.series("eval/loss")[0] == [0, 10, 20, 30]
    assert [p["step"] for p in run.probes] == [0, 30]  # the probe row cut by the kill is left out too


def test_a_directory_that_is_no_run_is_refused(tmp_path):
    with pytest.raises(InputError, match="no metrics.jsonl"):
        build_report([tmp_path])
    run = _write_run(tmp_path / "run")
    (run / "data_report.json").write_text('{"records_in": 1')
    with pytest.raises(InputError, match="data_report.json: not valid JSON"):
        build_report([run])
