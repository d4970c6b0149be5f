"""Stopping on SIGTERM / SIGUSR1 (what Slurm, Kubernetes and torchrun send before they kill a job).

The first signal only sets a flag. The training loop reads it at the next step boundary, where every rank agrees
(one all-reduce: a rank that got no signal stops too), writes a checkpoint and exits with :data:`EXIT_STOPPED`.
A second signal, or ``timeout_s`` after the first without the run having stopped, ends the process at once with
``128 + signal`` (the status of a process killed by that signal), even while the main thread is blocked in a
collective: a watcher thread reads the signals from CPython's wake-up pipe and calls ``os._exit``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

# Stopped by a signal after writing a checkpoint: resume by starting the same command again (sysexits' EX_TEMPFAIL,
# "a temporary failure; the user is invited to retry").
EXIT_STOPPED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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
        threading.Thread(target=self._watch, args=(read_fd,), name="sftdist-stop-signals", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pipe is None:
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        if self._timer is not None:
            self._timer.cancel()
        os.close(self._pipe[1])  # the watcher reads end-of-file and returns
        self._pipe = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """The Python-level handler: it only sets the flag (the watcher thread does the rest)."""
        if self.requested is None:
            self.requested = signal.Signals(signum).name

    def _watch(self, read_fd: int) -> None:
        received = 0
        try:
            while chunk := os.read(read_fd, 64):
                for signum in chunk:
                    if signum not in STOP_SIGNALS:
                        continue
                    received += 1
                    name = signal.Signals(signum).name
                    if received == 1:
                        self.requested = self.requested or name
                        _say(f"{name}: finishing this step, then writing a checkpoint (again to stop at once)")
                        self._timer = threading.Timer(self.timeout_s, _exit_now, (signum, "timeout"))
                        self._timer.daemon = True
                        self._timer.start()
                    else:
                        _exit_now(signum, "second signal")
        finally:
            os.close(read_fd)


def _say(message: str) -> None:
    print(f"sftdist: {message}", file=sys.stderr, flush=True)


def _exit_now(signum: int, why: str) -> None:
    _say(f"{why} after {signal.Signals(signum).name}: stopping at once, without a checkpoint")
    os._exit(128 + signum)
