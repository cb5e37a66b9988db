"""Shared dashboard helpers: settings, cached loaders, run pickers, path checks, error boxes, chart style.

Every loader reads through the library's reader API (``staysafe.traces``, ``staysafe.experiment``,
``staysafe.probe``) and is cached with ``st.cache_data`` keyed by the path *and* a cheap file signature (names,
sizes and mtimes of the files it reads), so a run that is still writing refreshes on the next rerun while a
finished one is read once.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from staysafe.traces import TABLES, Run, TraceError, list_runs, load_run, read_json, read_table, run_state, safe_run_path

REPO = Path(__file__).resolve().parent.parent
ROOTS = {  # setting -> (environment variable, default, what it holds)
    "runs": ("STAYSAFE_RUNS", "runs", "run directories (`staysafe train --runs-dir`)"),
    "experiments": ("STAYSAFE_EXPERIMENTS", "experiments", "experiment directories (`staysafe experiment --out-dir`)"),
    "compare": ("STAYSAFE_COMPARE", "compare", "judge-vs-probe comparisons (`staysafe compare-risk --out`)"),
    "probes": ("STAYSAFE_PROBES", "probes", "saved probes and activations (`staysafe fit-probe --out`)"),
}
DEMO_ENV = "STAYSAFE_DEMO_DIR"
SCATTER_GL_MIN = 1500  # lines with more points than this are drawn with WebGL
METHOD_COLORS = {"sft": "#c8553d", "constant-kl": "#d4a72c", "adaptive-probe": "#2a7f7a",
                 "adaptive-judge": "#3f6fb5", "adaptive-label": "#7a5ea8"}
PALETTE = ["#2a7f7a", "#c8553d", "#3f6fb5", "#d4a72c", "#7a5ea8", "#5b8c3a", "#b0487a", "#6b6b6b", "#1f9bb0",
           "#a0522d"]
LABEL_COLORS = {"harmful": "#c8553d", "benign": "#2a7f7a"}
STATE_ICONS = {"finished": ":material/check_circle:", "running": ":material/hourglass_top:",  # markdown only
               "created": ":material/hourglass_empty:", "failed": ":material/error:", "cancelled": ":material/cancel:",
               "interrupted": ":material/warning:", "corrupt": ":material/broken_image:"}
TEXT_COLUMNS = {"example_id", "label", "category", "prompt", "response", "messages", "id", "kind", "prompt_id"}


# ----------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    runs: Path
    experiments: Path
    compare: Path
    probes: Path
    demo: Path


def _default(name: str) -> str:
    env, default, _ = ROOTS[name]
    return os.environ.get(env) or default


_MD_ENTITIES = {"<": "&lt;", ">": "&gt;", "[": "&#91;", "]": "&#93;", "&": "&amp;"}
_MD_ESCAPE = re.compile(r"[\\`*~$|#!]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])|:(?=[A-Za-z/])")


def md(text) -> str:
    """Text from a run, a data file or a model, made inert inside Markdown, shown exactly as written: no links,
    images, HTML, emphasis, code, maths or Streamlit directives (``:red[...]``, ``:material/...:``) can come out of
    it. Brackets and angle brackets become character references, the other marks are backslash-escaped; plain words
    (``beta_min = 0.9``) stay as they are."""
    text = "" if text is None else str(text)
    text = _MD_ESCAPE.sub(lambda m: "\\" + m.group(0), text)
    return "".join(_MD_ENTITIES.get(c, c) for c in text).replace("\n", "  \n")


def html_text(text) -> str:
    """A run id or label for Plotly, whose legend and hover labels read a subset of HTML (links included)."""
    import html

    return html.escape("" if text is None else str(text))


def code(text) -> str:
    """An id or a path as inline code: a code span never renders links, HTML or emphasis; its fence is longer
    than any run of backticks inside (so a directory named with backticks cannot close it)."""
    text = " ".join(("" if text is None else str(text)).split())
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or longest else ""
    return f"{fence}{pad}{text}{pad}{fence}"


PUBLIC_ENV = "STAYSAFE_DASHBOARD_PUBLIC"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def binding_problem() -> str | None:
    """Why this dashboard must not serve, or None.

    Streamlit reads ``.streamlit/config.toml`` from the *current directory*, so started anywhere but the
    repository root it listens on every interface, and anyone who reaches the port can launch runs. A
    non-loopback address is accepted only when the user asked for it: ``--server.address`` on the command line,
    ``$STREAMLIT_SERVER_ADDRESS``, or ``$STAYSAFE_DASHBOARD_PUBLIC=1`` (e.g. for an address set in a config file).
    """
    from streamlit import config

    address = config.get_option("server.address")
    if address and (address in LOOPBACK or str(address).startswith("127.")):
        return None
    where = config.get_where_defined("server.address")
    if where in (config._DEFINED_BY_FLAG, config._DEFINED_BY_ENV_VAR) or os.environ.get(PUBLIC_ENV) == "1":
        return None
    shown = f"address {address}" if address else "every network interface (no server.address is set)"
    return (f"This dashboard is listening on {shown}, not on 127.0.0.1 only (set in: {where}); anyone who can "
            "reach the port could launch training runs. Start it from the repository root (its "
            "`.streamlit/config.toml` binds 127.0.0.1), or with `streamlit run dashboard/app.py --server.address "
            f"127.0.0.1`. To expose it deliberately, pass `--server.address 0.0.0.0` or set `{PUBLIC_ENV}=1`.")


def sidebar_settings() -> Settings:
    """The roots, editable in the sidebar (defaults: ``./runs`` etc. or the STAYSAFE_* environment variables)."""
    with st.sidebar.expander("Settings: data folders", expanded=False):
        for name, (env, default, what) in ROOTS.items():
            st.text_input(f"{name} root", value=_default(name), key=f"root_{name}",
                          help=f"Folder with {what}. Default {code(default)} or `${env}`.")
        st.caption(f"Demo data: {code(demo_dir())} (`${DEMO_ENV}`)")
    return settings()


def demo_dir() -> Path:
    return Path(os.environ.get(DEMO_ENV) or REPO / "data" / "demo")


_shell = threading.local()  # one script run per thread: is this run going through app.py?


PAGE_CONFIG = {"page_title": "StaySafe", "page_icon": ":material/shield:", "layout": "wide"}


def configure_page() -> None:
    st.set_page_config(**PAGE_CONFIG)


@contextlib.contextmanager
def app_shell():
    """``app.py`` runs the chosen page inside this, so the page knows the shell (config, sidebar) is drawn."""
    _shell.active = True
    try:
        yield
    finally:
        _shell.active = False


def page_setup() -> Settings:
    """First call of every page: the settings, with the app shell (page config, sidebar) drawn when a page file is
    run on its own (as ``AppTest`` may) rather than through ``app.py``'s navigation."""
    if not getattr(_shell, "active", False):
        configure_page()
        sidebar_settings()
    return settings()


