"""Training traces: per-step NLL, KL, loss, β and every risk signal for one or several runs, optionally as
differences from a pinned baseline run; hovering a step shows the batch it trained on."""

from __future__ import annotations

import streamlit as st
from plotly.subplots import make_subplots

import charts
import loaders
import safe_text
import settings
import widgets
from staysafe.methods import regularised

cfg = settings.page_setup()
st.title(":material/show_chart: Training traces")
st.caption("Per optimizer step: what the model was trained on and how hard it was pulled back to the reference.")

runs = loaders.runs_table(cfg.runs)
if runs.empty:
    widgets.no_runs(cfg.runs)
    st.stop()

top = st.columns([3, 2])
with top[0]:
    chosen = widgets.pick_runs(runs, "runs", key="traces_runs", multi=True, default_n=1,
                              prefer=regularised)
loaded, errors = {}, {}
for run_id in chosen:
    run, error = loaders.try_load_run(cfg.runs, run_id, ("steps", "examples"))
    if error:
        errors[run_id] = error
    else:
        loaded[run_id] = run
for run_id, error in errors.items():
    widgets.run_error(run_id, error)
with top[1]:
    baseline = st.selectbox("baseline (others shown as differences from it)", ["(none)", *loaded],
                            key="traces_baseline", help="Aligned by step: run − baseline at the same step.")

if not loaded:
    st.info("Choose one or more readable runs above.")
    st.stop()

for run in loaded.values():
    widgets.status_line(run)

metric_options = ["nll", "kl", "loss", "beta", "risk", "drift"]
for run in loaded.values():
    metric_options += [c for c in run.steps.columns if c.startswith("risk_") and c not in metric_options]
controls = st.columns([4, 2, 2])
def _has_values(m: str) -> bool:
    return any(m in r.steps and r.steps[m].astype(float).notna().any() for r in loaded.values())


widgets.reset_on_change("traces_metrics", tuple(metric_options),
                        [m for m in metric_options if m != "loss" and _has_values(m)])
metrics = controls[0].multiselect("signals", metric_options, format_func=charts.metric_title, key="traces_metrics")
how = controls[1].segmented_control("smoothing", ["none", "EMA", "rolling"], default="none", key="traces_smooth")
if how == "EMA":
    amount = controls[2].slider("EMA weight of the past", 0.0, 0.99, 0.8, 0.01, key="traces_ema")
elif how == "rolling":
    amount = controls[2].slider("rolling window (steps)", 2, 500, 10, key="traces_window")
else:
    amount = 0

empty = [rid for rid, run in loaded.items() if run.steps.empty]
for rid in empty:
    st.info(f"Run {safe_text.code(rid)} has no steps recorded yet.")
plotted = {rid: run for rid, run in loaded.items() if not run.steps.empty}
if not plotted or not metrics:
    st.stop()

base = plotted.get(baseline) if baseline != "(none)" else None
height = max(420, 250 * len(metrics))
fig = make_subplots(rows=len(metrics), cols=1, shared_xaxes=True,
                    vertical_spacing=min(0.14, 95 / height, 1 / max(1, len(metrics) - 1) - 1e-3),
                    subplot_titles=[charts.metric_title(m) + (" − baseline" if base is not None else "")
                                    for m in metrics])
for i, (rid, run) in enumerate(plotted.items()):
    if base is not None and rid == baseline and len(plotted) > 1:
        continue  # the baseline is the zero line
    steps = run.steps.sort_values("step")
    batches = loaders.step_batches(run.path)
    steps = steps.merge(batches, on="step", how="left") if len(batches) else steps.assign(batch="")
    method = charts.method_label(run.config)
    color = charts.color_for(i, method)  # the method's colour, as on every page; runs of one method differ by dash
    dash = charts.DASHES[sum(charts.method_label(r.config) == method for r in list(plotted.values())[:i])
                         % len(charts.DASHES)]
    name = f"{rid} ({method})"
    for row, m in enumerate(metrics, start=1):
        if m not in steps:
            continue
        # Batch hover text on every panel for ordinary runs; on the first panel only for very long runs (size).
        with_batch = row == 1 or len(steps) <= 2000
        frame = steps[["step", m, "batch"]].copy()
        frame[m] = charts.smooth(frame[m].astype(float), how, amount)
        if base is not None:
            b = base.steps.sort_values("step")[["step", m]] if m in base.steps else None
            if b is None:
                continue
            b = b.assign(**{m: charts.smooth(b[m].astype(float), how, amount)}).rename(columns={m: "_base"})
            frame = frame.merge(b, on="step", how="inner")
            frame[m] = frame[m] - frame["_base"]
        fig.add_trace(charts.line_trace(
            frame["step"], frame[m], safe_text.html_text(name), color, dash=dash, legendgroup=rid, showlegend=row == 1,
            customdata=frame["batch"].fillna("").to_numpy() if with_batch else None,
            hovertemplate=f"<b>{safe_text.html_text(name)}</b><br>step %{{x}}<br>{charts.metric_title(m)}: %{{y:.4g}}"
                          + ("<br><br><b>batch</b><br>%{customdata}" if with_batch else "") + "<extra></extra>"),
            row=row, col=1)
fig.update_xaxes(title_text="step", row=len(metrics), col=1)
if base is None:
    for row, m in enumerate(metrics, start=1):
        if m == "beta" or m.startswith("risk"):
            fig.update_yaxes(range=[-0.03, 1.03], row=row, col=1)
charts.style(fig, height=height)
fig.update_layout(legend=dict(orientation="h", yanchor="bottom", y=1.0 + 0.12 / len(metrics), x=0),
                  margin=dict(t=90), hovermode="closest")
charts.plotly(fig, key="traces_chart")
st.caption("Hover a point to see the training examples of that step (example id · start of the prompt). "
           "β is the KL weight: 0 = plain fine-tuning, 1 = stay on the reference.")

with st.expander("Step table"):
    rid = st.selectbox("run", list(plotted), key="traces_table_run")
    st.dataframe(plotted[rid].steps, hide_index=True, height=300)
