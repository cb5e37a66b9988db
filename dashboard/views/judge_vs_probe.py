"""Judge vs probe: do the activation probe and a judge agree on which examples are risky, which one is right more
often, how well calibrated each is, and what each costs? From a ``staysafe compare-risk`` folder or from a run's
training examples (risk_probe vs risk_judge per example)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

import charts
import loaders
import safe_text
import settings
import widgets
from staysafe.eval import stats
from staysafe.runs.traces import TraceError

RESAMPLES = 1000  # bootstrap resamples (seeded): tens of ms per interval on a few hundred examples, then cached


@st.cache_data(max_entries=64, show_spinner=False)
def agreement_intervals(fx: np.ndarray, fy: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """95% bootstrap intervals over the examples of the agreement rate and of Cohen's κ of two flag sequences."""
    return (stats.mean_interval((fx == fy).astype(float), resamples=RESAMPLES),
            stats.bootstrap_interval(stats.cohen_kappa, fx, fy, resamples=RESAMPLES))


@st.cache_data(max_entries=64, show_spinner=False)
def auroc_interval(truth: np.ndarray, scores: np.ndarray) -> tuple[float, tuple[float, float]]:
    """AUROC of ``scores`` against ``truth`` and its 95% bootstrap interval over the examples."""
    return stats.auroc(truth, scores), stats.bootstrap_interval(stats.auroc, truth, scores, resamples=RESAMPLES)


def source_label(source: str) -> str:
    """A risk source as a person reads it: the activation probe, or a named judge."""
    return {"probe": "activation probe", "judge": "judge"}.get(source, f"{source} judge")


def interval(lo: float, hi: float, fmt: str = ".2f") -> str:
    return f"[{lo:{fmt}}, {hi:{fmt}}]" if np.isfinite(lo) and np.isfinite(hi) else "[n/a]"


cfg = settings.page_setup()
st.title(":material/balance: Judge vs probe")
st.caption("Two risk signals for the same examples: the activation probe (free during training: it reads the "
           "reference forward) and a judge (scored once per training example, cached).")

source = st.segmented_control("source", ["a compare-risk folder", "a run's training examples"],
                              default="a compare-risk folder", key="jvp_source", required=True)

frame: pd.DataFrame | None = None
summary: dict = {}
cost: dict[str, float] = {}
if source == "a compare-risk folder":
    rel = widgets.pick_folder(cfg.compare, loaders.compare_dirs(cfg.compare), "compare", "jvp_dir", "eval")
    if not rel:
        st.info(
            f"No comparison under {safe_text.code(cfg.compare)} yet. "
            "Score held-out examples with the probe and the judges:"
        )
        st.code(f"staysafe compare-risk --data eval-harmful,eval-benign --out {cfg.compare}/eval", language="bash")
        st.caption("Or switch the source to a run's training examples (an adaptive run that recorded the judge).")
        st.stop()
    try:
        table, summary = loaders.load_compare(settings.safe_subdir(cfg.compare, rel))
    except TraceError as err:
        st.error(f"Cannot use {safe_text.code(rel)}: {safe_text.md(err)}")
        st.stop()
    frame = table.rename(columns={"example_id": "id"})
    what = rel
    cost = {s: v.get("seconds_per_100") for s, v in summary.get("sources", {}).items()
            if v.get("seconds_per_100") is not None}
