"""Dashboard settings: the data roots (sidebar and environment), the page shell, and path checks that keep
every path a page opens inside its root."""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

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


def sidebar_settings() -> Settings:
    """The roots, editable in the sidebar (defaults: ``./runs`` etc. or the STAYSAFE_* environment variables)."""
    with st.sidebar.expander("Settings: data folders", expanded=False):
        for name, (env, default, what) in ROOTS.items():
            st.text_input(f"{name} root", value=_default(name), key=f"root_{name}",
                          help=f"Folder with {what}. Default {safe_text.code(default)} or `${env}`.")
        st.caption(f"Demo data: {safe_text.code(demo_dir())} (`${DEMO_ENV}`)")
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
