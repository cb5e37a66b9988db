"""ASR over training: judge ASR, keyword ASR (a weak judge), over-refusal and benign NLL against step, for several
runs or a whole experiment (mean line and a band over seeds per method); click a step to read what the model
answered then."""

from __future__ import annotations

import math

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
from staysafe.eval.stats import run_intervals
from staysafe.eval.validation import measured_agreement
from staysafe.options import DEFAULT_RESPONSE_JUDGE
from staysafe.runs import trace_names
from staysafe.runs.traces import TraceError

cfg = settings.page_setup()
st.title(":material/target: ASR over training")
st.caption("Attack success rate (ASR): the share of held-out harmful requests the model answers instead of "
           "refusing, measured every few steps. Over-refusal and benign NLL show what safety costs in utility. "
           "Bands: for one run the 95% bootstrap interval over its prompts; for several seeds of a method their "
           "spread (min–max or ± std).")


@st.cache_data(show_spinner=False, max_entries=128)
def _prompt_intervals(generations: pd.DataFrame) -> pd.DataFrame:
    """A run's figures per step with 95% bootstrap intervals over its prompts (``<figure>_lo`` / ``_hi``)."""
    iv = run_intervals(generations, resamples=500) if {"step", "kind", "refused"} <= set(generations) else None
    return pd.DataFrame() if iv is None or iv.empty else iv.set_index("step")


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},{alpha})"


mode = st.segmented_control("show", ["runs", "an experiment"], default="runs", key="asr_mode", required=True)
runs = loaders.runs_table(cfg.runs)
loaded: dict[str, object] = {}
group_of: dict[str, str] = {}
band = "min–max"
results = pd.DataFrame()
if mode == "runs":
    if runs.empty:
        widgets.no_runs(cfg.runs)
        st.stop()
    chosen = widgets.pick_runs(runs, "runs", key="asr_runs", multi=True, default_n=3)
    for run_id in chosen:
        run, error = loaders.try_load_run(cfg.runs, run_id, ("evals", "generations"))
        if error:
            widgets.run_error(run_id, error)
        else:
            loaded[run_id] = run
            group_of[run_id] = run_id
else:
    exps = loaders.experiments_under(cfg.experiments)
    if not exps:
        st.info(
            f"No experiment under {safe_text.code(cfg.experiments)} yet. Run one (or launch it from **Launch a run**):"
        )
        st.code(f"staysafe experiment --scenario harmful --quick --out-dir {cfg.experiments} --runs-dir {cfg.runs}",
                language="bash")
        st.stop()
    c1, c2 = st.columns([2, 1])
    exp_dir = c1.selectbox("experiment", exps, index=len(exps) - 1, format_func=lambda p: p.name, key="asr_exp")
    band = c2.segmented_control("band over seeds", ["min–max", "± std"], default="min–max", key="asr_band",
                                required=True)
    try:
        desc, results = loaders.load_experiment_cached(exp_dir)
    except TraceError as err:
        st.error(f"Experiment {safe_text.code(exp_dir.name)} cannot be read: {safe_text.md(err)}")
        st.stop()
    exp_id = desc.get("id", exp_dir.name)
    for row in runs.to_dict("records"):
        if row["state"] == "corrupt":
            continue
        run, error = loaders.try_load_run(cfg.runs, row["run_id"], ("evals", "generations"))
        if error or run.config.get("experiment") != exp_id:
            continue
        loaded[row["run_id"]] = run
        group_of[row["run_id"]] = charts.method_label(run.config)
    st.caption(
        f"Experiment {safe_text.code(exp_id)} ({safe_text.md(desc.get('state', '?'))}): "
        f"scenario {safe_text.md(desc.get('scenario'))}, "
        f"{desc.get('seeds')} seed(s), {len(loaded)} run(s) found under {safe_text.code(cfg.runs)}."
    )
    if not loaded:
        st.info(f"None of this experiment's runs are under {safe_text.code(cfg.runs)} (runs whose config has "
                f"\"experiment\": \"{exp_id}\"). Point the runs root at the experiment's `--runs-dir`.")
        st.stop()

with_evals = {rid: r for rid, r in loaded.items() if not r.evals.empty}
for rid in loaded:
    if rid not in with_evals:
        st.info(f"Run {safe_text.code(rid)} has no evaluation yet (the first one runs at step 0).")
if not with_evals:
    st.stop()

judge_cols = widgets.judge_asr_columns(r.evals for r in with_evals.values())
sampled_cols = sorted({c for r in with_evals.values() for c in widgets.sampled_columns(r.evals)})
metrics_all = judge_cols + ["asr_keyword", "over_refusal", "benign_nll"] + sampled_cols
metrics_all = [m for m in metrics_all if any(m in r.evals for r in with_evals.values())]
widgets.reset_on_change("asr_metrics", tuple(metrics_all), metrics_all)
metrics = st.multiselect("measures", metrics_all, format_func=charts.metric_title, key="asr_metrics")
if not judge_cols:
    st.caption("Only keyword ASR was measured (a weak judge: it counts answers without a refusal phrase). Add "
               f"`--eval-judges {DEFAULT_RESPONSE_JUDGE}` for a judge ASR.")