def settings() -> Settings:
    """The current roots (from the sidebar widgets when the app shell ran, else the defaults)."""
    def root(name):
        value = st.session_state.get(f"root_{name}") or _default(name)
        return Path(value).expanduser()

    return Settings(runs=root("runs"), experiments=root("experiments"), compare=root("compare"),
                    probes=root("probes"), demo=demo_dir())


# ----------------------------------------------------------------------------------------------- safe paths


def safe_subdir(root: Path, relative: str) -> Path:
    """Resolve a user-typed directory inside ``root``; refuse absolute paths, ``..`` and links that leave it.

    The equivalent of ``staysafe.traces.safe_run_path`` for experiment, compare and activation directories (which
    may be nested, e.g. ``compare/eval``). Raises TraceError naming the input.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise TraceError("an empty directory name was given")
    rel = Path(relative.strip())
    if rel.is_absolute() or relative.strip().startswith("~"):
        raise TraceError(f"{relative!r} is an absolute path: give a folder inside {root}")
    if any(part == ".." for part in rel.parts):
        raise TraceError(f"{relative!r} contains '..': give a folder inside {root}")
    base = Path(root).resolve()
    path = (base / rel).resolve()
    if path != base and base not in path.parents:
        raise TraceError(f"{relative!r} points outside {base}")
    return path


def run_path(root: Path, run_id: str) -> Path:
    """A run id typed or picked by the user, checked by the library's ``safe_run_path``."""
    return safe_run_path(root, run_id)


