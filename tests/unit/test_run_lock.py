"""One run per output directory (sftdist.run.lock): a second holder is refused in one line naming the first, the
kernel's lock goes with its process however it ends, and a file system without locks is said and gone past."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from sftdist.errors import ConfigError
from sftdist.run.layout import LOCK_FILE
from sftdist.run.lock import RunLock

HOLD = "import sys, time; from sftdist.run.lock import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(600)"  # noqa: E501


def _holder(directory) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_run_is_refused_naming_the_first_until_it_is_gone(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    first = _holder(tmp_path / "run")
    try:
        for attempt in (RunLock(tmp_path / "run").check, RunLock(tmp_path / "run").acquire):
            with pytest.raises(ConfigError) as info:
                attempt()
            message = str(info.value)
            assert "\n" not in message and f"output_dir='{tmp_path / 'run'}' is in use by" in message
            assert f"process {first.pid} on {socket.gethostname()}, Slurm job 4242, started " in message
    finally:
        os.kill(first.pid, signal.SIGKILL)  # as kill -9 would end a run: the kernel lets go of the lock
        first.wait()
    ours = RunLock(tmp_path / "run")
    ours.acquire()
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
    ours.release()
    RunLock(tmp_path / "run").acquire()  # released: taken again (here, by another open file of this process)


def test_check_writes_nothing_and_other_ranks_hold_nothing(tmp_path):
    RunLock(tmp_path / "run").check()
    RunLock(tmp_path / "other", held=False).acquire()
    assert not (tmp_path / "run").exists() and not (tmp_path / "other").exists()


def test_a_file_system_without_locks_is_said_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    import fcntl

    def no_locks(*_):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)  # (no such file system here: NFSv3 without lockd, say)
    RunLock(tmp_path / "run").acquire()
    assert "this file system does not lock files (No locks available)" in caplog.text
