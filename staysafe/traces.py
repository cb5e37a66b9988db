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

import json
import os
import re
import secrets
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from staysafe.atomic import fsync_dir, write_json, write_parquet  # noqa: F401  (writers re-exported)
import staysafe.process as process
from staysafe.errors import StaySafeError
from staysafe.options import SpecError

TABLES = {  # table name -> columns that identify a row (duplicates keep the newest)
    "steps": ("step",),
    "examples": ("step", "slot"),
    "evals": ("step",),
    "generations": ("step", "prompt_id"),
    "samples": ("step", "prompt_id", "sample"),
    "positions": ("step", "position"),
}
STATES = ("created", "running", "finished", "failed", "cancelled", "interrupted")
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class TraceError(StaySafeError, RuntimeError):
    """A run directory or trace file is missing or damaged; the message names the file."""


class RunExistsError(StaySafeError, FileExistsError):
    """A run directory of that id already exists (a run's rows are never overwritten)."""


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; missing, unreadable, invalid or not an object (a list, a number) is a TraceError."""
    path = Path(path)
    try:
        obj = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise TraceError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TraceError(f"{path} is not valid JSON ({err})") from None
    except OSError as err:  # a directory of that name, no permission, an I/O error
        raise TraceError(f"{path} cannot be read ({err.strerror or err})") from None
    if not isinstance(obj, dict):
        raise TraceError(f"{path} holds a JSON {type(obj).__name__}, expected an object")
    return obj


# ----------------------------------------------------------------------------------------------- writing


class TableWriter:
    """Appends rows to a ``<name>.parquet/`` directory: one atomic part per append; every ``merge_every`` appends
    those small parts become one part. Merged parts are never rewritten, so a long run costs linear time."""

    def __init__(self, directory: Path, merge_every: int = 50):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
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

    def close(self) -> None:
        for t in self._tables.values():
            t.merge()


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
    single = directory.is_file()
    parts = [directory] if single else sorted(directory.glob("[0-9]*.parquet"))
    frames = []
    for p in parts:
        try:
            frame = pq.read_table(p).to_pandas()
        except Exception as err:  # ArrowInvalid, OSError, ...: a damaged or foreign file
            message = f"trace file {p} is damaged or not Parquet ({err})"
            if single:
                raise TraceError(message) from None
            warnings.warn(message + "; its rows are skipped", stacklevel=2)
            if damaged is not None:
                damaged.append(str(p))
            continue
        missing = [k for k in key or () if k not in frame.columns]
        if missing:
            raise TraceError(f"trace file {p} has no column {missing[0]!r}; it is not a part of this table")
        frames.append(frame)
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if key:  # also within one part: a merge keeps rows in the order they were appended, repeats included
        df = df.drop_duplicates(subset=list(key), keep="last")
        df = df.sort_values(list(key), kind="stable").reset_index(drop=True)
    return df


def run_state(path: Path) -> dict:
    """status.json, with ``running`` turned into ``interrupted`` when the process that wrote it is gone.

    "Gone" is judged by pid, process start time and boot id (see :mod:`staysafe.process`), so a reused pid after a
    reboot or in a new container does not keep a dead run "running". A run of another machine stays as written.
    """
    status = read_json(Path(path) / "status.json")
    if status.get("state") == "running" and process.alive(status) is False:
        status = {**status, "state": "interrupted",
                  "error": status.get("error") or f"process {status.get('pid')} is gone"}
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
    if not path.is_dir():
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
            if not d.is_dir() or d.name.startswith(".") or not (d / "config.json").exists():
                continue
            row = {"run_id": d.name, "path": str(d)}
            try:
                config = read_json(d / "config.json")
                status = run_state(d)
                damaged: list[str] = []
                steps = read_table(d / "steps.parquet", TABLES["steps"], damaged)
                evals = read_table(d / "evals.parquet", TABLES["evals"], damaged)
                final = evals.iloc[-1] if len(evals) else None
                row.update({
                    "state": status.get("state"), "method": config.get("method"), "risk": config.get("risk"),
                    "scenario": config.get("scenario") or config.get("data"), "model": config.get("model"),
                    "experiment": config.get("experiment"), "seed": config.get("seed"),
                    "steps_done": int(steps["step"].max()) if len(steps) else 0, "max_steps": config.get("steps"),
                    "final_asr_keyword": float(final["asr_keyword"]) if final is not None and "asr_keyword" in final else None,
                    "created": status.get("created"),
                    "error": status.get("error") or (f"damaged trace parts skipped: {', '.join(damaged)}"
                                                     if damaged else None),
                })
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