else:
    run = widgets.regularized_run_or_stop(cfg.runs, "jvp_run")
    what = run.id
    ex = loaders.examples_joined(run.path)
    have = [c for c in ex.columns if c.startswith("risk_") and c != "risk_label"] if len(ex) else []
    if len(have) < 2:
        st.info(
            f"Run {safe_text.code(run.id)} recorded "
            f"{', '.join(have) or 'no risk signal'} per training example; a comparison "
            "needs both `risk_probe` and `risk_judge`. An adaptive or constant-kl run records the probe for free; "
            "add the judge with `--record-judge` (the default):"
        )
        st.code("staysafe train --scenario harmful --method adaptive --risk probe --record-judge --judge embedding",
                language="bash")
        st.stop()
    agg = {c: "mean" for c in have}
    keep = [c for c in ("example_id", "label", "category", "prompt", "response") if c in ex]
    frame = (ex.groupby("example_index").agg({**agg, **{c: "first" for c in keep}}).reset_index()
             .rename(columns={"example_id": "id", **{c: c[len("risk_"):] for c in have}}))
    scoring = run.config.get("risk_scoring") or {}
    if scoring.get("misses"):
        cost[str(scoring.get("judge", "judge"))] = float(scoring.get("seconds", 0)) / scoring["misses"] * 100
    st.caption(
        f"{len(frame)} distinct training examples seen by {safe_text.code(run.id)} "
        "(risk averaged over the steps each was "
        "seen)."
    )

sources = [c for c in frame.columns if c not in widgets.TEXT_COLUMNS and c != "example_index"
           and pd.api.types.is_numeric_dtype(frame[c])]
if len(sources) < 2:
    st.info(f"Only {sources} scored these examples; nothing to compare.")
    st.stop()
labels = frame["label"].astype(str) if "label" in frame else pd.Series(["?"] * len(frame))
labelled = labels.isin(["harmful", "benign"]).to_numpy()  # ROC and calibration read these only
y_true = (labels == "harmful").to_numpy()
classes = sorted(set(labels[labelled]))

# set (not only dropped) when the data changes, so the widgets show what is plotted
signature = (source, what, tuple(sources))
default_t = float(summary.get("threshold", 0.5))
widgets.reset_on_change("jvp_x", signature, "probe" if "probe" in sources else sources[0])
for key in ("jvp_tx", "jvp_ty"):
    widgets.reset_on_change(key, signature, default_t)
c = st.columns(4)
x_src = c[0].selectbox("x: risk source", sources, format_func=source_label, key="jvp_x")
others = [s for s in sources if s != x_src]
widgets.reset_on_change("jvp_y", signature, others[0])
y_src = c[1].selectbox("y: risk source", others, format_func=source_label, key="jvp_y")  # y = x: the first other
x_name, y_name = source_label(x_src), source_label(y_src)
tx = c[2].slider(f"threshold for {x_name}", 0.0, 1.0, step=0.01, key="jvp_tx")
ty = c[3].slider(f"threshold for {y_name}", 0.0, 1.0, step=0.01, key="jvp_ty")

x = frame[x_src].astype(float).to_numpy()
yv = frame[y_src].astype(float).to_numpy()
ok = np.isfinite(x) & np.isfinite(yv)
missing = int((~ok).sum())
if missing:
    st.caption(f"{missing} example(s) lack a score from one of the two sources (judge failures) and are left out "
               "of the pairwise views.")
if len(classes) == 2:
    one_class = ""
elif classes:
    one_class = (f"ROC and AUROC cannot be computed here: all {int(labelled.sum())} labelled examples are "
                 f"{classes[0]}. They measure how well a score separates harmful from benign examples, so both kinds "
                 "are needed (a compare-risk folder, or a run trained on a mix).")
else:
    one_class = "ROC and AUROC cannot be computed here: these examples carry no harmful / benign labels."

left, right = st.columns(2)
with left:
    fig = go.Figure()
    hover = np.array([charts.wrap_html(p, 60, 3) for p in frame.get("prompt", pd.Series([""] * len(frame)))],
                     dtype=object)
    for g in sorted(labels.unique()):
        m = ok & (labels == g).to_numpy()
        fig.add_trace(
            go.Scattergl(
                x=x[m],
                y=yv[m],
                mode="markers",
                name=g,
                text=hover[m],
                marker=dict(size=7, opacity=0.7, color=charts.LABEL_COLORS.get(g)),
                hovertemplate=f"{x_name} %{{x:.2f}} · {y_name} %{{y:.2f}}<br>%{{text}}<extra>{g}</extra>",
            )
        )
    fig.add_vline(x=tx, line=dict(color="#888", dash="dash"))
    fig.add_hline(y=ty, line=dict(color="#888", dash="dash"))
    fig.update_xaxes(title_text=f"{x_name} risk", range=[-0.03, 1.03])
    fig.update_yaxes(title_text=f"{y_name} risk", range=[-0.03, 1.03])
    charts.style(fig, height=440, title="Per-example risk")
    charts.plotly(fig, key="jvp_scatter")