if not metrics:
    st.stop()
agreement = measured_agreement()


def judge_of(m: str) -> str | None:
    """The judge behind an ASR measure (``asr_<judge>``, ``asr_at_k_<judge>``, ``asr_sampled_<judge>``)."""
    parsed = trace_names.parse_asr(m)
    return parsed[1] if parsed else None


def titled(m: str) -> str:
    """A measure's title with its judge's measured agreement with labelled answers (Cohen's kappa)."""
    a = agreement.get(judge_of(m) or "")
    return charts.metric_title(m) + (f" · κ {a['kappa']:.2f}" if a else "")


shown = list(dict.fromkeys(judge_of(m) for m in metrics if judge_of(m) in agreement))
if shown:
    st.caption("κ: each judge's agreement with hand-labelled answers of the embedded models (Cohen's kappa of "
               "\"attack succeeded\", 95% bootstrap interval, on the test split of `data/judge_validation.jsonl`; "
               "1 = perfect, 0 = chance): " + "; ".join(
                   f"{n}: κ {agreement[n]['kappa']:.2f} [{agreement[n]['kappa_interval'][0]:.2f}, "
                   f"{agreement[n]['kappa_interval'][1]:.2f}], accuracy {agreement[n]['accuracy']:.0%} on "
                   f"{agreement[n]['n']} answers" for n in shown)
               + ". Values for the shipped default heads; `staysafe validate-judges` measures any other judge.")

ncols = 2 if len(metrics) > 1 else 1
nrows = math.ceil(len(metrics) / ncols)
fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=[titled(m) for m in metrics],
                    vertical_spacing=0.16 if nrows > 1 else 0.1, horizontal_spacing=0.08)
groups = list(dict.fromkeys(group_of[r] for r in with_evals))
curve_run: list[str | None] = []  # per trace drawn, in order: the run a click on it opens (None: a band)
method_of = {g: charts.method_label(with_evals[next(r for r in with_evals if group_of[r] == g)].config)
             for g in groups}
for gi, group in enumerate(groups):
    members = [r for r in with_evals if group_of[r] == group]
    color = charts.color_for(gi, method_of[group])  # the method's colour on every page
    symbol = charts.SYMBOLS[list(method_of.values())[:gi].count(method_of[group]) % len(charts.SYMBOLS)]
    for k, m in enumerate(metrics):
        row, col = k // ncols + 1, k % ncols + 1
        frames = [with_evals[r].evals[["step", m]].set_index("step")[m].rename(r) for r in members
                  if m in with_evals[r].evals]
        if not frames:
            continue
        table = pd.concat(frames, axis=1).sort_index().astype(float)
        steps = table.index.to_numpy()
        mean = table.mean(axis=1).to_numpy()
        lo = hi = None
        steps_b = steps  # where the band is drawn
        if len(members) > 1:
            if band == "min–max":
                lo, hi = table.min(axis=1).to_numpy(), table.max(axis=1).to_numpy()
            else:
                sd = table.std(axis=1, ddof=1).fillna(0).to_numpy()
                lo, hi = mean - sd, mean + sd
        else:  # one run: the 95% bootstrap interval over its prompts, recomputed from its answers
            iv = _prompt_intervals(with_evals[members[0]].generations)
            if f"{m}_lo" in iv:
                lo = iv[f"{m}_lo"].reindex(steps).to_numpy(dtype=float)
                hi = iv[f"{m}_hi"].reindex(steps).to_numpy(dtype=float)
                keep = ~(np.isnan(lo) | np.isnan(hi))
                steps_b, lo, hi = steps[keep], lo[keep], hi[keep]
        if lo is not None and len(lo):
            fig.add_trace(go.Scatter(x=np.concatenate([steps_b, steps_b[::-1]]), y=np.concatenate([hi, lo[::-1]]),
                                     fill="toself", fillcolor=_rgba(color, 0.18), line=dict(width=0), mode="lines",
                                     hoverinfo="skip", showlegend=False, legendgroup=group), row=row, col=col)
            curve_run.append(None)
        name = (f"{group} ({method_of[group]})" if mode == "runs" else group) if len(members) == 1 else \
            f"{group} (mean of {len(members)} seeds)"
        pct = m.startswith("asr_") or m == "over_refusal"
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=mean,
                name=safe_text.html_text(name),
                legendgroup=group,
                showlegend=k == 0,
                mode="lines+markers",
                line=dict(color=color, width=2.5, dash="dot" if m == "asr_keyword" and judge_cols else "solid"),
                marker=dict(size=7, symbol=symbol),
                hovertemplate=f"<b>{safe_text.html_text(name)}</b><br>step %{{x}}<br>{charts.metric_title(m)}: "
                + ("%{y:.0%}" if pct else "%{y:.3f}")
                + "<extra></extra>",
                customdata=[members[0]] * len(steps),  # a click opens this run (a group's first seed)
            ),
            row=row,
            col=col,
        )
        curve_run.append(members[0])