# ----------------------------------------------------------------------------------------------- signatures


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


# ----------------------------------------------------------------------------------------------- cached loaders


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


# ----------------------------------------------------------------------------------------------- labels


def method_label(config_or_row: dict) -> str:
    """``sft``, ``constant-kl`` or ``adaptive-<risk>`` (the experiment's method names)."""
    method = config_or_row.get("method")
    if method == "adaptive":
        return f"adaptive-{config_or_row.get('risk')}"
    return str(method) if method else "?"


def run_label(row: dict) -> str:
    state = row.get("state") or "?"
    if state == "corrupt":
        return f"{row['run_id']} (corrupt)"
    return f"{row['run_id']} · {method_label(row)} · {state}"


def fmt_pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * float(x):.0f}%"


def asr_columns(evals: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(judge ASR columns, keyword ASR column if present): judge ASR first, keyword is the weak judge."""
    judges = sorted(c for c in evals.columns if c.startswith("asr_") and c != "asr_keyword")
    return judges, (["asr_keyword"] if "asr_keyword" in evals.columns else [])


def metric_title(col: str) -> str:
    if col == "asr_keyword":
        return "keyword ASR (weak judge)"
    if col.startswith("asr_"):
        return f"judge ASR ({col[4:]})"
    return {"over_refusal": "over-refusal (benign refused)", "benign_nll": "benign NLL (utility)",
            "nll": "NLL", "kl": "KL(ref ‖ model)", "loss": "loss", "beta": "β (KL weight)",
            "risk": "batch risk used"}.get(col, col.replace("risk_", "risk: ") if col.startswith("risk_") else col)


# ----------------------------------------------------------------------------------------------- widgets


def reset_on_change(key: str, signature) -> None:
    """Forget a widget's value when what it chooses from changed (another run, other options): back to its default.

    Streamlit keeps a keyed widget's value across reruns even when its options change; a filter chosen for one run
    would then silently apply to the next.
    """
    marker = f"_options_of_{key}"
    if st.session_state.get(marker) != signature:
        st.session_state.pop(key, None)
        st.session_state[marker] = signature


def pick_runs(runs: pd.DataFrame, label: str, key: str, multi: bool = False, default_n: int = 1,
              prefer=None) -> list[str]:
    """A run picker over ``runs_table`` rows; defaults to the newest readable runs (those ``prefer(row)`` accepts
    first, e.g. runs that were regularized)."""
    options = runs["run_id"].tolist()
    labels = dict(zip(runs["run_id"], runs["label"]))
    readable = [r["run_id"] for r in runs.to_dict("records") if r["state"] != "corrupt"]
    if prefer is not None:
        preferred = [r["run_id"] for r in runs.to_dict("records") if r["state"] != "corrupt" and prefer(r)]
        readable = [r for r in readable if r not in preferred] + preferred
    if multi:
        default = readable[-default_n:] if readable else []
        return st.multiselect(label, options, default=default, format_func=lambda r: labels.get(r, r), key=key)
    if not options:
        return []
    index = options.index(readable[-1]) if readable else 0
    chosen = st.selectbox(label, options, index=index, format_func=lambda r: labels.get(r, r), key=key)
    return [chosen] if chosen else []


def regularized_run_or_stop(root: Path, key: str, tables: tuple[str, ...] = ("examples",)) -> Run:
    """The run picked on a page about risk and beta (regularized runs offered first); stops the page with a plain
    note when there is none or it cannot be read."""
    runs = runs_table(root)
    if runs.empty:
        no_runs(root)
        st.stop()
    run_id = pick_runs(runs, "run", key=key, prefer=lambda r: r.get("method") != "sft")[0]
    run, error = try_load_run(root, run_id, tables)
    if error:
        run_error(run_id, error)
        st.stop()
    return run


def pick_folder(root: Path, found: list[Path], what: str, key: str, placeholder: str) -> str:
    """A folder under ``root``: one of those ``found`` or one typed (checked later with ``safe_subdir``)."""
    base = root.resolve() if root.exists() else root
    options = [str(p.relative_to(base)) if p != base else "." for p in found]
    c1, c2 = st.columns(2)
    picked = c1.selectbox("found folders", options or ["(none found)"], key=key)
    typed = c2.text_input(f"or a folder inside the {what} root", key=f"{key}_typed", placeholder=placeholder)
    return typed.strip() or (picked if options else "")


def no_runs(root: Path) -> None:
    st.info(f"No runs under {code(root)} yet. Launch one on the **Launch a run** page, or from a terminal:")
    st.code(f"staysafe train --scenario harmful --method sft --steps 40 --runs-dir {root}", language="bash")


def run_error(run_id: str, error: str) -> None:
    st.error(f"Run {code(run_id)} cannot be read: {md(error)}")


def status_line(run: Run) -> None:
    """One line about a run's state: running (with step), failed (with the error), interrupted..."""
    state = run.status.get("state")
    steps = int(run.steps["step"].max()) if len(run.steps) else 0
    total = run.config.get("steps")
    if state == "failed":
        st.warning(f"Run {code(run.id)} failed after {steps} steps: {md(run.status.get('error'))}")
    elif state in ("interrupted", "cancelled"):
        st.warning(f"Run {code(run.id)} was {state} after {steps}/{total} steps: {md(run.status.get('error') or '')}")
    elif state in ("running", "created"):
        st.info(f"Run {code(run.id)} is {state}: {steps}/{total} steps so far (this page refreshes on every rerun).")


# ----------------------------------------------------------------------------------------------- charts


def style(fig: go.Figure, height: int = 420, title: str | None = None, legend_below: bool = False) -> go.Figure:
    """The dashboard's calm chart style: white background, light grid, readable fonts, room for labels."""
    fig.update_layout(template="plotly_white", height=height, margin=dict(l=60, r=20, t=60 if title else 30, b=50),
                      font=dict(size=13), hoverlabel=dict(font_size=12, align="left"), title=title)
    if legend_below:
        fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.15, xanchor="left", x=0))
    return fig