with right:
    if one_class:
        st.info(one_class)
    else:
        from sklearn.metrics import roc_curve

        fig = go.Figure()
        n_roc = []
        for i, s in enumerate(sources):
            p = frame[s].astype(float).to_numpy()
            m = np.isfinite(p) & labelled
            if len(set(y_true[m])) < 2:
                continue
            fpr, tpr, _ = roc_curve(y_true[m], p[m])
            auc, (lo, hi) = auroc_interval(y_true[m], p[m])
            n_roc.append(int(m.sum()))
            fig.add_trace(go.Scatter(x=fpr, y=tpr, mode="lines", line=dict(width=2.5, color=charts.color_for(i)),
                                     name=f"{source_label(s)}: AUROC {auc:.2f} {interval(lo, hi)}"))
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance",
                                 line=dict(color="#bbb", dash="dot")))
        fig.update_xaxes(title_text="false positive rate (benign flagged)")
        fig.update_yaxes(title_text="true positive rate (harmful flagged)")
        n_text = f"n = {min(n_roc, default=0)}" + (f" to {max(n_roc)}" if len(set(n_roc)) > 1 else "")
        charts.style(fig, height=440, title=f"ROC against the labels ({n_text})", legend_below=True)
        fig.update_layout(margin=dict(b=110))  # room for the legend of AUROCs with their intervals
        charts.plotly(fig, key="jvp_roc")
        st.caption(f"AUROC of each source on {n_text} labelled examples ({int((y_true & labelled).sum())} harmful, "
                   f"{int((~y_true & labelled).sum())} benign); [ ]: 95% bootstrap interval over the examples "
                   f"({RESAMPLES:,} seeded resamples).")

left, right = st.columns(2)
with left:
    fx, fy = x[ok] >= tx, yv[ok] >= ty
    counts = np.array([[int((~fx & ~fy).sum()), int((~fx & fy).sum())],
                       [int((fx & ~fy).sum()), int((fx & fy).sum())]])
    n = int(ok.sum())
    po = float((fx == fy).mean()) if n else float("nan")
    kappa = stats.cohen_kappa(fx, fy)
    (alo, ahi), (klo, khi) = agreement_intervals(fx, fy)
    fig = go.Figure(go.Heatmap(z=counts, x=[f"{y_name} < {ty:.2f}", f"{y_name} ≥ {ty:.2f}"],
                               y=[f"{x_name} < {tx:.2f}", f"{x_name} ≥ {tx:.2f}"], colorscale="Teal", showscale=False,
                               text=counts, texttemplate="%{text}", textfont=dict(size=18),
                               hovertemplate="%{y} and %{x}: %{z}<extra></extra>"))
    charts.style(fig, height=380, title=f"Agreement {po:.0%} {interval(alo, ahi, '.0%')} · n = {n}<br>"
                                        f"Cohen's κ {kappa:.2f} {interval(klo, khi)}")
    fig.update_layout(margin=dict(l=140, t=80))
    charts.plotly(fig, key="jvp_agree")
    st.caption(f"Each source flags an example when its risk reaches its threshold; n = {n} examples scored by both. "
               f"κ corrects the agreement for chance. [ ]: 95% bootstrap interval over the examples "
               f"({RESAMPLES:,} seeded resamples).")

