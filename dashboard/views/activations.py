"""Activation space: held-out prompt activations of one layer projected to 2-d, before and after fine-tuning with
the same projection, next to the probe's per-layer AUROC. Does harmful intent stay separable?"""

from __future__ import annotations

from pathlib import Path

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
from staysafe import geometry
from staysafe.methods import regularised
from staysafe.probe import ProbeError
from staysafe.runs.traces import TraceError

cfg = settings.page_setup()
st.title(":material/scatter_plot: Activation space")
st.caption("Hidden state at the last prompt token (what the probe reads), for held-out harmful and benign prompts.")

source = st.segmented_control("source", ["a run (before / after fine-tuning)", "a saved activations folder"],
                              default="a run (before / after fine-tuning)", key="act_source", required=True)

sets: dict[str, Path] = {}  # panel title -> activations directory
probe_path: Path | None = None
if source.startswith("a run"):
    runs = loaders.runs_table(cfg.runs)
    if runs.empty:
        widgets.no_runs(cfg.runs)
        st.stop()
    def shown_first(row) -> bool:  # regularised runs that saved activations (a frontier run saves none)
        return regularised(row) and (cfg.runs / str(row["run_id"]) / "activations" / "before").is_dir()

    chosen = widgets.pick_runs(runs, "run", key="act_run", prefer=shown_first)
    run_id = chosen[0]
    try:
        run_dir = settings.run_path(cfg.runs, run_id)
    except TraceError as err:
        widgets.run_error(run_id, str(err))
        st.stop()
    row = runs.set_index("run_id").loc[run_id]
    if row["state"] == "corrupt":
        widgets.run_error(run_id, row["error"])
        st.stop()
    for name in ("before", "after"):
        if (run_dir / "activations" / name / "activations.npz").is_file():
            sets[f"{name} fine-tuning"] = run_dir / "activations" / name
    probe_path = run_dir / "probe.json"
    if not sets:
        st.info(
            f"Run {safe_text.code(run_id)} has no saved activations yet: "
            "a run saves `activations/before/` when training "
            "starts and `activations/after/` when it finishes."
        )
        st.stop()
    if len(sets) == 1:
        st.info(
            f"Only the activations before fine-tuning exist for {safe_text.code(run_id)} "
            f"(state: {safe_text.md(row['state'])}); "
            "`activations/after/` is written when the run finishes, unless it ran with `save_activations` off "
            "(the `frontier` preset)."
        )
else:
    st.caption(
        f"Folders under the probes root {safe_text.code(cfg.probes)} holding `activations.npz` + `index.parquet`."
    )
    rel = widgets.pick_folder(cfg.probes, loaders.activation_dirs(cfg.probes), "probes", "act_dir",
                             "activations")
    if not rel:
        st.info(f"No saved activations under {safe_text.code(cfg.probes)}. Save some with:")
        st.code(f"staysafe fit-probe --out {cfg.probes}/probe.json --save-activations", language="bash")
        st.stop()
    try:
        directory = settings.safe_subdir(cfg.probes, rel)
        loaders.load_activations(directory)
    except TraceError as err:
        st.error(f"Cannot use {safe_text.code(rel)}: {safe_text.md(err)}")
        st.stop()
    sets[directory.name] = directory
    for candidate in (directory / "probe.json", directory.parent / "probe.json"):
        if candidate.is_file():
            probe_path = candidate
            break

try:
    acts = {title: loaders.load_activations(d) for title, d in sets.items()}
except TraceError as err:
    st.error(str(err))
    st.stop()
probe, probe_error = None, None
try:
    probe = loaders.load_probe(probe_path) if probe_path is not None else None
except ProbeError as err:
    probe_error = str(err)

