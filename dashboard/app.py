"""StaySafe dashboard: the front door. ``streamlit run dashboard/app.py``

Sets the page, the sidebar settings (runs / experiments / compare / probes roots) and the navigation over one file
per page in ``dashboard/views/``. Shared helpers: ``settings.py`` (roots, page shell, path checks),
``loaders.py`` (cached readers), ``widgets.py`` (schema-driven form widgets, pickers), ``charts.py`` (style, labels).
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import settings` etc. from every page

import settings  # noqa: E402

st.set_page_config(**settings.PAGE_CONFIG)
problem = settings.binding_problem()
if problem:  # refuse to serve anything on an address nobody asked for
    st.error(problem)
    st.stop()

PAGES = [
    st.Page("views/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("views/launch.py", title="Launch a run", icon=":material/rocket_launch:"),
    st.Page("views/traces.py", title="Training traces", icon=":material/show_chart:"),
    st.Page("views/activations.py", title="Activation space", icon=":material/scatter_plot:"),
    st.Page("views/judge_vs_probe.py", title="Judge vs probe", icon=":material/balance:"),
    st.Page("views/asr.py", title="ASR over training", icon=":material/target:"),
    st.Page("views/regularization.py", title="Regularization explorer", icon=":material/manage_search:"),
    st.Page("views/frontier.py", title="Safety-utility trade-off", icon=":material/insights:"),
    st.Page("views/demo.py", title="Guided demo", icon=":material/school:"),
]

page = st.navigation(PAGES)
settings.sidebar_settings()
with settings.app_shell():  # pages see that the config and the sidebar are drawn
    page.run()
