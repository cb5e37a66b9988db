"""Safety-utility trade-off: an experiment's runs as points (utility against final ASR by the default response
judge, or another recorded one, error bars over seeds); constant-kl's beta sweep drawn as a curve, every other
method a marker. Selecting a point opens its runs on the Training traces page."""

from __future__ import annotations

import streamlit as st

import charts
import loaders
import safe_text
import settings
from staysafe.eval.frontier import (
    DEFAULT_JUDGE,
    axes,
    frontier_figure,
    frontier_points,
    judge_name,
    judges,
    on_frontier,
)
from staysafe.eval.validation import measured_agreement
from staysafe.runs.traces import TraceError

cfg = settings.page_setup()
st.title(":material/insights: Safety-utility trade-off")
st.caption("Each point is a method (or one value of a swept option) of one experiment: its utility after "
           "fine-tuning against the share of held-out harmful requests it then answers. Down and to the better "
           "utility is better; a point no other beats on both is on the frontier.")

exps = loaders.experiments_under(cfg.experiments)
if not exps:
    st.info(f"No experiment under {safe_text.code(cfg.experiments)} yet. A beta sweep of constant-kl beside the "
            "other methods draws the frontier:")
    st.code(f"staysafe experiment --scenario mixed --quick --methods sft,constant-kl,adaptive-probe,token-wise,lisa "
            f"--sweep beta=0.1,0.3,0.7 --out-dir {cfg.experiments} --runs-dir {cfg.runs}", language="bash",
            wrap_lines=True)
    st.stop()
exp_dir = st.selectbox("experiment", exps, index=len(exps) - 1, format_func=lambda p: p.name, key="frontier_exp")
try:
    desc, results = loaders.load_experiment_cached(exp_dir)
except TraceError as err:
    st.error(f"Cannot read this experiment: {safe_text.md(err)}")
    st.stop()
if results.empty:
    st.info(f"Experiment {safe_text.code(exp_dir.name)} has no finished run yet ({desc.get('state')}).")
    st.stop()

judge = st.radio("ASR by", judges(results), horizontal=True, key="frontier_judge",
                 format_func=lambda j: judge_name(j) + (" (the default judge)" if j == DEFAULT_JUDGE else ""),
                 help="the default response judge first; the keyword judge over-counts but sees refuse-then-help "
                      "answers the default misses (see each judge's κ)")
x, xlabel, y = axes(results, judge)
points = frontier_points(results, judge)
points["on frontier"] = on_frontier(points, higher_x_is_better=x == "final_task_accuracy")
fig = frontier_figure(results, title=None, judge=judge)  # coloured by the registry, as on every page
charts.style(fig, height=520)
agreement = measured_agreement().get(judge)
note = (f"ASR by the {judge_name(judge)} judge (κ = {agreement['kappa']:.2f} against labelled answers)" if agreement
        else f"ASR by the {judge_name(judge)} judge")
seeds = int(results["seed"].nunique()) if "seed" in results else 1
st.caption(f"{note}; error bars: std over {seeds} seed(s) (none with one seed). State: {desc.get('state')}.")
picked = st.plotly_chart(fig, use_container_width=True, on_select="rerun", selection_mode="points",
                         key="frontier_chart")

table = points[["label", "x", "y", "x_std", "y_std", "seeds", "on frontier", "runs"]].rename(columns={
    "label": "method", "x": xlabel, "y": "final ASR", "x_std": "utility std", "y_std": "ASR std"})
table["final ASR"] = (table["final ASR"] * 100).round(0)
table["ASR std"] = (table["ASR std"] * 100).round(0)
st.dataframe(table, hide_index=True, use_container_width=True)

chosen = [p.get("customdata", [None])[0] for p in (picked.selection.points if picked and picked.selection else [])]
chosen = [r for c in chosen if c for r in str(c).split(", ")]
options = [r for c in points["runs"] for r in c.split(", ")]
runs = st.multiselect("open in Training traces (or select points above)", options, default=chosen,
                      key="frontier_runs")
if st.button("Open the traces", disabled=not runs, key="frontier_open"):
    st.session_state["traces_runs"] = list(runs)
    st.switch_page("views/traces.py")
