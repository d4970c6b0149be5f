"""Launching the distributed scenarios (tests/distributed/scenarios.py) under torchrun, and their test data."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from helpers import REPO
from sftdist.data.demo import generate_demo_conversations

SCENARIOS = REPO / "tests" / "distributed" / "scenarios.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"


def load_scenarios():
    """tests/distributed/scenarios.py as a module (its settings, for the single-process references)."""
    spec = importlib.util.spec_from_file_location("scenarios", SCENARIOS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_uneven_data(path: Path) -> str:
    """Demo conversations, every fifth one four conversations long: steps whose samples, micro-batches and
    ranks carry very different token counts."""
    convs = generate_demo_conversations(60, seed=3)
    lines = []
    for i, conv in enumerate(convs):
        messages = conv["messages"]
        if i % 5 == 0:
            for other in convs[(i + 1) % 60], convs[(i + 2) % 60], convs[(i + 3) % 60]:
                messages = messages + [m for m in other["messages"] if m["role"] != "system"]
        lines.append(json.dumps({"messages": messages, "meta": conv["meta"]}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def torchrun_env(**extra: str) -> dict:
    """The test session's environment for a launch, with the working directory first on the workers' sys.path as a
    user's has it (PYTHONSAFEPATH would hide a folder of the checkout that shadows a dependency)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    return {**env, "PYTHONPATH": str(REPO / "tests"), "OMP_NUM_THREADS": "1", **extra}


def launch_scenarios(
    out: Path, data: str, *torchrun_args: str, only: str | None = None, timeout: int = 900, **env: str
) -> dict:
    """Run the scenarios under torchrun (two processes unless ``torchrun_args`` say otherwise) and return their
    results; a launch that fails shows its stderr."""
    args = torchrun_args or ("--standalone", "--nproc_per_node=2")
    selection = [only] if only else []
    proc = subprocess.run(
        [str(TORCHRUN), *args, str(SCENARIOS), str(out), data, *selection],
        env=torchrun_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    name = f"results-{only}.json" if only else "results.json"
    return {**json.loads((out / name).read_text()), "_stderr": proc.stderr}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scenario_ok(result: dict) -> dict:
    """A scenario's result, or the test fails with the scenario's traceback."""
    assert "error" not in result, result.get("traceback", result["error"])
    return result