layers = sorted(set.intersection(*(set(a.layers) for a in acts.values())))
n_points = sum(len(a.index) for a in acts.values())
c = st.columns([1, 1, 1, 1])
default_layer = probe.layers[0] if probe is not None and probe.layers[0] in layers else layers[len(layers) // 2]
color_options = ["label", "category"] + (["probe score"] if probe is not None and
                                         all(l in layers for l in probe.layers) else [])
# set (not only dropped) on a switch, so the box shows the layer that is plotted
widgets.reset_on_change("act_layer", (tuple(sets.values()), tuple(layers)), default_layer)
widgets.reset_on_change("act_color", (tuple(sets.values()), tuple(color_options)), "label")
layer = c[0].selectbox("layer (hidden state index)", layers, key="act_layer",
                       help="0 = embeddings; the last = the final layer." + (
                           f" The probe reads layer {probe.layers}." if probe is not None else ""))
method = c[1].selectbox("projection", geometry.PROJECTIONS, index=geometry.PROJECTIONS.index("PCA"), key="act_method",
                        help="PCA is instant. UMAP and t-SNE take up to a minute per layer the first time (then "
                             "cached); PCA and UMAP are fitted on a sample and transform every point, t-SNE shows "
                             "the sample only.")
color_by = c[2].selectbox("colour by", color_options, key="act_color")
fit_n = c[3].number_input("fit on a sample of", 100, geometry.MAX_FIT, min(2000, geometry.MAX_FIT), step=500,
                          key="act_fit_n", help="Points used to fit the projection (at most 5,000).")

# cached on (folders, layer, method, sample): changing the colouring only redraws
with st.spinner(f"Projecting {n_points:,} points of layer {layer} with {method}"
                f"{' (up to a minute the first time)' if method != 'PCA' else ''}…"):
    coords, fitted, how = loaders.projection(list(sets.values()), layer, method, fit_n)
note = (f"Layer {layer}: {method} fitted on {fitted:,} of {n_points:,} points" +
        (" (the union of before and after, so both panels share one projection)" if len(sets) > 1 else "") +
        f"; {how}.")
st.caption(note)

left, right = st.columns([3, 1]) if probe is not None or probe_error else (st.container(), None)
with left:
    fig = make_subplots(rows=1, cols=len(sets), subplot_titles=list(sets), shared_xaxes=True, shared_yaxes=True,
                        horizontal_spacing=0.04)
    seen_groups = set()
    for col, ((title, a), xy) in enumerate(zip(acts.items(), coords), start=1):
        index = a.index.reset_index(drop=True)
        ok = np.isfinite(xy[:, 0])
        hover = loaders.hover_texts(sets[title])
        if color_by == "probe score":
            score = probe.predict_proba(probe.features(a))
            fig.add_trace(go.Scattergl(
                x=xy[ok, 0], y=xy[ok, 1], mode="markers", name=title, showlegend=False, text=hover[ok],
                marker=dict(size=5, color=score[ok], colorscale="RdYlGn_r", cmin=0, cmax=1, opacity=0.8,
                            colorbar=dict(title="probe<br>score") if col == 1 else None, showscale=col == 1),
                customdata=score[ok], hovertemplate="%{text}<br>probe score %{customdata:.2f}<extra></extra>"),
                row=1, col=col)
        else:
            groups = index[color_by].astype(str)
            for i, g in enumerate(sorted(groups.unique())):
                m = ok & (groups == g).to_numpy()
                color = charts.LABEL_COLORS.get(g) if color_by == "label" else charts.color_for(i)
                fig.add_trace(go.Scattergl(
                    x=xy[m, 0], y=xy[m, 1], mode="markers", name=g, legendgroup=g, text=hover[m],
                    showlegend=g not in seen_groups, marker=dict(size=5, color=color, opacity=0.75),
                    hovertemplate="%{text}<extra></extra>"), row=1, col=col)
                seen_groups.add(g)
    fig.update_xaxes(showticklabels=False, title_text=f"{method} 1 (layer {layer})")
    fig.update_yaxes(showticklabels=False, title_text=f"{method} 2", col=1)
    charts.style(fig, height=520)
    fig.update_layout(legend=dict(title=color_by, orientation="h", yanchor="bottom", y=1.06, x=0),
                      margin=dict(t=90))
    charts.plotly(fig, key="act_scatter")

    sep = st.columns(len(sets))
    for col, (title, d) in zip(sep, sets.items()):
        auc = loaders.separability(d, layer)
        msg = f"{auc:.2f}" if np.isfinite(auc) else "n/a"
        extra = ""
        if probe is not None and all(l in acts[title].layers for l in probe.layers):
            y = (acts[title].index["label"] == "harmful").to_numpy()
            if y.any() and (~y).any():
                from sklearn.metrics import roc_auc_score

                extra = (
                    f" · reference probe AUROC {roc_auc_score(y, probe.predict_proba(probe.features(acts[title]))):.2f}"
                )
        col.metric(f"{title}: separability at layer {layer}", msg, help=(
            "5-fold cross-validated AUROC of a fresh linear probe on these activations (harmful vs benign), "
            "on at most 2,000 points. 1.0 = perfectly separable, 0.5 = chance."))
        if extra:
            col.caption(extra.strip(" ·"))

if right is not None:
    with right:
        st.markdown("**Probe AUROC per layer**")
        if probe_error:
            st.warning(f"The probe file cannot be read: {safe_text.md(probe_error)}")
        else:
            sweep = pd.DataFrame(probe.metrics.get("sweep", []))
            if sweep.empty:
                st.info("This probe records no layer sweep.")
            else:
                f2 = go.Figure()
                for colname, name, dash in (("val_auroc", "validation", "solid"), ("test_auroc", "held-out test",
                                                                                     "dot")):
                    if colname in sweep:
                        f2.add_trace(go.Scatter(x=sweep["layer"], y=sweep[colname], name=name, mode="lines+markers",
                                                line=dict(color=charts.PALETTE[0], dash=dash)))
                for l in probe.layers:
                    f2.add_vline(x=l, line=dict(color=charts.PALETTE[1], dash="dash"),
                                 annotation_text="probe", annotation_position="top left")
                f2.add_vline(x=layer, line=dict(color="#999999", width=1))
                f2.update_yaxes(range=[0.4, 1.02], title_text="AUROC")
                f2.update_xaxes(title_text="layer")
                charts.style(f2, height=400)
                f2.update_layout(legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
                charts.plotly(f2, key="act_sweep")
                st.caption(
                    f"Probe fitted on layer {probe.layers} "
                    f"of {safe_text.code(probe.model or 'the reference')}; grey line: "
                    "the layer shown."
                )
elif source.startswith("a run"):
    st.caption("This run has no probe (sft runs do not fit one); an adaptive or constant-kl run saves `probe.json` "
               "with the per-layer AUROC sweep, and so does `staysafe fit-probe`.")
