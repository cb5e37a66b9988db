"""Atomic, durable file writes: the one way StaySafe writes a file that a reader or a power loss may meet half-done.

Every write goes to a hidden temporary name in the target's own directory, the file is fsynced, renamed over the
target and the directory is fsynced, so after a crash the path holds the old content or the new one, never a part
of either. ``publish_dir`` does the same for a whole directory built elsewhere (e.g. a model): the old directory
stays in place until the new one is complete; ``atomic_dir`` and ``build_once`` are its two uses (a directory
written by a library call such as ``save_pretrained``, and a cache directory built once).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
from pathlib import Path

TMP_PREFIX = ".tmp-"


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """A hidden temporary sibling of ``path`` (same directory, so the rename stays on one file system)."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{path.name}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yield a temporary path to write; on success it is fsynced and renamed over ``path``, on error removed."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    """Readers see the old or the new file, never half of one."""
    write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode("utf-8"))


def write_npz(path: Path, **arrays) -> None:
    """``np.savez`` (no pickles) through a buffer: a damaged or foreign array can never replace a good file halfway."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue())


def write_parquet(path: Path, df) -> None:
    """One Parquet file (a whole table or one part of a ``*.parquet/`` directory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_file(path) as tmp:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)


def write_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _fsync_tree(directory: Path) -> None:
    for root, _dirs, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def publish_dir(build: Path, target: Path) -> None:
    """Put the complete directory ``build`` at ``target``; an old ``target`` stays readable until the swap.

    ``build`` must be a sibling of ``target`` (same file system). Its files are fsynced first; the old directory is
    moved aside, the new one renamed in, the parent fsynced, then the old one deleted. A crash in between leaves
    either directory whole plus a hidden ``.tmp-*`` leftover that no reader looks at.
    """
    build, target = Path(build), Path(target)
    _fsync_tree(build)
    old = None
    if target.exists():
        old = temp_path(target)
        os.rename(target, old)
    os.rename(build, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _temp_sibling(target: Path):
    """An empty hidden sibling directory of ``target``, removed on the way out unless it was renamed away."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: Path):
    """Yield an empty hidden sibling of ``target`` to fill (e.g. ``model.save_pretrained(tmp)``); on success it is
    published at ``target`` whole (:func:`publish_dir`), on error removed."""
    with _temp_sibling(Path(target)) as tmp:
        yield tmp
        publish_dir(tmp, target)


def build_once(target: Path, build, marker: str = "config.json") -> Path:
    """A cache directory built once: ``build(tmp)`` fills a hidden sibling, which is fsynced and renamed into place,
    so a killed build leaves nothing half-made at ``target``. When two processes race, the first complete one stays
    (it may already be in use) and the other's build is dropped."""
    target = Path(target)
    if (target / marker).is_file():
        return target
    with _temp_sibling(target) as tmp:
        build(tmp)
        _fsync_tree(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process published it first
            if not (target / marker).is_file():
                raise
        fsync_dir(target.parent)
    return target
