"""One writer at a time on a workspace, and readers whose files no writer deletes mid-read.

Two lock files live in the workspace, both held with flock(2), so the kernel releases them
when the holding process dies (kill -9, an out-of-memory kill): there is never a stale lock
to break by hand.

- ``writer.lock``: held exclusively for the whole of ``init``, ``add-classes`` and ``export``.
  The holder writes who it is (pid, command, start time) into the file, so a second writer
  is refused at once with a line naming it, or waits for it (``--wait``).
- ``readers.lock``: held shared while a process reads a generation's files. A writer deletes
  old generations only while it holds this lock exclusively, and asks for it without
  waiting: with a reader busy, the old generation stays for the next writer to delete. So a
  step never waits on a camera service's `predict`, and `predict` never finds its files gone.

Why a readers lock rather than "the writer keeps the previous generation": keeping one
generation is safe only if no reader is still loading when two steps have committed, which a
slow reader (a ResNet-18 workspace on an SD card) cannot promise; the lock makes it exact.

The lock files are never deleted: removing a lock file while another process waits on it
would let two processes each hold "the" lock, on two different files.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edge_m2kd.errors import UserError

WRITER_LOCK = "writer.lock"
READERS_LOCK = "readers.lock"
LOCK_FILES = (WRITER_LOCK, READERS_LOCK)


def _try_flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(lock_path: Path) -> str:
    try:
        info = json.loads(lock_path.read_text())
        return f"`{info['command']}` (pid {info['pid']}) has been writing to it since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written its name yet
        return "another edge-m2kd process is writing to it"


class WorkspaceBusy(UserError):
    """Another process holds the writer lock (`serve` answers it with 409, not 400)."""


def _busy(workspace: Path, holder: str) -> str:
    return f"{workspace} is busy: {holder}; run again when it has finished, or add --wait"


def busy_reason(workspace: Path) -> str:
    """The line a second writer is refused with, naming the holder the lock file records. For a
    caller that knows a writer holds the lock (`serve`, whose own step process does): it tests
    no lock, since even a brief probe could make a writer starting at that instant fail."""
    return _busy(workspace, _holder(Path(workspace) / WRITER_LOCK))


@contextmanager
def writer_lock(workspace: Path, command: str, wait: bool = False) -> Iterator[None]:
    """Hold the workspace's writer lock for the duration; refuse (UserError) if another
    process holds it, or wait for it with ``wait``. ``workspace`` must exist."""
    lock_path = Path(workspace) / WRITER_LOCK
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_flock(fd, fcntl.LOCK_EX):
            holder = _holder(lock_path)
            if not wait:
                raise WorkspaceBusy(_busy(workspace, holder))
            warnings.warn(f"waiting for {workspace}: {holder}", stacklevel=3)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        since = time.strftime("%Y-%m-%dT%H:%M:%S")
        os.write(fd, json.dumps({"pid": os.getpid(), "command": command, "since": since}).encode())
        yield
    finally:
        os.close(fd)  # releases the lock; the file keeps the last holder's name, harmlessly


def _open_readers_lock(workspace: Path, flags: int) -> int | None:
    try:
        return os.open(Path(workspace) / READERS_LOCK, flags | os.O_CREAT, 0o644)
    except OSError:  # a read-only workspace: no writer can delete anything there either
        return None


@contextmanager
def reading(workspace: Path) -> Iterator[None]:
    """Keep every writer's clean-up away while this process reads a generation's files.
    Waits only while a writer is deleting old generations (milliseconds)."""
    fd = _open_readers_lock(workspace, os.O_RDONLY)
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        if fd is not None:
            os.close(fd)


@contextmanager
def no_readers(workspace: Path) -> Iterator[bool]:
    """For a writer's clean-up: True (and readers held off) when no process is reading,
    False at once when one is."""
    fd = _open_readers_lock(workspace, os.O_RDWR)
    try:
        yield fd is not None and _try_flock(fd, fcntl.LOCK_EX)
    finally:
        if fd is not None:
            os.close(fd)
