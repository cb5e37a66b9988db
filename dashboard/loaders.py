"""Cached loaders: every loader reads through the library's reader API (``staysafe.runs.traces``,
``staysafe.experiment``, ``staysafe.probe``, ``staysafe.geometry``) and is cached with ``st.cache_data`` keyed by
the path *and* a cheap file signature (names, sizes and mtimes of the files it reads), so a run that is still
writing refreshes on the next rerun while a finished one is read once."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from charts import _html_escape, run_label, wrap_html
from settings import run_path
from staysafe.geometry import project_points, separability_auroc
from staysafe.runs.traces import (
    TABLES,
    Run,
    TraceError,
    list_runs,
    load_run,
    read_json,
    read_table,
    run_state,
)


def _stat(path: Path) -> tuple:
    try:
        s = path.stat()
        return (path.name, s.st_mtime_ns, s.st_size)
    except OSError:
        return (path.name, None, None)


def table_signature(path: Path) -> tuple:
    """Names, sizes and mtimes of a ``*.parquet/`` table's parts (or of a single file): changes on every append."""
    path = Path(path)
    if path.is_dir():
        try:
            return tuple(sorted(_stat(Path(e.path)) for e in os.scandir(path)
                                if e.name.endswith(".parquet") and not e.name.startswith(".")))
        except OSError:
            return ()
    return (_stat(path),)


def root_signature(root: Path) -> tuple:
    """Cheap signature of every run under a root (what ``list_runs`` reads)."""
    root = Path(root)
    if not root.is_dir():
        return ()
    out = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return ()
    for e in entries:
        if e.name.startswith(".") or not e.is_dir():
            continue
        p = Path(e.path)
        out.append((e.name, _stat(p / "config.json"), _stat(p / "status.json"),
                    table_signature(p / "steps.parquet"), table_signature(p / "evals.parquet")))
    return tuple(out)


def dir_signature(path: Path, names: tuple[str, ...]) -> tuple:
    return tuple(_stat(Path(path) / n) for n in names)


@st.cache_data(max_entries=8, show_spinner=False)
def _list_runs(root: str, signature: tuple) -> pd.DataFrame:
    return list_runs(Path(root))


def runs_table(root: Path) -> pd.DataFrame:
    """``list_runs`` (cached), with the state of running runs re-checked on every call (a killed process)."""
    df = _list_runs(str(Path(root)), root_signature(root)).copy()
    for i in df.index[df["state"] == "running"]:
        try:
            status = run_state(Path(df.at[i, "path"]))
            df.at[i, "state"] = status.get("state")
            df.at[i, "error"] = status.get("error")
        except TraceError as err:
            df.at[i, "state"], df.at[i, "error"] = "corrupt", str(err)
    df["label"] = [run_label(r) for r in df.to_dict("records")]
    return df.sort_values("created", na_position="first", kind="stable").reset_index(drop=True)  # oldest first


@st.cache_data(max_entries=64, show_spinner=False)
def _run_meta(path: str, signature: tuple) -> Run:
    return load_run(Path(path), tables=())


@st.cache_data(max_entries=96, show_spinner=False)
def _table(path: str, name: str, signature: tuple) -> pd.DataFrame:
    return read_table(Path(path) / f"{name}.parquet", TABLES[name])


def load_run_cached(path: Path, tables: tuple[str, ...] = tuple(TABLES)) -> Run:
    """A run through ``load_run`` / ``read_table``, cached per table; its status is re-read on every call.

    Raises TraceError (naming the file) for a directory that is not a readable run.
    """
    path = Path(path)
    if not path.is_dir():
        raise TraceError(f"{path} is not a run directory")
    meta = _run_meta(str(path), dir_signature(path, ("config.json", "data.parquet")))
    status = run_state(path)
    loaded = {t: _table(str(path), t, table_signature(path / f"{t}.parquet")) if t in tables else pd.DataFrame()
              for t in TABLES}
    return Run(path=path, config=meta.config, status=status, data=meta.data, **loaded)


