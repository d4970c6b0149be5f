"""Stopping on SIGTERM / SIGUSR1 (what Slurm, Kubernetes and torchrun send before they kill a job).

The first signal only sets a flag. The training loop reads it at the next step boundary, where every rank agrees
(one all-reduce: a rank that got no signal stops too), writes a checkpoint and exits with :data:`EXIT_STOPPED`.
A second signal, or ``timeout_s`` after the first without the run having stopped, ends the process at once with
``128 + signal`` (the status of a process killed by that signal), even while the main thread is blocked in a
collective: a watcher thread reads the signals from CPython's wake-up pipe and calls ``os._exit``. Signals within
:data:`SAME_EVENT_S` of the first are the same event, not a second one: a scheduler that signals every process of
a job reaches a worker both directly and through torchrun, which forwards what it gets.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from sftdist.run.layout import STOPPED_FILE

# Stopped by a signal after writing a checkpoint: resume by starting the same command again (sysexits' EX_TEMPFAIL,
# "a temporary failure; the user is invited to retry").
EXIT_STOPPED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
SAME_EVENT_S = 5.0
_log = logging.getLogger(__name__)

_active: list[StopSignals] = []  # the instances catching signals in this process now (entered, not yet exited)
_fork_hook_registered = False


def _forget_in_child() -> None:
    """In a process forked while signals are caught (a datasets.map or multiprocessing worker): the default
    handlers and no wake-up fd. Otherwise the child's SIGTERM, when its pool ends it, would land in the parent's
    pipe and stop the run, and the child would outlive the SIGTERM meant to end it."""
    if not _active:
        return
    try:
        signal.set_wakeup_fd(-1)
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
    except ValueError:  # forked from a thread that is not the main one: nothing was installed in this thread
        pass
    for stop in _active:  # the child's copies of the pipe: the parent's watcher ends when every write end is closed
        for fd in stop._pipe or ():
            os.close(fd)
        stop._pipe = None
    _active.clear()


class StopSignals:
    """A context manager that catches :data:`STOP_SIGNALS` while training; restores the previous handlers after.

    ``requested`` is the name of the first signal received, or None.
    """

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.requested: str | None = None
        self._previous: dict[int, object] = {}
        self._previous_wakeup_fd = -1
        self._pipe: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        self._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        self._watcher = threading.Thread(target=self._watch, args=(read_fd,), name="sftdist-stop-signals", daemon=True)
        self._watcher.start()
        global _fork_hook_registered
        if not _fork_hook_registered:
            os.register_at_fork(after_in_child=_forget_in_child)
            _fork_hook_registered = True
        _active.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pipe is None:
            return
        if self in _active:
            _active.remove(self)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        os.close(self._pipe[1])  # the watcher reads what is left, then end-of-file, and returns
        self._watcher.join()
        if self._timer is not None:  # only now: the watcher may have started it while finishing
            self._timer.cancel()
        self._pipe = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """The Python-level handler: it only sets the flag (the watcher thread does the rest)."""
        if self.requested is None:
            self.requested = signal.Signals(signum).name

    def _watch(self, read_fd: int) -> None:
        first: float | None = None
        try:
            while chunk := os.read(read_fd, 64):
                for signum in chunk:
                    if signum not in STOP_SIGNALS:
                        continue
                    name = signal.Signals(signum).name
                    if first is None:
                        first = time.monotonic()
                        self.requested = self.requested or name
                        _say(f"{name}: finishing this step, then writing a checkpoint (again to stop at once)")
                        self._timer = threading.Timer(self.timeout_s, _exit_now, (signum, "timeout"))
                        self._timer.daemon = True
                        self._timer.start()
                    elif time.monotonic() - first > SAME_EVENT_S:
                        _exit_now(signum, "second signal")
        finally:
            os.close(read_fd)


def release_all() -> int:
    """Stop catching signals in this process: every :class:`StopSignals` still entered is exited, newest first (a
    ``Trainer`` never closed, as in a test that only sets one up). Returns how many there were."""
    left = list(_active)
    for stop in reversed(left):
        stop.__exit__(None, None, None)
    return len(left)


def _say(message: str) -> None:
    print(f"sftdist: {message}", file=sys.stderr, flush=True)


def _exit_now(signum: int, why: str) -> None:
    _say(f"{why} after {signal.Signals(signum).name}: stopping at once, without a checkpoint")
    os._exit(128 + signum)


# In output_dir, written when a stop signal ended a run (after its checkpoint), removed when a run starts: tells a
# launcher that torchrun's own exit status (1 whenever a worker exits non-zero) means "stopped, resumable".


def stopped_earlier_in_this_launch(output_dir: str | Path) -> str | None:
    """The signal that stopped this torchrun launch's workers, when this process is their restart
    (``torchrun --max-restarts``): a restart must not train on after a stop signal. None otherwise."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        return None
    try:
        info = json.loads((Path(output_dir) / STOPPED_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info.get("signal") if info.get("torchelastic_run_id") == run_id else None


def check_launcher_grace(timeout_s: float) -> None:
    """Warn when torchrun would kill the workers before ``timeout_s`` (checkpoint.stop_timeout_s) has passed
    after a stop signal: a checkpoint that takes that long would be cut short."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    grace = float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))
    if grace <= timeout_s and os.environ.get("RANK", "0") == "0":
        _say(
            f"torchrun kills the workers {grace:g} s after a stop signal (TORCH_ELASTIC_SHUTDOWN_TIMEOUT), before "
            f"checkpoint.stop_timeout_s={timeout_s:g}: a checkpoint written on a signal may be cut short; "
            "launch/torchrun.sh gives them SHUTDOWN_TIMEOUT (330 s)"
        )


def record_stop(output_dir: Path, signal_name: str, step: int, checkpoint: Path | None) -> None:
    """Write :data:`STOPPED_FILE` and say how to resume (rank 0, after the checkpoint is complete). ``checkpoint`` is
    None for a run stopped before its first step with nothing to resume from."""
    info = {
        "signal": signal_name,
        "step": step,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "exit_status": EXIT_STOPPED,
        "torchelastic_run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
    }
    (Path(output_dir) / STOPPED_FILE).write_text(json.dumps(info, indent=1) + "\n")
    where = "nothing trained yet" if checkpoint is None else f"checkpoint in {checkpoint}"
    _say(
        f"stopped by {signal_name} after step {step}, {where}: start the same command again to resume "
        f"(exit status {EXIT_STOPPED})"
    )


class StopPolicy:
    """Whether a run ends at a step boundary before ``train.max_steps``: a stop signal to any rank (one all-reduce of
    the flag, so that every rank stops at the same step), or this job's share of a longer run done
    (``train.stop_after_step``: a planned stop, the job's work done rather than cut short)."""

    def __init__(
        self, signals: StopSignals, all_sum: Callable[[list[float]], list[float]], stop_after: int | None, steps: int
    ):
        self.signals, self.all_sum, self.stop_after, self.steps = signals, all_sum, stop_after, steps

    def signalled(self) -> bool:
        """Whether any rank got a stop signal (a collective: every rank asks at the same step boundary)."""
        (count,) = self.all_sum([float(self.signals.requested is not None)])
        return count > 0

    def share_done(self, done_steps: int) -> bool:
        """Whether this job's share of the run is done after ``done_steps`` steps."""
        return self.stop_after is not None and self.stop_after < self.steps and done_steps >= self.stop_after

    def end_share(self, step: int, is_main: bool) -> dict[str, Any]:
        """What ``fit()`` returns after this job's share, checkpointed at ``step``."""
        if is_main:
            _log.info(
                "train.stop_after_step=%d: stopping with a checkpoint at step %d; the same command with another "
                "train.stop_after_step (or none) continues the run",
                self.stop_after,
                step,
            )
        return {"stopped_at": step}

    def end_signalled(self, step: int, checkpoint: Path | None, output_dir: Path, is_main: bool) -> dict[str, Any]:
        """What ``fit()`` returns after a stop signal's ``checkpoint`` at ``step`` (rank 0 records the stop)."""
        name = self.signals.requested or "a signal to another rank"
        if is_main:
            record_stop(output_dir, name, step, checkpoint)
        return {"stopped_by": name, "step": step}
