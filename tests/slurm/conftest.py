"""A real Slurm cluster for these tests: the one ``slurm/local_cluster.sh`` starts on this machine (two nodes on
localhost). Without one the tests are skipped, with the reason; ``.ci/run`` starts it and sets
``SFTDIST_REQUIRE_SLURM=1``, under which a missing cluster fails the tests instead."""

from __future__ import annotations

import os

import pytest

from slurm_jobs import cluster_problem


@pytest.fixture(scope="session")
def cluster():
    problem = cluster_problem()
    if problem and os.environ.get("SFTDIST_REQUIRE_SLURM") == "1":
        pytest.fail(problem)
    if problem:
        pytest.skip(problem)
