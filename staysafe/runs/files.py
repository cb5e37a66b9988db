"""Reading files that anyone may have written (a runs folder may be shared): the one place that opens them.

Every file StaySafe reads back (a run's config and status, a job, an experiment, a checkpoint's state, a data line)
is untrusted input. The rules, enforced here once:

- only regular files: a FIFO, a device or a directory in a file's place is named, never opened for reading (a FIFO
  would hang the reader);
- never through a symbolic link unless the caller named the path itself on its command line (``follow_links``):
  a link planted in a runs root must not show or overwrite a file elsewhere;
- JSON at most :data:`MAX_JSON_BYTES` long and :data:`MAX_JSON_DEPTH` deep (deep nesting would raise
  RecursionError far from here);
- appends (logs) go through :func:`open_append`, which refuses a link too.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from staysafe.errors import StaySafeError

MAX_JSON_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 32


class TraceError(StaySafeError, RuntimeError):
    """A run directory or trace file is missing or damaged; the message names the file."""


def open_regular(path: Path, follow_links: bool = False, flags: int = os.O_RDONLY) -> int:
    """A file descriptor of ``path`` if it is a regular file (a link only with ``follow_links``); else TraceError.

    Opened non-blocking, so a FIFO in the file's place cannot hang the caller before the check."""
    path = Path(path)
    mode = flags | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, mode)
    except FileNotFoundError:
        raise TraceError(f"{path} is missing") from None
    except OSError as err:
        if not follow_links and os.path.islink(path):
            raise TraceError(f"{path} is a symbolic link; StaySafe does not follow links inside its folders") from None
        raise TraceError(f"{path} cannot be read ({err.strerror or err})") from None
    kind = os.fstat(fd).st_mode
    if not stat.S_ISREG(kind):
        os.close(fd)
        what = "a directory" if stat.S_ISDIR(kind) else "a FIFO" if stat.S_ISFIFO(kind) else "not a regular file"
        raise TraceError(f"{path} is {what}, expected a regular file")
    os.set_blocking(fd, True)
    return fd


def read_bytes(path: Path, max_bytes: int, follow_links: bool = False) -> bytes:
    """At most ``max_bytes`` of a regular file; a larger file is a TraceError naming it."""
    fd = open_regular(path, follow_links)
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TraceError(f"{path} is larger than {max_bytes} bytes; it is not a file StaySafe wrote")
    return data


def json_depth_ok(obj, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``obj`` nests lists and objects at most ``limit`` deep (iterative: no recursion to overflow)."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return True


def parse_json(text: str | bytes, where: str, error=None):
    """JSON from ``text``; invalid, too deep or non-finite-number text raises ``error`` (default TraceError)
    naming ``where`` (a file, or a file and line)."""
    error = error or TraceError
    try:
        obj = json.loads(text)
    except RecursionError:
        raise error(f"{where} nests deeper than {MAX_JSON_DEPTH} levels; it is not a file StaySafe wrote") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{where} is not valid JSON ({err})") from None
    if not json_depth_ok(obj):
        raise error(f"{where} nests deeper than {MAX_JSON_DEPTH} levels; it is not a file StaySafe wrote")
    return obj


def read_json(path: Path, follow_links: bool = False, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """A JSON object from ``path``; missing, not a regular file, a link, too large, too deep, invalid or not an
    object (a list, a number) is a TraceError naming the file."""
    path = Path(path)
    obj = parse_json(read_bytes(path, max_bytes, follow_links), str(path))
    if not isinstance(obj, dict):
        raise TraceError(f"{path} holds a JSON {type(obj).__name__}, expected an object")
    return obj


def open_append(path: Path):
    """``path`` opened for appending bytes, created if missing; a link or a non-regular file is a TraceError."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                     | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as err:
        if os.path.islink(path):
            raise TraceError(f"{path} is a symbolic link; StaySafe does not write through links") from None
        raise TraceError(f"{path} cannot be written ({err.strerror or err})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TraceError(f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "ab")


def real_dir(path: Path) -> bool:
    """``path`` is a directory and not a link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def check_inside(path: Path, root: Path, what: str) -> Path:
    """``path`` resolved, refused (TraceError) when it leaves ``root`` (through ``..``, an absolute path or a link)."""
    root_r, path_r = Path(root).resolve(), Path(path).resolve()
    if path_r != root_r and root_r not in path_r.parents:
        raise TraceError(f"{what} {path} is outside {root_r}")
    return path_r
