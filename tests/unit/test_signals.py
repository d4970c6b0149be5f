"""Stop signals in a real process: the first sets the flag (and the handlers are restored after), a second one or
the timeout ends the process at once with 128 + the signal, even in a step that never ends."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

_SCRIPT = """
import signal, sys, time
from sftdist.run.signals import StopSignals
with StopSignals(timeout_s=float(sys.argv[1])) as stop:
    print("ready", flush=True)
    while stop.requested is None:
        time.sleep(0.01)
    print("requested", stop.requested, flush=True)
    if sys.argv[2] == "linger":  # a step that never ends: only a second signal or the timeout ends it
        time.sleep(120)
print("restored", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
"""


def _start(timeout_s: float, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, str(timeout_s), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "ready\n"
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_the_first_signal_sets_the_flag_and_the_handlers_are_restored_after(signum):
    proc = _start(60, "finish")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.splitlines() == [f"requested {signal.Signals(signum).name}", "restored True"]
    assert "finishing this step, then writing a checkpoint (again to stop at once)" in err


def test_a_second_signal_stops_at_once_and_a_duplicate_of_the_first_does_not():
    from sftdist.run.signals import SAME_EVENT_S

    proc = _start(60, "linger")
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline() == "requested SIGTERM\n"
    proc.send_signal(signal.SIGTERM)  # the same event, delivered again (directly and forwarded by torchrun)
    time.sleep(SAME_EVENT_S + 0.5)
    assert proc.poll() is None  # still finishing its step
    proc.send_signal(signal.SIGTERM)  # a second signal, later
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "second signal after SIGTERM: stopping at once, without a checkpoint" in err


def test_the_timeout_after_the_first_signal_stops_at_once():
    proc = _start(0.5, "linger")
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGUSR1
    assert "timeout after SIGUSR1: stopping at once, without a checkpoint" in err


_FORK_SCRIPT = """
import os, signal, time
from sftdist.run.signals import StopSignals
with StopSignals(timeout_s=60) as stop:
    pid = os.fork()
    if pid == 0:  # a worker forked during the run (datasets.map, multiprocessing), ended by its pool's SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        os._exit(7)
    _, status = os.waitpid(pid, 0)
    time.sleep(0.5)  # time for the watcher to read anything in the pipe
    print(os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, stop.requested, flush=True)
"""


def test_a_forked_worker_ended_by_sigterm_dies_and_does_not_stop_the_run():
    proc = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "True None\n"  # the child got the default action; the parent saw no signal


def test_release_all_restores_the_handlers_of_trainers_never_closed():
    """tests/conftest.py's guard: StopSignals left entered (nested, as two Trainers set up and never closed) are
    exited newest first, so the handler from before the first comes back."""
    import signal

    from sftdist.run.signals import StopSignals, release_all

    before = signal.getsignal(signal.SIGTERM)
    StopSignals(5).__enter__()
    StopSignals(5).__enter__()
    assert signal.getsignal(signal.SIGTERM) is not before
    assert release_all() == 2 and release_all() == 0
    assert signal.getsignal(signal.SIGTERM) is before
