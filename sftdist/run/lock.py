"""One run per output directory: rank 0 holds an exclusive lock on ``OUTPUT_DIR/.sftdist.lock`` from before it writes
anything there to the end of the run, so that a second run started on the same directory (the same ``sbatch``
twice, a second terminal) is refused in one line naming the first, instead of both writing checkpoints and metrics.

The lock is the kernel's (``fcntl.flock``): it goes with the process, however it ends (``kill -9`` included), so a
resumed run, a torchrun restart and a requeued Slurm job take it again. It holds locally and on NFSv4 and on Lustre
mounted with ``flock``; where the file system has no locks, the run says so and goes on without one. The file keeps
the holder's host, process, Slurm job and start time, for the message.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

from sftdist.errors import ConfigError
from sftdist.run.layout import LOCK_FILE

log = logging.getLogger(__name__)
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}  # file systems without flock


def holder_info() -> dict[str, object]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


class RunLock:
    """``acquire()`` or raise ConfigError naming the holder; ``release()`` at the end (the kernel releases it anyway
    when the process ends). Rank 0 holds it for the run (``held``): on the other ranks both do nothing."""

    def __init__(
        self,
        output_dir: str | Path,
        held: bool = True,
        key: str = "output_dir",
        path: Path | None = None,
        holder: str = "the run",
    ):
        """``path``: the lock file (default ``output_dir/.sftdist.lock``); ``holder``: what the refusal calls the
        process that holds it."""
        self.directory = Path(output_dir)
        self.path = path if path is not None else self.directory / LOCK_FILE
        self.held, self.key, self.holder = held, key, holder
        self._file = None

    def check(self) -> None:
        """Refuse now if another run holds the lock (at start, before the set-up's minutes); takes nothing and
        writes nothing."""
        if self.held and self.path.is_file():
            with open(self.path) as f:
                if self._try(f):
                    import fcntl

                    fcntl.flock(f, fcntl.LOCK_UN)

    def acquire(self) -> None:
        """Take the lock before anything is written to the directory (which it creates) and write the holder in."""
        if not self.held or self._file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held open until release()
        if not self._try(f):
            f.close()
            return
        f.seek(0)
        f.truncate()
        f.write(json.dumps(holder_info()) + "\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # (closing the descriptor releases the lock)
            self._file = None

    def _try(self, f) -> bool:
        """True when ``f`` is now locked by us; False on a file system without locks (said in the log)."""
        import fcntl

        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(self._refusal()) from None
        except OSError as err:
            if err.errno not in _NO_LOCKS:
                raise
            log.warning(
                "%s=%s: this file system does not lock files (%s): a second process here would not be refused",
                self.key,
                self.directory,
                os.strerror(err.errno),
            )
            return False
        return True

    def _refusal(self) -> str:
        try:
            h = json.loads(self.path.read_text())
            job = f", Slurm job {h['slurm_job_id']}" if h.get("slurm_job_id") else ""
            who = f"{self.holder} of process {h['pid']} on {h['host']}{job}, started {h['started']}"
        except (OSError, ValueError, KeyError):
            who = f"another process ({self.holder.removeprefix('the ')})"
        return (
            f"{self.key}={str(self.directory)!r} is in use by {who} (it holds {self.path}): wait for it to end, "
            f"stop it, or give another {self.key}"
        )
