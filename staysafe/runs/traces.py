"""Run directories: the trace format every other part reads, written so that a kill at any moment loses nothing.

A run lives in ``<runs_root>/<run_id>/``:

- ``config.json``: everything needed to rerun (all options, seed, package versions);
- ``status.json``: ``created | running | finished | failed | cancelled`` (+ pid, error); a ``running`` run whose
  process is gone reads as ``interrupted``;
- ``steps.parquet/``: one row per optimizer step;
- ``examples.parquet/``: one row per training example per step it was seen;
- ``evals.parquet/``, ``generations.parquet/`` and ``samples.parquet/``: safety evaluations over training (the
  figures, the greedy answers, the sampled answers when ``eval_samples > 0``);
- ``positions.parquet/``: token-wise methods only: per step and answer position, the mean beta_t, loss term and
  log-probability ratio to the reference;
- ``data.parquet``: the training records (text) the run used.

Each ``*.parquet/`` table is a directory of Parquet parts (pyarrow and pandas read it as one table). Every part is
written to a hidden temporary name and renamed into place, so a part is either whole or absent; small parts are
merged from time to time. A reader drops rows repeated by a merge or a resume (keeping the newest), so every
completed step is readable after ``kill -9``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

import staysafe.runs.process as process
from staysafe.errors import StaySafeError
from staysafe.options import RUN_ID, SpecError  # noqa: F401  (RUN_ID re-exported: the id rule, defined once)
from staysafe.runs.atomic import fsync_dir, write_json, write_parquet  # noqa: F401  (writers re-exported)
from staysafe.runs.files import TraceError, read_json, real_dir  # noqa: F401  (the readers' error, re-exported)

TABLES = {  # table name -> columns that identify a row (duplicates keep the newest)
    "steps": ("step",),
    "examples": ("step", "slot"),
    "evals": ("step",),
    "generations": ("step", "prompt_id"),
    "samples": ("step", "prompt_id", "sample"),
    "positions": ("step", "position"),
}
STATES = ("created", "running", "finished", "failed", "cancelled", "interrupted")
INTEGER_KEYS = ("step", "slot", "sample", "position")
NUMERIC = ("asr_", "over_refusal", "benign_nll", "task_accuracy", "beta", "loss", "nll", "kl", "risk", "score_",
           "wall_time", "n_harmful", "n_benign")  # column name prefixes that must hold numbers
STATUS_TYPES = {"created": (int, float), "started": (int, float), "ended": (int, float), "updated": (int, float),
                "step": int, "max_steps": int, "error": str, "pid": int, "host": str}


class RunExistsError(StaySafeError, FileExistsError):
    """A run directory of that id already exists (a run's rows are never overwritten)."""


# ----------------------------------------------------------------------------------------------- writing


class TableWriter:
    """Appends rows to a ``<name>.parquet/`` directory: one atomic part per append; every ``merge_every`` appends
    those small parts become one part. Merged parts are never rewritten, so a long run costs linear time."""

    def __init__(self, directory: Path, merge_every: int = 50):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not real_dir(self.dir):  # a planted link would send the parts elsewhere
            raise TraceError(f"{self.dir} is not a directory of this run (a link?); its rows are not written")
        self.merge_every = merge_every
        existing = sorted(self.dir.glob("[0-9]*.parquet"))
        # Parts are named <session>-<first>-<last>; a resumed writer starts a new session so its rows sort last.
        self.session = 1 + max((int(p.name.split("-")[0]) for p in existing if p.name.split("-")[0].isdigit()),
                               default=0)
        self.seq = 0
        self.small: list[Path] = []

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        path = self.dir / f"{self.session:04d}-{self.seq:08d}-{self.seq:08d}.parquet"
        write_parquet(path, pd.DataFrame(rows))
        self.small.append(path)
        self.seq += 1
        if len(self.small) >= self.merge_every:
            self.merge()

    def merge(self) -> None:
        """Merge the small parts written since the last merge into one part.

        The merged part is durable (fsynced, renamed, directory fsynced) before any small part is deleted; a kill
        in between only leaves duplicates, which readers drop.
        """
        if len(self.small) < 2:
            self.small = []
            return
        first = self.small[0].name.split("-")[1]
        last = self.small[-1].name.split("-")[2].split(".")[0]
        merged = pd.concat([pd.read_parquet(p) for p in self.small], ignore_index=True)
        target = self.dir / f"{self.session:04d}-{first}-{last}.parquet"
        write_parquet(target, merged)
        for p in self.small:
            if p != target:
                p.unlink(missing_ok=True)
        fsync_dir(self.dir)
        self.small = []


def new_run_id(prefix: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", prefix).strip("-.") or "run"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}-{secrets.token_hex(3)}"


class RunWriter:
    """Creates a run directory atomically and owns its status and trace tables."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.exists() and not real_dir(self.path):
            raise TraceError(f"{self.path} is not a run directory (a link?); StaySafe does not write through links")
        self._tables: dict[str, TableWriter] = {}

    @classmethod
    def create(cls, runs_root: Path, config: dict, run_id: str | None = None) -> "RunWriter":
        """Build ``config.json`` and ``status.json`` in a hidden directory, then rename it into place.

        The rename fails if the id is taken, so two launches never share a directory, and ``list_runs`` never sees
        a half-created run.
        """
        root = Path(runs_root)
        root.mkdir(parents=True, exist_ok=True)
        run_id = run_id or new_run_id(str(config.get("method", "run")))
        if not RUN_ID.match(run_id):
            raise SpecError(f"run id {run_id!r} is not allowed: use letters, digits, '.', '_' and '-' (max 128)")
        tmp = root / f".creating-{run_id}-{secrets.token_hex(4)}"
        tmp.mkdir()
        write_json(tmp / "config.json", {**config, "run_id": run_id})
        write_json(tmp / "status.json", {"state": "created", "created": time.time()})
        target = root / run_id
        try:
            os.rename(tmp, target)  # atomic; fails when target exists and is not empty
        except OSError:
            for p in tmp.iterdir():
                p.unlink()
            tmp.rmdir()
            raise RunExistsError(f"run directory {target} already exists; choose another run id") from None
        return cls(target)

    def table(self, name: str) -> TableWriter:
        if name not in self._tables:
            self._tables[name] = TableWriter(self.path / f"{name}.parquet")
        return self._tables[name]

    def append(self, name: str, rows: list[dict]) -> None:
        self.table(name).append(rows)

    def set_status(self, state: str, **info) -> None:
        assert state in STATES, state
        old = {}
        try:
            old = read_json(self.path / "status.json")
        except TraceError:
            pass
        write_json(self.path / "status.json", {**old, **info, "state": state, "updated": time.time(),
                                               **process.identity()})

    def close(self, log=print) -> None:
        """Merge the small trace parts; a failure (a full disk, an I/O error) leaves them, all readable."""
        try:
            for t in self._tables.values():
                t.merge()
        except Exception as err:
            log(f"warning: could not merge the trace parts of {self.path} ({type(err).__name__}: {err}); "
                "the unmerged parts stay readable")

    def lifecycle(self, main: bool = True, log=print, **info):
        """The run's states (see :func:`lifecycle`), its trace parts merged on the way out; ``main``: False on
        the other processes of a distributed run (they write no status)."""
        return lifecycle(self.path, self.set_status if main else None, on_exit=lambda: self.close(log), **info)


@contextlib.contextmanager
def lifecycle(directory: Path, record, on_exit=None, **info):
    """A run's or an experiment's states, in one place: ``running`` (holding ``<directory>/.lock``, so readers
    can tell it is alive without trusting a pid), then ``finished``, ``cancelled`` (SIGTERM or Ctrl-C) or
    ``failed`` with the error. ``record(state, **fields)`` writes a state (None: this process records nothing).
    The final state is written before ``on_exit`` (merging trace parts), so nothing on the way out can lose it.
    Yields a dict whose items go into the final state (the last step; an experiment's runs and minutes)."""
    lock = None
    if record is not None:
        try:
            lock = process.LifeLock(Path(directory) / process.LOCK_NAME)
        except process.LockBusy:
            raise SpecError(f"{directory} is still running in another process; cancel it first or wait for it to "
                            "end") from None
        except OSError as err:
            raise TraceError(f"cannot lock {Path(directory) / process.LOCK_NAME} ({err.strerror or err})") from None
        record("running", started=time.time(), **info)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    done: dict = {}
    try:
        yield done
        if record is not None:
            record("finished", ended=time.time(), **done)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM turned into one
        if record is not None:
            record("cancelled", ended=time.time(), error=str(err) or "cancelled", **done)
        raise
    except BaseException as err:
        if record is not None:
            record("failed", ended=time.time(), error=f"{type(err).__name__}: {err}"[:2000],
                   traceback=traceback.format_exc(limit=8), **done)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if on_exit is not None:
            on_exit()
        if lock is not None:
            lock.release()


class Cancelled(KeyboardInterrupt):
    """SIGTERM, turned into an interruption so the run is marked cancelled like a Ctrl-C."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cancel path short
    raise Cancelled("cancelled (SIGTERM)")


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------------------------- reading


def read_table(directory: Path, key: tuple[str, ...] | None = None, damaged: list[str] | None = None) -> pd.DataFrame:
    """Read a ``*.parquet/`` trace table (or a single Parquet file).

    In a table directory a damaged part (empty, truncated, not Parquet) is skipped with a warning naming it and
    its path is added to ``damaged``; the other parts stay readable. A single damaged file, or a part without the
    table's key columns (a foreign file), raises TraceError naming it.
    """
    directory = Path(directory)
    if not directory.exists():
        return pd.DataFrame()
    single = directory.is_file() or directory.is_symlink()
    if not single and not real_dir(directory):
        raise TraceError(f"{directory} is not a trace table (a directory of Parquet parts)")
    parts = [directory] if single else sorted(directory.glob("[0-9]*.parquet"))
    frames = []
    for p in parts:
        try:
            frame = _read_part(p, key)
        except TraceError as err:  # damaged, foreign, a link, a directory, or columns of the wrong type
            if single:
                raise
            warnings.warn(f"{err}; its rows are skipped", stacklevel=2)
            if damaged is not None:
                damaged.append(str(p))
            continue
        frames.append(frame)
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if key:  # also within one part: a merge keeps rows in the order they were appended, repeats included
        df = df.drop_duplicates(subset=list(key), keep="last")
        df = df.sort_values(list(key), kind="stable").reset_index(drop=True)
    return df


def _read_part(path: Path, key: tuple[str, ...] | None) -> pd.DataFrame:
    """One Parquet part, checked against the trace schema: a regular file (no link), the table's key columns as
    whole numbers (``prompt_id`` text or numbers), and the metric columns as numbers. Else a TraceError naming it."""
    if path.is_symlink() or not path.is_file():
        raise TraceError(f"trace file {path} is not a regular file")
    try:
        frame = pq.read_table(path).to_pandas()
    except Exception as err:  # ArrowInvalid, OSError, ...: a damaged or foreign file
        raise TraceError(f"trace file {path} is damaged or not Parquet ({err})") from None
    missing = [k for k in key or () if k not in frame.columns]
    if missing:
        raise TraceError(f"trace file {path} has no column {missing[0]!r}; it is not a part of this table")
    for col in frame.columns:
        kind = frame[col].dtype
        if col in INTEGER_KEYS and not pd.api.types.is_integer_dtype(kind):
            raise TraceError(f"trace file {path}: column {col!r} holds {kind}, expected whole numbers")
        if col.startswith(NUMERIC) and not (pd.api.types.is_numeric_dtype(kind) or pd.api.types.is_bool_dtype(kind)):
            raise TraceError(f"trace file {path}: column {col!r} holds {kind}, expected numbers")
    return frame


def run_state(path: Path) -> dict:
    """status.json, its fields checked, with ``running`` turned into ``interrupted`` when no live process holds
    the run's lock (see :class:`staysafe.runs.process.LifeLock`; a pid in the file is never trusted for that). A run
    recorded on another machine stays as written."""
    path = Path(path)
    status = read_json(path / "status.json")
    if status.get("state") not in STATES:
        raise TraceError(f"{path / 'status.json'}: state {status.get('state')!r} is not one of {STATES}")
    for name, kind in STATUS_TYPES.items():
        value = status.get(name)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise TraceError(f"{path / 'status.json'}: field {name!r} = {value!r:.60} is not of its type")
    if status["state"] == "running" and not process.elsewhere(status) and not process.held(path / process.LOCK_NAME):
        status = {**status, "state": "interrupted", "error": status.get("error") or "its process is gone"}
    return status


@dataclass
class Run:
    """A loaded run: config, status and its trace tables as pandas DataFrames (empty when not recorded)."""

    path: Path
    config: dict
    status: dict
    steps: pd.DataFrame = field(repr=False)
    examples: pd.DataFrame = field(repr=False)
    evals: pd.DataFrame = field(repr=False)
    generations: pd.DataFrame = field(repr=False)
    samples: pd.DataFrame = field(repr=False)
    positions: pd.DataFrame = field(repr=False)
    data: pd.DataFrame = field(repr=False)
    damaged: list[str] = field(default_factory=list)  # trace parts skipped because they could not be read

    @property
    def id(self) -> str:
        return self.path.name


def load_run(path: Path, tables: tuple[str, ...] = tuple(TABLES)) -> Run:
    """Read one run directory. Raises TraceError (naming the file) when it is not a readable run."""
    path = Path(path)
    if not real_dir(path):
        raise TraceError(f"{path} is not a run directory")
    config = read_json(path / "config.json")
    status = run_state(path)
    damaged: list[str] = []
    loaded = {name: read_table(path / f"{name}.parquet", TABLES[name], damaged) if name in tables else pd.DataFrame()
              for name in TABLES}
    data = read_table(path / "data.parquet") if (path / "data.parquet").exists() else pd.DataFrame()
    return Run(path=path, config=config, status=status, data=data, damaged=damaged, **loaded)


def list_runs(root: Path) -> pd.DataFrame:
    """One row per run directory under ``root``: id, state, method, scenario, progress, final ASR, error.

    A damaged run gets a row with state ``corrupt`` and the error, so one bad directory never hides the others.
    """
    root = Path(root)
    rows = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if not real_dir(d) or d.name.startswith(".") or not (d / "config.json").exists():
                continue
            row = {"run_id": d.name, "path": str(d)}
            try:
                config = read_json(d / "config.json")
                status = run_state(d)
                damaged: list[str] = []
                steps = read_table(d / "steps.parquet", TABLES["steps"], damaged)
                evals = read_table(d / "evals.parquet", TABLES["evals"], damaged)
                final = evals.iloc[-1] if len(evals) else None
                row.update(
                    {
                        "state": status.get("state"),
                        "method": config.get("method"),
                        "risk": config.get("risk"),
                        "scenario": config.get("scenario") or config.get("data"),
                        "model": config.get("model"),
                        "experiment": config.get("experiment"),
                        "seed": config.get("seed"),
                        "steps_done": int(steps["step"].max()) if len(steps) else 0,
                        "max_steps": config.get("steps"),
                        "final_asr_keyword": float(final["asr_keyword"])
                        if final is not None and "asr_keyword" in final
                        else None,
                        "created": status.get("created"),
                        "error": status.get("error")
                        or (f"damaged trace parts skipped: {', '.join(damaged)}" if damaged else None),
                    }
                )
            except TraceError as err:
                row.update({"state": "corrupt", "error": str(err)})
            rows.append(row)
    return pd.DataFrame(rows, columns=["run_id", "path", "state", "method", "risk", "scenario", "model", "experiment",
                                       "seed", "steps_done", "max_steps", "final_asr_keyword", "created", "error"])


def safe_run_path(root: Path, run_id: str) -> Path:
    """Resolve a user-typed run id inside ``root``; refuse anything that escapes it (``..``, absolute paths, links)."""
    if not isinstance(run_id, str) or not RUN_ID.match(run_id):
        raise TraceError(f"run id {run_id!r} is not a valid run id (letters, digits, '.', '_', '-')")
    root = Path(root).resolve()
    path = (root / run_id).resolve()
    if path.parent != root:
        raise TraceError(f"run id {run_id!r} points outside the runs root {root}")
    return path
