"""Safety-utility trade-off: an experiment's runs as points (utility against final ASR by the default response
judge, or another recorded one, error bars over seeds); constant-kl's beta sweep drawn as a curve, every other
method a marker. Selecting a point opens its runs on the Training traces page."""

from __future__ import annotations

import pandas as pd
import streamlit as st

import charts
import loaders
import safe_text
import settings
import widgets
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

found = [(origin, exp, runs_root) for origin, root, runs_root in settings.experiment_roots()
         for exp in loaders.experiments_under(root)]
if not found:
    st.info(f"No experiment under {safe_text.code(cfg.experiments)} yet. A beta sweep of constant-kl beside the "
            "other methods draws the frontier:")
    st.code(f"staysafe experiment --scenario mixed --quick --methods sft,constant-kl,adaptive-probe,token-wise,lisa "
            f"--sweep beta=0.1,0.3,0.7 --out-dir {cfg.experiments} --runs-dir {cfg.runs}", language="bash",
            wrap_lines=True)
    st.stop()
by_label = {f"{exp.name} ({origin})": (origin, exp, runs_root) for origin, exp, runs_root in found}
own = [label for label, (origin, *_) in by_label.items() if origin == "yours"]
demo_curve = [label for label, (origin, exp, _) in by_label.items()
              if origin == "recorded demo" and exp.name == settings.DEMO_TRADEOFF]
first = (own[-1:] or demo_curve or list(by_label))[0]  # yours, else the demo's beta sweep
picked = st.selectbox("experiment", list(by_label), index=list(by_label).index(first), key="frontier_exp",
                      help="Your experiments, the recorded demo's (`tradeoff`: constant-kl's beta sweep beside the "
                           "adaptive methods) and the frontiers recorded for the README (benchmarks/results: their "
                           "tables; the points open runs only for your experiments and the demo's).")
origin, exp_dir, runs_root = by_label[picked]
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
note = (f"ASR by the {judge_name(judge)} judge (κ = {agreement['kappa']:.2f} "
        f"[{agreement['kappa_interval'][0]:.2f}, {agreement['kappa_interval'][1]:.2f}] against labelled answers)"
        if agreement else f"ASR by the {judge_name(judge)} judge")
spreads = sorted(set(points["spread"]))
st.caption(f"{note}. Error bars: {'; '.join(spreads)}. Grey diamond: the starting model (step 0). "
           f"State: {desc.get('state')}.")
if any(s.startswith("one seed: no") for s in spreads):
    st.warning("One seed and no interval recorded: these points carry no uncertainty, so a gap between two of them "
               "may be noise. Run the experiment with `--seeds 3` for a spread.")
picked = st.plotly_chart(fig, width="stretch", on_select="rerun", selection_mode="points",
                         key="frontier_chart", config={"displaylogo": False, **charts.DOWNLOAD})

pct = lambda lo, hi: [f"{100 * a:.0f}–{100 * b:.0f}" for a, b in zip(lo, hi)]  # noqa: E731
table = pd.DataFrame({
    "method": points["label"], xlabel: points["x"].round(3),
    "utility bars": [f"{a:.3f}–{b:.3f}" for a, b in zip(points["x_lo"], points["x_hi"])],
    "final ASR %": (points["y"] * 100).round(0), "ASR bars %": pct(points["y_lo"], points["y_hi"]),
    "bars": points["spread"], "seeds": points["seeds"], "on frontier": points["on frontier"], "runs": points["runs"]})
st.dataframe(table, hide_index=True, width="stretch",
             column_config={"method": st.column_config.TextColumn(pinned=True)})

chosen = [p.get("customdata", [None])[0] for p in (picked.selection.points if picked and picked.selection else [])]
chosen = [r for c in chosen if c for r in str(c).split(", ")]
present = {r for r in (loaders.runs_table(runs_root)["run_id"] if runs_root.is_dir() else [])}
options = [r for c in points["runs"] for r in c.split(", ") if r in present]
if not options:
    st.caption(f"The runs of this experiment are not under {safe_text.code(runs_root)} (recorded benchmark "
               "experiments ship their results table only), so there are no traces to open.")
    st.stop()
widgets.reset_on_change("frontier_runs", (str(exp_dir), tuple(chosen)),  # a new selection replaces the picked runs
                        [r for r in chosen if r in options])
runs = st.multiselect("open in Training traces (or select points above)", options, key="frontier_runs")
if st.button("Open the traces", disabled=not runs, key="frontier_open", type="primary"):
    settings.show_source(settings.DEMO if origin == "recorded demo" else settings.OWN)
    st.session_state["traces_runs"] = list(runs)
    st.switch_page("views/traces.py")
