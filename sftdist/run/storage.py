"""Writes that fail for a reason outside the run (a full disk, a quota, permissions, a read-only or vanished mount):
one line naming what was written, where, the error and, for space, what is free there and what was needed; and the
free-space check before a checkpoint, said while the run can still be saved."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from sftdist.errors import InputError

SPACE = (errno.ENOSPC, errno.EDQUOT)  # out of space, or over a quota
# What the file system refuses (not a bug of ours): space, permissions, a read-only or vanished mount, I/O
WRITE_ERRNOS = (*SPACE, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO, errno.ESTALE, errno.ENOENT)
# torch.save on a full disk: its zip writer finds the file shorter than what it wrote, and says only that
SHORT_WRITE = ("unexpected pos", "file write failed")
MARGIN = 1.1  # a checkpoint is said not to fit when less than this times the last one's size is free


class WriteError(InputError):
    """A write the file system refused: the message names the path, the error and, for space, the sizes."""

    space = False  # whether it ran out of space (or quota)


def free_bytes(path: Path) -> int:
    """Free space on the file system of ``path`` (its nearest existing parent) for this user."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def size_of(directory: Path) -> int:
    """Bytes of the files under ``directory``."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def human(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError


def _causes(err: BaseException) -> list[BaseException]:
    """``err`` and what it wraps: its cause and context, and the per-rank failures a torch.distributed.checkpoint
    CheckpointException carries (exceptions, or (exception, traceback) pairs)."""
    seen: list[BaseException] = []
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
    return [e for e in seen if isinstance(e, BaseException)]


def write_error(
    what: str, path: Path, err: BaseException, needed: int | None = None, under: Path | None = None
) -> WriteError | None:
    """The one-line WriteError of ``err``, raised while writing ``what`` at ``path``, when the file system refused the
    write; None when ``err`` is something else. ``needed``: the bytes the write needs, said with the free space;
    ``under``: where the writing happens (default ``path``): an error naming a file elsewhere (a model read) is not
    a refused write."""
    causes = _causes(err)
    refused = next((e for e in causes if isinstance(e, OSError) and e.errno in WRITE_ERRNOS), None)
    if refused is not None and refused.filename and not _within(Path(str(refused.filename)), under or path):
        return None
    short = any(isinstance(e, RuntimeError) and any(s in str(e) for s in SHORT_WRITE) for e in causes)
    if refused is None and not short:
        return None
    if refused is not None:
        reason = f"{os.strerror(refused.errno)} ({errno.errorcode[refused.errno]})"
        where = getattr(refused, "filename", None)
        reason += f" at {where}" if where and str(where) != str(path) else ""
    else:
        reason = "the write came up short (a full disk or quota)"
    message = f"cannot write {what} {path}: {reason}"
    space = refused is None or refused.errno in SPACE
    if space:
        message += f"; {human(free_bytes(path))} free there"
        message += f", about {human(needed)} needed" if needed else ""
    error = WriteError(message)
    error.space = space
    return error


def _within(file: Path, directory: Path) -> bool:
    file, directory = file.absolute(), Path(directory).absolute()
    return file == directory or directory in file.parents


def low_space_warning(directory: Path, needed: int) -> str | None:
    """What to say before a checkpoint of about ``needed`` bytes into ``directory`` when it may not fit."""
    free = free_bytes(directory)
    if free >= MARGIN * needed:
        return None
    return (
        f"checkpoint: {human(free)} free on the file system of {directory}, a checkpoint takes about "
        f"{human(needed)}: the next one may not fit; free space while this run can still be saved"
    )