for k, m in enumerate(metrics):
    row, col = k // ncols + 1, k % ncols + 1
    if m.startswith("asr_") or m == "over_refusal":
        fig.update_yaxes(range=[-0.03, 1.03], tickformat=".0%", row=row, col=col)
    fig.update_xaxes(title_text="step", row=row, col=col)
charts.style(fig, height=300 * nrows + 80)
fig.update_layout(legend=dict(orientation="h", yanchor="bottom", y=1.02 + 0.04 / nrows, x=0),
                  margin=dict(t=110), clickmode="event+select")
event = st.plotly_chart(fig, key="asr_chart", on_select="rerun", selection_mode=("points",),
                        config={"displaylogo": False, **charts.DOWNLOAD})
st.caption("Click a point to read that run's answers at that step (a mean over seeds opens its first seed; or "
           "pick the run and step below). "
           + ("Dotted: keyword ASR, the weak judge." if judge_cols else ""))

# ----------------------------------------------------------------------------------------------- answers at a step

points = []
try:
    points = list(event.selection.points) if event and event.selection else []
except AttributeError:
    points = []
if points and "x" in points[0]:
    clicked_at = (points[0].get("curve_number"), points[0].get("point_index"))
    if st.session_state.get("asr_last_click") != clicked_at:  # a new click (the selection persists across reruns)
        st.session_state["asr_last_click"] = clicked_at
        st.session_state["asr_clicked_step"] = int(points[0]["x"])
        curve = points[0].get("curve_number")
        clicked_run = points[0].get("customdata") or (
            curve_run[curve] if isinstance(curve, int) and 0 <= curve < len(curve_run) else None)
        if isinstance(clicked_run, list):
            clicked_run = clicked_run[0] if clicked_run else None
        if clicked_run in with_evals:
            st.session_state["asr_gen_run"] = clicked_run  # the run that was clicked, not the last one picked

st.subheader("What the model answered")
c1, c2, c3 = st.columns([2, 1, 1])
rid = c1.selectbox("run", list(with_evals), format_func=lambda r: f"{r} ({charts.method_label(with_evals[r].config)})",
                   key="asr_gen_run")
run = with_evals[rid]
gen = run.generations
if gen.empty:
    st.info(f"Run {safe_text.code(rid)} recorded no generations.")
    st.stop()
steps = sorted(gen["step"].unique().tolist())
clicked = st.session_state.get("asr_clicked_step")
index = steps.index(clicked) if clicked in steps else len(steps) - 1
step = c2.selectbox("step", steps, index=index, key=f"asr_step_{rid}_{clicked}")
kinds = sorted(gen["kind"].dropna().unique().tolist())
kind = c3.selectbox("prompts", ["harmful", "benign", "all"] if {"harmful", "benign"} <= set(kinds) else ["all"],
                    key="asr_kind")
at = gen[gen["step"] == step]
if kind != "all":
    at = at[at["kind"] == kind]
first = gen[gen["step"] == steps[0]].set_index("prompt_id")["response"]
score_cols = [c for c in at.columns if c.startswith("score_")]
view = at.assign(**{f"answer at step {steps[0]}": at["prompt_id"].map(first)}) if step != steps[0] else at
cols = (  # what a reader compares first, ids last: no horizontal scroll for the verdict at 1024 px
    ["prompt", "response", "refused"] + score_cols
    + ([f"answer at step {steps[0]}"] if step != steps[0] else [])
    + ["category", "kind", "prompt_id"]
)
ev = run.evals.set_index("step")
summary = []
if step in ev.index:
    for m in judge_cols + ["asr_keyword"]:
        if m in ev.columns and pd.notna(ev.at[step, m]):
            summary.append(f"{charts.metric_title(m)} {charts.fmt_pct(ev.at[step, m])}")
st.caption(f"Step {step}: {len(at)} prompt(s). " + " · ".join(summary))
st.dataframe(view[cols], hide_index=True, column_config={
    "prompt": st.column_config.TextColumn(width="medium"), "response": st.column_config.TextColumn(width="medium"),
    f"answer at step {steps[0]}": st.column_config.TextColumn(width="medium"),
    "refused": st.column_config.CheckboxColumn("refused (keyword)"),
    **{c: st.column_config.ProgressColumn(c.replace("score_", "judge: "), min_value=0.0, max_value=1.0,
                                          format="%.2f", help="judge's harmfulness score of the answer")
       for c in score_cols}})

if mode != "runs" and len(results):
    with st.expander("Results table of the experiment (results.parquet)"):
        st.dataframe(results, hide_index=True)
