"""Regularization explorer: every training example with its risk scores, the β it received and its NLL/KL, per step
and aggregated per example. Answers "which training examples triggered regularization?"."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

import charts
import loaders
import safe_text
import settings
import widgets
from staysafe.methods import regularised

cfg = settings.page_setup()
st.title(":material/manage_search: Regularization explorer")
st.caption("β is the weight of the KL pull toward the safe reference that an example's batch received "
           "(0 = plain fine-tuning, 1 = stay on the reference).")

run = widgets.regularized_run_or_stop(cfg.runs, "reg_run", ("examples", "steps"))  # steps: for the status line
widgets.status_line(run)
ex = loaders.examples_joined(run.path)
if ex.empty:
    st.info(f"Run {safe_text.code(run.id)} has recorded no training step with examples yet, so there is nothing to "
            "explore (one row per example per step).")
    st.stop()
method = charts.method_label(run.config)
if not regularised(run.config):
    st.info(
        f"This is a **{safe_text.md(method)}** run: "
        "β is 0 for every example, nothing was regularized. Pick a constant-kl or "
        "adaptive run to see where the KL pull went."
    )

risk_cols = ["risk"] + sorted(c for c in ex.columns if c.startswith("risk_"))
risk_cols = [c for c in risk_cols if ex[c].astype(float).notna().any()] or ["risk"]  # sft: no batch risk
for col in ("label", "category"):
    if col not in ex:
        ex[col] = "?"
ex["label"] = ex["label"].fillna("?")
ex["category"] = ex["category"].fillna("?")

# Every filter derives from this run's rows and is set (not only dropped) on a switch, so what the widgets show is
# what is plotted.
label_options, cat_options = sorted(ex["label"].unique()), sorted(ex["category"].unique())
steps = sorted(int(s) for s in ex["step"].unique())  # the steps recorded
for key, options, default in (("reg_risk", risk_cols, risk_cols[0]), ("reg_labels", label_options, label_options),
                              ("reg_cats", cat_options, []), ("reg_beta", (), 0.0), ("reg_sort", (), "mean_beta")):
    widgets.reset_on_change(key, (run.id, tuple(options)), default)
with st.container(border=True):
    f1, f2, f3 = st.columns(3)
    risk_col = f1.selectbox("risk source", risk_cols, format_func=lambda c: {
        "risk": f"risk used for β ({run.config.get('risk')})"}.get(c, charts.metric_title(c)), key="reg_risk")
    labels = f2.multiselect("label", label_options, key="reg_labels")
    cats = f3.multiselect("category (all when empty)", cat_options, key="reg_cats")
    g1, g2 = st.columns(2)
    if len(steps) > 1:
        # a range slider cannot take its value from session state alone: a new widget per run and step list
        # (a live run's new step resets it to all steps)
        step_range = g1.select_slider("steps", steps, (steps[0], steps[-1]),
                                      key=f"reg_steps_{run.id}_{steps[0]}_{steps[-1]}_{len(steps)}",
                                      help=f"The steps recorded in this run: {steps[0]} to {steps[-1]}.")
    else:
        step_range = (steps[0], steps[0])
        g1.caption(f"Only step {steps[0]} is recorded so far: no step range to choose.")
    beta_above = g2.slider("only rows with β above", 0.0, 1.0, step=0.01, key="reg_beta")

rows = ex[ex["label"].isin(labels) & ex["step"].between(*step_range) & (ex["beta"] > beta_above if beta_above > 0
                                                                         else True)]
if cats:
    rows = rows[rows["category"].isin(cats)]
if rows.empty:
    st.info("No example rows match these filters.")
    st.stop()

text_cols = [c for c in ("example_id", "label", "category", "prompt", "response") if c in rows]
agg = rows.groupby("example_index").agg(
    times_seen=("step", "size"), first_step=("step", "min"), mean_beta=("beta", "mean"), max_beta=("beta", "max"),
    mean_risk=(risk_col, "mean"), mean_nll=("nll", "mean"), mean_kl=("kl", "mean"),
    **{c: (c, "first") for c in text_cols}).reset_index()
beta_mid = (float(run.config.get("beta_min", 0)) + float(run.config.get("beta_max", 1))) / 2
m = st.columns(4)
m[0].metric("examples (rows)", f"{len(agg):,} ({len(rows):,})")
m[1].metric("mean β", f"{rows['beta'].mean():.3f}")
by_label = rows.groupby("label")["beta"].mean()
m[2].metric("mean β harmful / benign", " / ".join(f"{by_label[g]:.2f}" if g in by_label else "n/a"
                                                  for g in ("harmful", "benign")))
m[3].metric(f"examples with max β > {beta_mid:.2f}", f"{int((agg['max_beta'] > beta_mid).sum()):,}",
            help="β above the midpoint of [β min, β max]: the regularizer judged the batch risky.")

left, right = st.columns([3, 2])
with left:
    fig = go.Figure()
    for g in sorted(agg["label"].unique()):
        a = agg[agg["label"] == g]
        hover = np.array([f"{charts._html_escape(i)} · {charts._html_escape(c)} · seen {n}×<br>"
                          f"{charts.wrap_html(p, 60, 3)}" for i, c, n, p in
                          zip(a.get("example_id", a["example_index"]), a["category"], a["times_seen"],
                              a.get("prompt", [""] * len(a)))], dtype=object)
        fig.add_trace(go.Scattergl(
            x=a["mean_risk"], y=a["mean_beta"], mode="markers", name=g, text=hover,
            marker=dict(size=6 + 3 * np.sqrt(a["times_seen"].to_numpy()), color=charts.LABEL_COLORS.get(g),
                        opacity=0.7, line=dict(width=0.5, color="white")),
            hovertemplate="%{text}<br>mean risk %{x:.2f} · mean β %{y:.2f}<extra></extra>"))
    fig.update_xaxes(title_text=f"mean {charts.metric_title(risk_col)}")
    fig.update_yaxes(title_text="mean β received")
    charts.style(fig, height=400, title="Per training example: risk vs β (size = times seen)")
    charts.plotly(fig, key="reg_scatter")
with right:
    fig = go.Figure()
    for g in sorted(rows["label"].unique()):
        fig.add_trace(go.Histogram(x=rows.loc[rows["label"] == g, "beta"], name=g, opacity=0.7, nbinsx=30,
                                   marker_color=charts.LABEL_COLORS.get(g)))
    fig.update_layout(barmode="overlay")
    fig.update_xaxes(title_text="β per example row")
    fig.update_yaxes(title_text="rows")
    charts.style(fig, height=400, title="β received, by label")
    charts.plotly(fig, key="reg_hist")

tab_agg, tab_rows = st.tabs(["Per example", "Per example per step"])
with tab_agg:
    sort_names = {"mean_beta": "mean β", "max_beta": "max β", "mean_risk": f"mean {charts.metric_title(risk_col)}",
                  "times_seen": "times seen", "mean_kl": "mean KL", "mean_nll": "mean NLL"}
    sort_by = st.selectbox("sort by", list(sort_names), format_func=sort_names.get, key="reg_sort")
    agg = agg.sort_values([sort_by, "example_index"], ascending=[False, True]).reset_index(drop=True)
    shown = agg.head(2000)
    selection = st.dataframe(
        shown, hide_index=True, height=360, on_select="rerun", selection_mode="single-row", key="reg_table",
        # the readable id and the figures first (visible at 1024 px), the internal index hidden when an id exists
        column_order=["example_id" if "example_id" in shown else "example_index",
                      *[c for c in ("label",) if c in shown], "mean_beta", "max_beta", "mean_risk", "times_seen",
                      *[c for c in ("category",) if c in shown], "mean_nll", "mean_kl",
                      *[c for c in ("prompt",) if c in shown]],
        column_config={"example_id": st.column_config.TextColumn("example"),
                       "mean_beta": st.column_config.ProgressColumn("mean β", min_value=0.0, max_value=1.0,
                                                                    format="%.2f", width="small"),
                       "max_beta": st.column_config.NumberColumn("max β", format="%.2f"),
                       "mean_risk": st.column_config.NumberColumn(sort_names["mean_risk"], format="%.2f"),
                       "times_seen": st.column_config.NumberColumn("times seen"),
                       "mean_nll": st.column_config.NumberColumn("mean NLL", format="%.3f"),
                       "mean_kl": st.column_config.NumberColumn("mean KL", format="%.4f"),
                       "prompt": st.column_config.TextColumn(width="medium")})
    if len(agg) > len(shown):
        st.caption(f"Showing the first {len(shown):,} of {len(agg):,} examples in this order.")
with tab_rows:
    raw_cols = [c for c in ("step", "example_id" if "example_id" in rows else "example_index", "label", "beta",
                            "risk", *[c for c in risk_cols if c != "risk"], "nll", "kl", "category", "fallback", "slot",
                            "prompt") if c in rows]
    st.dataframe(rows.sort_values(["step", "slot"])[raw_cols].head(5000), hide_index=True, height=360,
                 column_config={"example_id": st.column_config.TextColumn("example"),
                                "beta": st.column_config.NumberColumn("β", format="%.2f"),
                                **{c: st.column_config.NumberColumn(charts.metric_title(c), format="%.2f")
                                   for c in risk_cols},
                                "nll": st.column_config.NumberColumn("NLL", format="%.3f"),
                                "kl": st.column_config.NumberColumn("KL", format="%.4f"),
                                "prompt": st.column_config.TextColumn(width="medium")})
    if len(rows) > 5000:
        st.caption(f"Showing 5,000 of {len(rows):,} rows; narrow the filters to see others.")

# ----------------------------------------------------------------------------------------------- one example

st.subheader("One example")
picked = None
try:
    sel_rows = selection.selection.rows if selection and selection.selection else []
except AttributeError:
    sel_rows = []
if sel_rows:
    picked = int(shown.iloc[sel_rows[0]]["example_index"])
options = shown["example_index"].tolist()[:500]
if picked is not None and picked not in options:
    options.insert(0, picked)
pairs = zip(agg["example_index"], agg["example_id"]) if "example_id" in agg else ()
names = {i: v for i, v in pairs if isinstance(v, str) and v}  # the readable id; else "example #<index>"
choice = st.selectbox("example (or select a row above)", options, index=options.index(picked) if picked in options
                      else 0, format_func=lambda i: names.get(i, f"example #{i}"), key=f"reg_example_{run.id}_{picked}")
hist = ex[ex["example_index"] == choice].sort_values("step")
record = run.data[run.data["example_index"] == choice] if "example_index" in run.data else pd.DataFrame()
a, b = st.columns([2, 3])
with a:
    if len(record):
        r = record.iloc[0]
        st.markdown(f"**{safe_text.md(r.get('example_id', choice))}** · label **{safe_text.md(r.get('label'))}** · "
                    f"{safe_text.md(r.get('category'))}")
        st.markdown("**Prompt**")
        st.text(str(r.get("prompt", "")))
        st.markdown("**Training answer**")
        st.text(str(r.get("response", "")))
        if "risk_judge" in record:
            st.caption(f"judge score of this training example: {float(r['risk_judge']):.2f}")
    else:
        st.info("data.parquet has no record for this example.")
with b:
    series = ["beta", *[c for c in risk_cols if c in hist], "nll", "kl"]
    fig = make_subplots(rows=2, cols=2, subplot_titles=["β received", "risk", "NLL", "KL(ref ‖ model)"],
                        vertical_spacing=0.2, shared_xaxes=True)
    fig.add_trace(go.Scatter(x=hist["step"], y=hist["beta"], name="β", mode="lines+markers",
                             line=dict(color=charts.PALETTE[0])), row=1, col=1)
    risk_colors = [charts.PALETTE[i] for i in (1, 4, 5, 6, 8, 9)]
    for i, c in enumerate(c for c in risk_cols if c in hist):
        fig.add_trace(go.Scatter(x=hist["step"], y=hist[c], name=charts.metric_title(c), mode="lines+markers",
                                 line=dict(color=risk_colors[i % len(risk_colors)])), row=1, col=2)
    fig.add_trace(go.Scatter(x=hist["step"], y=hist["nll"], name="NLL", mode="lines+markers",
                             line=dict(color="#555555"), showlegend=False), row=2, col=1)
    fig.add_trace(go.Scatter(x=hist["step"], y=hist["kl"], name="KL", mode="lines+markers",
                             line=dict(color="#8a5a2b"), showlegend=False), row=2, col=2)
    fig.update_xaxes(title_text="step", row=2)
    fig.update_yaxes(range=[-0.03, 1.03], row=1)
    charts.style(fig, height=440, title=f"History of {charts._html_escape(names.get(choice, f'example #{choice}'))} "
                                        f"({len(hist)} time(s) seen)")
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.18, x=0), margin=dict(b=90))
    charts.plotly(fig, key="reg_history")