def line_trace(x, y, name: str, color: str | None = None, **kw):
    """Scatter for short lines, Scattergl (WebGL) for long ones."""
    cls = go.Scattergl if len(x) > SCATTER_GL_MIN else go.Scatter
    return cls(x=x, y=y, name=name, mode=kw.pop("mode", "lines+markers" if len(x) <= 60 else "lines"),
               line=dict(color=color, width=2), marker=dict(size=5, color=color), **kw)


def color_for(i: int, name: str | None = None) -> str:
    if name in METHOD_COLORS:
        return METHOD_COLORS[name]
    return PALETTE[i % len(PALETTE)]


def plotly(fig: go.Figure, key: str | None = None, **kw):
    return st.plotly_chart(fig, key=key, config={"displaylogo": False}, **kw)


def smooth(series: pd.Series, how: str, amount: float) -> pd.Series:
    """EMA (``amount`` = weight of the past, 0..0.99) or a centred rolling mean over ``amount`` steps."""
    if how == "EMA" and amount > 0:
        return series.ewm(alpha=1 - amount, adjust=False).mean()
    if how == "rolling" and amount > 1:
        return series.rolling(int(amount), min_periods=1, center=True).mean()
    return series


def _html_escape(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def short(text, n: int = 90) -> str:
    text = "" if text is None or (isinstance(text, float) and math.isnan(text)) else str(text)
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def wrap_html(text, width: int = 60, max_lines: int = 4) -> str:
    """Hover text: escaped and wrapped to a few lines (Plotly does not wrap)."""
    import textwrap

    lines = textwrap.wrap(" ".join(str(text).split()), width) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += " …"
    return "<br>".join(_html_escape(l) for l in lines)


# ----------------------------------------------------------------------------------------------- projections

PROJECTIONS = ("PCA", "UMAP", "t-SNE")
MAX_FIT = 5000


UMAP_EXACT_MAX = 5000  # UMAP's own transform runs optimisation epochs (~2 s per 1,000 points on 2 CPU cores)


def project_points(arrays: list[np.ndarray], method: str, fit_n: int = 2000, seed: int = 0
                   ) -> tuple[list[np.ndarray], int, str]:
    """Project several point sets with ONE 2-d projection fitted on a sample of their union.

    PCA and UMAP are fitted on at most ``fit_n`` (<= 5,000) points and then place every point, so 100,000 points
    stay cheap. UMAP's own ``transform`` is used for up to 5,000 further points; beyond that each point is placed at
    the distance-weighted mean of its 10 nearest sampled neighbours (UMAP's transform initialisation, without its
    slow refinement epochs). t-SNE cannot place new points, so only the sample gets coordinates (others are NaN).
    Returns the coordinates per set, the number of points fitted on, and a note saying how the rest was placed.
    """
    sizes = [len(a) for a in arrays]
    union = np.concatenate([a.astype(np.float32) for a in arrays], axis=0)
    n = len(union)
    fit_n = int(min(max(10, fit_n), MAX_FIT, n))
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=fit_n, replace=False)) if fit_n < n else np.arange(n)
    rest = np.setdiff1d(np.arange(n), sample)
    mean = union[sample].mean(0)
    std = union[sample].std(0)
    std[std == 0] = 1.0
    z = (union - mean) / std
    note = "every point transformed"
    if method == "PCA":
        from sklearn.decomposition import PCA

        coords = PCA(n_components=2, random_state=seed).fit(z[sample]).transform(z)
    elif method == "UMAP":
        import umap
        from sklearn.decomposition import PCA

        k = int(min(50, z.shape[1], len(sample) - 1))
        pca = PCA(n_components=k, random_state=seed).fit(z[sample])
        zs = pca.transform(z[sample])
        reducer = umap.UMAP(n_components=2, n_neighbors=int(min(15, len(sample) - 1)), random_state=seed,
                            n_jobs=1).fit(zs)
        coords = np.full((n, 2), np.nan, dtype=np.float32)
        coords[sample] = reducer.embedding_
        if len(rest) and len(rest) <= UMAP_EXACT_MAX:
            coords[rest] = reducer.transform(pca.transform(z[rest]))
        elif len(rest):
            from sklearn.neighbors import NearestNeighbors

            nn = NearestNeighbors(n_neighbors=int(min(10, len(sample)))).fit(zs)
            for start in range(0, len(rest), 20000):
                chunk = rest[start:start + 20000]
                dist, idx = nn.kneighbors(pca.transform(z[chunk]))
                w = 1.0 / (dist + 1e-6)
                coords[chunk] = (reducer.embedding_[idx] * w[..., None]).sum(1) / w.sum(1, keepdims=True)
            note = (f"the other {len(rest):,} points placed at the weighted mean of their 10 nearest sampled "
                    "neighbours (UMAP's own transform is used up to 5,000 points)")
    elif method == "t-SNE":
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE

        k = int(min(50, z.shape[1], len(sample) - 1))
        x = PCA(n_components=k, random_state=seed).fit_transform(z[sample])
        coords = np.full((n, 2), np.nan, dtype=np.float32)
        coords[sample] = TSNE(n_components=2, perplexity=float(min(30, max(2, (len(sample) - 1) / 3))),
                              random_state=seed, init="pca").fit_transform(x)
        note = "t-SNE cannot place new points, so only the sample is shown" if len(rest) else note
    else:
        raise ValueError(f"unknown projection {method!r}: choose one of {', '.join(PROJECTIONS)}")
    out, start = [], 0
    for size in sizes:
        out.append(np.asarray(coords[start:start + size], dtype=np.float32))
        start += size
    return out, fit_n, note


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
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    acts = load_activations(Path(directory))
    y = (acts.index["label"] == "harmful").to_numpy().astype(int)
    keep = np.isin(acts.index["label"].to_numpy(), ["harmful", "benign"])
    x = acts.values[layer].astype(np.float32)[keep]
    y = y[keep]
    if len(set(y)) < 2 or min(np.bincount(y)) < 5:
        return float("nan")
    if len(y) > max_n:
        idx = np.random.default_rng(seed).choice(len(y), max_n, replace=False)
        x, y = x[idx], y[idx]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced"))
    p = cross_val_predict(clf, x, y, cv=StratifiedKFold(5, shuffle=True, random_state=seed), method="predict_proba")
    return float(roc_auc_score(y, p[:, 1]))


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