with right:
    if one_class:
        st.info("No calibration curve either: with one class of labels every bin reads the same share harmful.")
    else:
        fig = go.Figure()
        bins = np.linspace(0, 1, 11)
        for i, s in enumerate(sources):
            p = frame[s].astype(float).to_numpy()
            m = np.isfinite(p) & labelled
            which = np.clip(np.digitize(p[m], bins) - 1, 0, 9)
            rows = [(p[m][which == b].mean(), y_true[m][which == b].mean(), int((which == b).sum()))
                    for b in range(10) if (which == b).any()]
            if not rows:
                continue
            mp, fr, cnt = zip(*rows)
            fig.add_trace(go.Scatter(x=mp, y=fr, mode="lines+markers", name=source_label(s), customdata=cnt,
                                     line=dict(color=charts.color_for(i), width=2.5),
                                     marker=dict(size=[6 + 10 * c_ / max(cnt) for c_ in cnt]),
                                     hovertemplate=f"{source_label(s)}: mean risk %{{x:.2f}} → %{{y:.0%}} harmful "
                                                   "(%{customdata} examples)<extra></extra>"))
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect",
                                 line=dict(color="#bbb", dash="dot")))
        fig.update_xaxes(title_text="predicted risk (bin mean)", range=[0, 1])
        fig.update_yaxes(title_text="share actually harmful", range=[0, 1.02])
        charts.style(fig, height=380, title="Calibration (reliability)")
        charts.plotly(fig, key="jvp_calibration")

left, right = st.columns(2)
with left:
    st.subheader("Cost per 100 examples")
    if cost:
        fig = go.Figure(go.Bar(x=[source_label(s) for s in cost], y=list(cost.values()),
                               marker_color=[charts.color_for(sources.index(s) if s in sources else i)
                                             for i, s in enumerate(cost)],
                               text=[f"{v:.2f} s" for v in cost.values()], textposition="outside", width=0.5))
        fig.update_yaxes(title_text="seconds per 100 examples", range=[0, max(cost.values()) * 1.25 or 1])
        charts.style(fig, height=320)
        charts.plotly(fig, key="jvp_cost")
        if source != "a compare-risk folder":
            st.caption("The judge's cost is from scoring this run's training examples before training (cache "
                       "misses only). The probe costs nothing extra during training: it reads the reference forward "
                       "that the KL needs anyway.")
    else:
        st.info("No cost recorded here: `staysafe compare-risk` measures seconds per 100 examples per source; a run "
                "records the judge's cost only when it scored uncached examples.")
with right:
    if summary.get("sources"):
        st.subheader("summary.json")
        st.caption(f"At threshold {summary.get('threshold', 0.5)}, on {summary.get('n', '?')} examples of "
                   f"{', '.join(summary.get('data', []))}.")
        st.dataframe(pd.DataFrame(summary["sources"]).T, width="stretch", column_config={
            "auroc": st.column_config.NumberColumn(format="%.3f"),
            "accuracy": st.column_config.NumberColumn(format="%.3f"),
            "seconds_per_100": st.column_config.NumberColumn("s / 100", format="%.2f")})
        if summary.get("agreement"):
            st.dataframe(pd.DataFrame(summary["agreement"]).T, width="stretch", column_config={
                "agreement": st.column_config.NumberColumn(format="percent"),
                "kappa": st.column_config.NumberColumn("Cohen's κ", format="%.2f")})

st.subheader("Where they disagree most")
k = st.slider("examples", 5, 100, 15, key="jvp_k")
gap = np.abs(x - yv)
table = frame.assign(**{"|difference|": gap}).loc[ok].sort_values("|difference|", ascending=False).head(k)
# the id and the two scores first (visible at 1024 px); the long texts last, medium wide
cols = [c for c in ("id", x_src, y_src, "|difference|", "label", "category", "prompt", "response") if c in table]
st.dataframe(table[cols], hide_index=True, column_config={
    "id": st.column_config.TextColumn("example"),
    x_src: st.column_config.ProgressColumn(x_name, min_value=0.0, max_value=1.0, format="%.2f"),
    y_src: st.column_config.ProgressColumn(y_name, min_value=0.0, max_value=1.0, format="%.2f"),
    "|difference|": st.column_config.NumberColumn(format="%.2f"),
    "prompt": st.column_config.TextColumn(width="medium"), "response": st.column_config.TextColumn(width="medium")})
