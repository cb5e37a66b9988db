"""Is a run, a job, an experiment or the queue worker still alive? Answered by a lock, never by a file's word.

A file's recorded pid (even with its start time and boot id) is public information that anyone who can write the
file can copy from a live process: trusting it let a forged job make a cancel signal an unrelated process, and a
forged "running" job hold the queue's only slot. So the live process holds a :class:`LifeLock`, an exclusive
``flock`` on a lock file beside what it writes, for as long as it lives; the kernel drops it when the process ends
(even by ``kill -9``). "Alive" is "that lock is held". The ``{"pid", "start", "boot", "host"}`` identity is still
recorded, for people to read and to tell another machine's runs apart, never to decide what to signal.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"  # the lock file a run or an experiment directory's live process holds


class LockBusy(RuntimeError):
    """Another live process holds the lock."""


class LifeLock:
    """An exclusive ``flock`` on ``path`` (created if missing, never through a link), held until :meth:`release`
    or the process's end. ``wait``: seconds to retry while a reader's brief shared lock is in the way."""

    def __init__(self, path: Path, wait: float = 5.0):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise LockBusy(f"{self.path} is held by another live process") from None
                time.sleep(0.05)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def held(path: Path) -> bool:
    """Whether some live process holds the :class:`LifeLock` of ``path`` (a missing file or a link: no)."""
    try:
        fd = os.open(Path(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def elsewhere(record: dict) -> bool:
    """The record was written on another machine (its processes and locks are not ours to see)."""
    return isinstance(record, dict) and record.get("host") not in (None, socket.gethostname())


def boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None (no such process, no /proc)."""
    fields = _stat(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def identity(pid: int | None = None) -> dict:
    """What to record about a process (default: this one), for people to read and to tell machines apart; never
    trusted for liveness or signals (see :class:`LifeLock`)."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "start": start_time(pid), "boot": boot_id(), "host": socket.gethostname()}
