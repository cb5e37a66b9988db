"""Process identity: is the process a file names still the one that wrote it?

A pid alone is not an identity: after a reboot, in a new container or simply after enough processes, the same
number belongs to someone else. So run status and queue files record ``{"pid", "start", "boot"}``: the pid, its
start time in clock ticks since boot (field 22 of ``/proc/<pid>/stat``) and the kernel's boot id. A process is
alive only if all three still match; a zombie is dead.
"""

from __future__ import annotations

import os
import socket


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
    """What to record about a process (default: this one) so that a later reader can tell it apart from a reuse."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "start": start_time(pid), "boot": boot_id(), "host": socket.gethostname()}


def pid_alive(pid) -> bool:
    """Some process (not a zombie) has this pid."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OverflowError:
        return False
    fields = _stat(pid)
    return fields is None or fields[0] != "Z"


def alive(record: dict) -> bool | None:
    """Whether the process ``record`` (from :func:`identity`) names is still running.

    True or False when this machine can tell; None when it cannot (another machine: another host name and another
    boot, so its processes are not ours to see). Records without a start time (older files) fall back to the pid
    on the same host.
    """
    if not isinstance(record, dict):
        return False
    pid, start, boot = record.get("pid"), record.get("start"), record.get("boot")
    here = boot_id()
    if boot is not None and here is not None:
        if boot != here:
            return False if record.get("host") == socket.gethostname() else None  # rebooted, or another machine
        if start is None:
            return pid_alive(pid)
        return pid_alive(pid) and start_time(pid) == start  # same kernel: any pid namespace, same start clock
    if record.get("host") not in (None, socket.gethostname()):
        return None
    if start is not None and start_time(pid) is not None:
        return pid_alive(pid) and start_time(pid) == start
    return pid_alive(pid)
