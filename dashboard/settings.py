"""Dashboard settings: the data roots (sidebar and environment), the page shell, and path checks that keep
every path a page opens inside its root."""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

import charts
import safe_text
from staysafe.runs.traces import (
    TraceError,
    safe_run_path,
)

REPO = Path(__file__).resolve().parent.parent


ROOTS = {  # setting -> (environment variable, default, what it holds)
    "runs": ("STAYSAFE_RUNS", "runs", "run directories (`staysafe train --runs-dir`)"),
    "experiments": ("STAYSAFE_EXPERIMENTS", "experiments", "experiment directories (`staysafe experiment --out-dir`)"),
    "compare": ("STAYSAFE_COMPARE", "compare", "judge-vs-probe comparisons (`staysafe compare-risk --out`)"),
    "probes": ("STAYSAFE_PROBES", "probes", "saved probes and activations (`staysafe fit-probe --out`)"),
}


DEMO_ENV = "STAYSAFE_DEMO_DIR"
RESULTS_ENV = "STAYSAFE_RESULTS_DIR"  # the shipped experiments (benchmarks/results): results tables, no runs
OWN, DEMO = "your runs", "recorded demo"


@dataclass(frozen=True)
class Settings:
    """The roots a page reads: the user's own (sidebar) or the recorded demo's (shipped, read-only)."""

    runs: Path
    experiments: Path
    compare: Path
    probes: Path
    demo: Path
    recorded: bool = False  # shipped data: read-only, nothing is launched into it


def _default(name: str) -> str:
    env, default, _ = ROOTS[name]
    return os.environ.get(env) or default


def sidebar_settings() -> Settings:
    """Which data is shown (the user's runs or the recorded demo) and the user's roots, editable in the sidebar
    (defaults: ``./runs`` etc. or the STAYSAFE_* environment variables)."""
    if _NEXT_SOURCE in st.session_state:
        st.session_state[DATA_KEY] = st.session_state.pop(_NEXT_SOURCE)
    if DATA_KEY not in st.session_state:  # first open: the user's runs if there are any, else the recorded demo
        st.session_state[DATA_KEY] = OWN if has_data(own_settings()) or not has_data(demo_settings()) else DEMO
    st.sidebar.radio("Data shown", [OWN, DEMO], key=DATA_KEY, captions=[
        f"under {own_settings().runs}; launched runs go here", f"shipped with StaySafe ({demo_dir()}), read-only"],
        help="The recorded demo is a real experiment recorded with `staysafe experiment` and shipped in `data/demo`; "
             "every page can show it. Runs you launch are written to your runs root only.")
    st.sidebar.markdown("**Glossary** (hover the icon)", help="\n\n".join(
        f"**{term}**: {text}" for term, text in charts.GLOSSARY.items()))
    with st.sidebar.expander("Settings: data folders", expanded=False):
        for name, (env, default, what) in ROOTS.items():
            st.text_input(f"{name} root", value=_default(name), key=f"root_{name}",
                          help=f"Folder with {what}. Default {safe_text.code(default)} or `${env}`.")
        st.caption(f"Demo data: {safe_text.code(demo_dir())} (`${DEMO_ENV}`)")
    return settings()


def demo_dir() -> Path:
    return Path(os.environ.get(DEMO_ENV) or REPO / "data" / "demo")


def results_dir() -> Path:
    return Path(os.environ.get(RESULTS_ENV) or REPO / "benchmarks" / "results")


DATA_KEY, _NEXT_SOURCE = "data_source", "_data_source_next"


def has_data(cfg: Settings) -> bool:
    """Whether a root holds any run or experiment (cheap: one listing each)."""
    def entries(root: Path) -> bool:
        try:
            return any(not e.name.startswith(".") and e.is_dir() for e in os.scandir(root))
        except OSError:
            return False

    return entries(cfg.runs) or entries(cfg.experiments)


DEMO_TRADEOFF = "tradeoff"  # the recorded demo's frontier experiment (the Safety-utility trade-off page opens it)


def demo_settings() -> Settings:
    """The recorded demo's roots: ``data/demo/{runs,experiment,compare}``; its runs hold the saved activations."""
    demo = demo_dir()
    return Settings(runs=demo / "runs", experiments=demo, compare=demo / "compare", probes=demo / "runs", demo=demo,
                    recorded=True)


def experiment_roots() -> list[tuple[str, Path, Path]]:
    """Where experiments are found, as (origin, experiments root, runs root): the user's, the recorded demo's and
    the shipped benchmark results (``benchmarks/results``: their results tables; a frontier that ships its runs
    keeps them inside its own folder, for re-judging, and the pages do not open them)."""
    own, demo = own_settings(), demo_settings()
    return [("yours", own.experiments, own.runs), ("recorded demo", demo.experiments, demo.runs),
            ("recorded benchmark", results_dir(), results_dir() / "runs")]


def show_source(source: str) -> None:
    """Switch the data shown from the next script run on (before a page switch that opens runs of that source; the
    sidebar's radio is already drawn in this run, so it takes the value when it is next drawn)."""
    st.session_state[_NEXT_SOURCE] = source


def source_note(cfg: Settings) -> None:
    """A line above every page that shows recorded data: what it is and how to see one's own."""
    if cfg.recorded:
        st.caption(f":material/inventory_2: **Recorded data**: the demo experiment shipped in "
                   f"{safe_text.code(cfg.demo)} (read-only). Your own runs: *Data shown* in the sidebar.")


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


def page_setup(own: bool = False) -> Settings:
    """First call of every page: the settings of the data shown (``own``: always the user's roots, for pages that
    write), with the app shell (page config, sidebar) drawn when a page file is run on its own (as ``AppTest`` may)
    rather than through ``app.py``'s navigation."""
    if not getattr(_shell, "active", False):
        configure_page()
        sidebar_settings()
    cfg = own_settings() if own else settings()
    source_note(cfg)
    return cfg


def settings() -> Settings:
    """The roots of the data shown: the recorded demo's, or the user's."""
    return demo_settings() if st.session_state.get(DATA_KEY) == DEMO else own_settings()


def own_settings() -> Settings:
    """The user's roots (from the sidebar widgets when the app shell ran, else the defaults)."""
    def root(name):
        value = st.session_state.get(f"root_{name}") or _default(name)
        return Path(value).expanduser()

    return Settings(runs=root("runs"), experiments=root("experiments"), compare=root("compare"),
                    probes=root("probes"), demo=demo_dir())


def safe_subdir(root: Path, relative: str) -> Path:
    """Resolve a user-typed directory inside ``root``; refuse absolute paths, ``..`` and links that leave it.

    The equivalent of ``staysafe.runs.traces.safe_run_path`` for experiment, compare and activation directories (which
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
