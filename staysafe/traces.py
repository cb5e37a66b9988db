"""Run directories: the trace format every other part reads, written so that a kill at any moment loses nothing.

A run lives in ``<runs_root>/<run_id>/``:

- ``config.json``: everything needed to rerun (all options, seed, package versions);
- ``status.json``: ``created | running | finished | failed | cancelled`` (+ pid, error); a ``running`` run whose
  process is gone reads as ``interrupted``;
- ``steps.parquet/``: one row per optimizer step;
- ``examples.parquet/``: one row per training example per step it was seen;
- ``evals.parquet/`` and ``generations.parquet/``: safety evaluations over training;
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
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from staysafe.errors import StaySafeError

TABLES = {  # table name -> columns that identify a row (duplicates keep the newest)
    "steps": ("step",),
    "examples": ("step", "slot"),
    "evals": ("step",),
    "generations": ("step", "prompt_id"),
}
STATES = ("created", "running", "finished", "failed", "cancelled", "interrupted")
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class TraceError(StaySafeError, RuntimeError):
    """A run directory or trace file is missing or damaged; the message names the file."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(4)}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temporary file + rename): readers see the old or the new file, never half of one."""
    _atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, default=str) + "\n").encode())


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TraceError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TraceError(f"{path} is not valid JSON ({err})") from None


def write_parquet(path: Path, df: pd.DataFrame) -> None:
    """Write one Parquet file atomically."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(4)}")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- writing


class TableWriter:
    """Appends rows to a ``<name>.parquet/`` directory: one atomic part per append, merged every ``merge_every``."""

    def __init__(self, directory: Path, merge_every: int = 50):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.merge_every = merge_every
        existing = sorted(self.dir.glob("*.parquet"))
        # Parts are named <session>-<first>-<last>; a resumed writer starts a new session so its rows sort last.
        self.session = 1 + max((int(p.name.split("-")[0]) for p in existing), default=0)
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
        """Merge this session's small parts into one; a kill in between only leaves duplicates, which readers drop."""
        if len(self.small) < 2:
            return
        first = self.small[0].name.split("-")[1]
        last = self.small[-1].name.split("-")[2].split(".")[0]
        merged = pd.concat([pd.read_parquet(p) for p in self.small], ignore_index=True)
        target = self.dir / f"{self.session:04d}-{first}-{last}.parquet"
        write_parquet(target, merged)
        for p in self.small:
            if p != target:
                p.unlink(missing_ok=True)
        self.small = [target]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


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
            raise ValueError(f"run id {run_id!r} is not allowed: use letters, digits, '.', '_' and '-' (max 128)")
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
            raise FileExistsError(f"run directory {target} already exists; choose another run id") from None
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
                                               "pid": os.getpid(), "host": socket.gethostname()})

    def close(self) -> None:
        for t in self._tables.values():
            t.merge()


# ----------------------------------------------------------------------------------------------- reading


def read_table(directory: Path, key: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Read a ``*.parquet/`` trace table (or a single Parquet file); damaged parts raise TraceError naming the part."""
    directory = Path(directory)
    if not directory.exists():
        return pd.DataFrame()
    parts = [directory] if directory.is_file() else sorted(directory.glob("[0-9]*.parquet"))
    frames = []
    for p in parts:
        try:
            frames.append(pq.read_table(p).to_pandas())
        except Exception as err:  # ArrowInvalid, OSError, ...: a damaged or foreign file
            raise TraceError(f"trace file {p} is damaged or not Parquet ({err})") from None
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if key and len(frames) > 1 and all(k in df.columns for k in key):
        df = df.drop_duplicates(subset=list(key), keep="last")
        df = df.sort_values(list(key), kind="stable").reset_index(drop=True)
    return df


def run_state(path: Path) -> dict:
    """status.json, with ``running`` turned into ``interrupted`` when its process on this host is gone."""
    status = read_json(Path(path) / "status.json")
    if status.get("state") == "running" and status.get("host") == socket.gethostname():
        pid = status.get("pid")
        if isinstance(pid, int) and not _pid_alive(pid):
            status = {**status, "state": "interrupted", "error": status.get("error") or f"process {pid} is gone"}
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
    data: pd.DataFrame = field(repr=False)

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
    loaded = {name: read_table(path / f"{name}.parquet", TABLES[name]) if name in tables else pd.DataFrame()
              for name in TABLES}
    data = read_table(path / "data.parquet") if (path / "data.parquet").exists() else pd.DataFrame()
    return Run(path=path, config=config, status=status, data=data, **loaded)


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
                steps = read_table(d / "steps.parquet", TABLES["steps"])
                evals = read_table(d / "evals.parquet", TABLES["evals"])
                final = evals.iloc[-1] if len(evals) else None
                row.update({
                    "state": status.get("state"), "method": config.get("method"), "risk": config.get("risk"),
                    "scenario": config.get("scenario") or config.get("data"), "model": config.get("model"),
                    "experiment": config.get("experiment"), "seed": config.get("seed"),
                    "steps_done": int(steps["step"].max()) if len(steps) else 0, "max_steps": config.get("steps"),
                    "final_asr_keyword": float(final["asr_keyword"]) if final is not None and "asr_keyword" in final else None,
                    "created": status.get("created"), "error": status.get("error"),
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
