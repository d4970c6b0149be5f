"""The one torchrun launch of the distributed scenarios, shared by this suite's test files, and the
single-process runs they are compared with."""

from __future__ import annotations

import pytest

from helpers import compose, fit_and_close, record_sample_steps, signal_during_step
from launching import launch_scenarios, load_scenarios, write_uneven_data
from sftdist.trainer import Trainer

scenarios = load_scenarios()


@pytest.fixture(scope="session")
def launched(tmp_path_factory):
    """(OUT, data file, results): every scenario in one launch of two processes. Before it, the single-process
    checkpoint that the one_to_two scenario resumes on two processes."""
    out = tmp_path_factory.mktemp("dist")
    data = write_uneven_data(out / "data.jsonl")
    stopped = Trainer(compose(*scenarios.common(out, data), *scenarios.RESUME, f"output_dir={out / 'single-stopped'}"))
    signal_during_step(stopped, 3)
    assert fit_and_close(stopped)["stopped_by"] == "SIGUSR1"
    return out, data, launch_scenarios(out, data)


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