def try_load_run(root: Path, run_id: str, tables: tuple[str, ...] = tuple(TABLES)) -> tuple[Run | None, str | None]:
    """(run, None) or (None, error text): one bad run never stops a page.

    A run that ``list_runs`` reports as corrupt is refused even when the tables this page needs happen to be
    readable, so a damaged run reads the same on every page.
    """
    try:
        path = run_path(root, run_id)
        listed = runs_table(root)
        bad = listed[(listed["run_id"] == run_id) & (listed["state"] == "corrupt")]
        if len(bad):
            return None, str(bad["error"].iloc[0])
        return load_run_cached(path, tables), None
    except TraceError as err:
        return None, str(err)
    except Exception as err:  # a foreign file in a run directory: still only this run's problem
        return None, f"{type(err).__name__}: {err}"


@st.cache_data(max_entries=32, show_spinner=False)
def _examples_joined(path: str, signature: tuple) -> pd.DataFrame:
    run = load_run_cached(Path(path), ("examples",))
    return join_examples(run.examples, run.data)


def join_examples(examples: pd.DataFrame, data: pd.DataFrame) -> pd.DataFrame:
    """examples.parquet rows with their training record (id, label, category, prompt, response) by example_index."""
    if examples.empty:
        return examples
    if data.empty or "example_index" not in data:
        return examples.copy()
    cols = [c for c in ("example_index", "example_id", "label", "category", "prompt", "response", "truncated")
            if c in data.columns]
    extra = [c for c in data.columns if c.startswith("risk_") and c not in examples.columns]
    right = data[cols + extra].rename(columns={c: f"data_{c}" for c in extra})
    return examples.merge(right, on="example_index", how="left")


def examples_joined(path: Path) -> pd.DataFrame:
    path = Path(path)
    sig = (table_signature(path / "examples.parquet"), _stat(path / "data.parquet"))
    return _examples_joined(str(path), sig)


@st.cache_data(max_entries=32, show_spinner=False)
def _step_batches(path: str, signature: tuple, max_items: int = 8) -> pd.DataFrame:
    """Per step: the batch's example ids and short prompts (for hover text)."""
    ex = _examples_joined(path, signature)
    if ex.empty:
        return pd.DataFrame(columns=["step", "batch"])
    ids = ex["example_id"].astype(str) if "example_id" in ex else ex["example_index"].astype(str)
    short = ex["prompt"].astype(str).str.slice(0, 48) if "prompt" in ex else ""
    ex = ex.assign(_item=ids + " · " + short if "prompt" in ex else ids)

    def fmt(items: pd.Series) -> str:
        items = list(items)
        more = f"<br>… and {len(items) - max_items} more" if len(items) > max_items else ""
        return "<br>".join(_html_escape(i) for i in items[:max_items]) + more

    return ex.groupby("step", sort=True)["_item"].agg(fmt).rename("batch").reset_index()


def step_batches(path: Path) -> pd.DataFrame:
    path = Path(path)
    return _step_batches(str(path), (table_signature(path / "examples.parquet"), _stat(path / "data.parquet")))


@st.cache_data(max_entries=16, show_spinner=False)
def _experiment(path: str, signature: tuple) -> tuple[dict, pd.DataFrame]:
    from staysafe.experiment import load_experiment

    return load_experiment(Path(path))


def load_experiment_cached(path: Path) -> tuple[dict, pd.DataFrame]:
    path = Path(path)
    return _experiment(str(path), dir_signature(path, ("experiment.json", "results.parquet", "results.md")))


def experiments_under(root: Path) -> list[Path]:
    from staysafe.experiment import list_experiments

    try:
        return list_experiments(Path(root))
    except OSError:
        return []


@st.cache_data(max_entries=16, show_spinner=False)
def _compare(path: str, signature: tuple) -> tuple[pd.DataFrame, dict]:
    path = Path(path)
    table = read_table(path / "compare.parquet")
    summary = read_json(path / "summary.json") if (path / "summary.json").is_file() else {}
    return table, summary


