"""tests/bench/gpu_suite.sh, the one call a GPU session gets: its steps fit its budget, and its dry run (every step
in a tiny CPU configuration) passes here, taking the steps in their order, so that the minutes on a GPU are not spent
on plumbing."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

from helpers import REPO

SUITE = REPO / "tests" / "bench" / "gpu_suite.sh"


def _declared() -> tuple[int, list[tuple[str, int]]]:
    text = SUITE.read_text()
    budget = int(re.search(r"^BUDGET=\$\{BUDGET:-(\d+)\}", text, re.M).group(1))
    steps = re.search(r"^STEPS=\(([^)]*)\)", text, re.M).group(1).split()
    return budget, [(name, int(limit)) for name, limit in (s.split(":") for s in steps)]


def test_the_steps_fit_the_budget_and_every_step_has_a_limit():
    budget, steps = _declared()
    assert sum(limit for _, limit in steps) <= budget <= 480  # (one device call of 8 minutes, start-up aside)
    called = re.findall(r"^\s*step (\w+) ", SUITE.read_text(), re.M)
    assert sorted(set(called)) == sorted(name for name, _ in steps)
    assert [name for name, _ in steps][:2] == ["install", "vs_trl"]  # (the figures that matter first)


def test_the_dry_run_takes_every_step_in_order_and_passes(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "SFTDIST_GPU_SUITE_DRY": "1", "OUT": str(out), "PY": str(REPO / ".venv" / "bin" / "python")}
    if not (REPO / ".venv" / "bin" / "python").is_file():
        env["PY"] = sys.executable
    done = subprocess.run(["bash", str(SUITE)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "gpu_suite.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("bench") == "gpu_suite" and "step" in r]
    assert [r["step"] for r in steps] == [name for name, _ in _declared()[1]]
    failed = [r for r in steps if r.get("rc") != 0]
    assert not failed, (failed, (out / "gpu_suite.log").read_text()[-3000:])
    versions = next(r["versions"] for r in rows if "versions" in r)
    assert versions["torch"] and versions["transformers"] and "triton" in versions
    ours = next(r for r in rows if r.get("bench") == "vs_trl" and r.get("trainer") == "sftdist")
    assert ours["attention"] == "sdpa" and ours["loss_impl"] in ("chunked", "naive")
    theirs = next(r for r in rows if r.get("bench") == "vs_trl" and r.get("trainer") == "trl")
    if importlib.util.find_spec("trl") is not None:  # (the bench extra: not in a CI install, which says so)
        assert theirs.get("documents_isolated") is False  # (measured: sdpa rows with restarting positions leak)
    else:
        assert "No module named 'trl'" in theirs["error"]
    dist = next(r for r in rows if r.get("bench") == "distributed_gpu")
    assert "error" not in dist and dist["attention"] == "sdpa", dist
    assert dist["shape"] == "model: 2 layers, hidden 64, vocabulary 503"  # (the model vs_trl built, then removed)
    assert not (out / "model").exists()