def load_compare(path: Path) -> tuple[pd.DataFrame, dict]:
    """A ``staysafe compare-risk`` directory: compare.parquet + summary.json (read with the trace readers)."""
    path = Path(path)
    if not (path / "compare.parquet").is_file():
        raise TraceError(f"{path / 'compare.parquet'} is missing: not a compare-risk directory")
    return _compare(str(path), dir_signature(path, ("compare.parquet", "summary.json")))


def compare_dirs(root: Path) -> list[Path]:
    """The root itself (``--out compare``) and folders below it (``--out compare/eval``) holding compare.parquet."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p.parent for p in sorted(root.glob("compare.parquet"))]
    found += [p.parent for depth in ("*", "*/*") for p in sorted(root.glob(f"{depth}/compare.parquet"))]
    return found


@st.cache_resource(max_entries=6, show_spinner=False)  # big read-only arrays: shared, not copied per rerun
def _activations(path: str, signature: tuple):
    from staysafe.probe import Activations

    return Activations.load(Path(path))


def load_activations(path: Path):
    """``Activations.load`` (cached); damaged files raise TraceError naming the directory."""
    path = Path(path)
    if not (path / "activations.npz").is_file() or not (path / "index.parquet").is_file():
        raise TraceError(f"{path} holds no saved activations (activations.npz + index.parquet)")
    try:
        return _activations(str(path), dir_signature(path, ("activations.npz", "index.parquet")))
    except Exception as err:
        raise TraceError(f"activations in {path} are damaged ({type(err).__name__}: {err})") from None


@st.cache_data(max_entries=16, show_spinner=False)
def _probe(path: str, signature: tuple):
    from staysafe.probe import Probe

    return Probe.load(Path(path))


def load_probe(path: Path):
    """``Probe.load`` (cached) or None when there is no probe file; a damaged probe raises ProbeError."""
    path = Path(path)
    if not path.is_file():
        return None
    return _probe(str(path), dir_signature(path.parent, (path.name, path.with_suffix(".npz").name)))


def activation_dirs(root: Path) -> list[Path]:
    """Folders under ``root`` (up to three levels) holding saved activations (``fit-probe --save-activations``)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for depth in ("", "*/", "*/*/", "*/*/*/"):
        out += [p.parent for p in sorted(root.glob(f"{depth}activations.npz"))]
    return out


@st.cache_data(max_entries=16, show_spinner=False)
def _projection(dirs: tuple[str, ...], signature: tuple, layer: int, method: str, fit_n: int, seed: int):
    arrays = [load_activations(Path(d)).values[layer] for d in dirs]
    return project_points(arrays, method, fit_n, seed)


def projection(dirs: list[Path], layer: int, method: str, fit_n: int, seed: int = 0):
    """Cached ``project_points`` over saved activation directories (same projection for all of them)."""
    sig = tuple(dir_signature(d, ("activations.npz", "index.parquet")) for d in dirs)
    return _projection(tuple(str(d) for d in dirs), sig, int(layer), method, int(fit_n), int(seed))


@st.cache_data(max_entries=32, show_spinner=False)
def _separability(directory: str, signature: tuple, layer: int, max_n: int = 2000, seed: int = 0) -> float:
    acts = load_activations(Path(directory))
    return separability_auroc(acts.values[layer], acts.index["label"].to_numpy(), max_n, seed)


def separability(directory: Path, layer: int) -> float:
    """Cross-validated AUROC of a fresh linear probe at ``layer`` (on <= 2,000 points): is intent separable?"""
    return _separability(str(directory), dir_signature(directory, ("activations.npz", "index.parquet")), int(layer))


@st.cache_data(max_entries=8, show_spinner=False)
def _hover_texts(path: str, signature: tuple) -> np.ndarray:
    index = load_activations(Path(path)).index
    return np.array([f"{_html_escape(l)} · {_html_escape(c)}<br>{wrap_html(p, 60, 3)}"
                     for l, c, p in zip(index["label"], index["category"], index["prompt"])], dtype=object)


def hover_texts(directory: Path) -> np.ndarray:
    """Hover text of saved activations (label · category, wrapped prompt), built once per folder."""
    return _hover_texts(str(directory), dir_signature(directory, ("activations.npz", "index.parquet")))
