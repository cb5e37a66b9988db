"""Home: what StaySafe does, the runs under the runs root, and whether the aligned reference model is built."""

from __future__ import annotations

import pandas as pd
import streamlit as st

import charts
import loaders
import safe_text
import settings
import widgets
from staysafe.options import ALIGNED

cfg = settings.page_setup()
st.title(":material/shield: StaySafe")
st.markdown(
    "Fine-tuning an aligned chat model, even on a handful of harmful examples, erases its refusals. "
    "StaySafe trains with **NLL plus a KL pull toward the frozen safe reference model**, and weights that pull by an "
    "estimated safety risk of each batch: an activation probe on the reference's hidden states, or a judge's score. "
    "This dashboard launches small runs and shows safety degrade (or not), where harmful intent lives in activation "
    "space, how judge and probe risks compare, and which training examples triggered the regularizer."
)

runs = loaders.runs_table(cfg.runs)
counts = runs["state"].value_counts() if len(runs) else pd.Series(dtype=int)
c = st.columns(5)
c[0].metric("runs", len(runs))
c[1].metric("running", int(counts.get("running", 0) + counts.get("created", 0)))
c[2].metric("finished", int(counts.get("finished", 0)))
c[3].metric("failed / interrupted", int(counts.get("failed", 0) + counts.get("interrupted", 0)
                                        + counts.get("cancelled", 0)))
c[4].metric("unreadable", int(counts.get("corrupt", 0)))

st.subheader(f"Runs under {safe_text.code(cfg.runs)}")
if runs.empty:
    widgets.no_runs(cfg.runs)
else:
    runs = runs.sort_values("created", ascending=False, na_position="last", kind="stable")  # newest first
    view = pd.DataFrame({
        "run": runs["run_id"],
        "state": runs["state"],
        "method": [charts.method_label(r) if r.get("state") != "corrupt" else "" for r in runs.to_dict("records")],
        "risk": runs["risk"],
        "scenario": runs["scenario"],
        "steps": [f"{int(d)}/{int(m)}" if pd.notna(d) and pd.notna(m) else "" for d, m in
                  zip(runs["steps_done"], runs["max_steps"])],
        "progress": [float(d) / float(m) if pd.notna(d) and pd.notna(m) and m else None
                     for d, m in zip(runs["steps_done"], runs["max_steps"])],
        "final keyword ASR (weak judge)": runs["final_asr_keyword"],
        "error": runs["error"].fillna(""),
    })
    st.dataframe(view, hide_index=True, column_config={
        "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent"),
        "final keyword ASR (weak judge)": st.column_config.NumberColumn(format="percent", help=(
            "Share of held-out harmful requests answered without a refusal marker at the last evaluation. The "
            "keyword judge is weak: see the ASR page for judge ASR.")),
        "error": st.column_config.TextColumn(width="large"),
    })
    bad = runs[runs["state"] == "corrupt"]
    if len(bad):
        st.warning("Unreadable run directories (the other runs are unaffected):\n\n" + "\n".join(
            f"- {safe_text.code(r.run_id)}: {safe_text.md(r.error)}" for r in bad.itertuples()))

st.subheader("The aligned reference model")
try:
    from staysafe.models.loading import model_status  # loads torch: only here, where it is needed

    status = {row["name"]: row for row in model_status()}
    aligned = status.get(ALIGNED, {})
except Exception as err:  # a missing model wheel must not take the home page down
    aligned = {"ready": False, "detail": f"model status unavailable: {err}"}
if aligned.get("ready"):
    a, b, d = st.columns([1, 1, 3])
    a.metric("held-out harmful refused", charts.fmt_pct(aligned.get("harmful_refusal_rate")))
    b.metric("held-out benign refused", charts.fmt_pct(aligned.get("benign_refusal_rate")))
    where = {"shipped": "shipped with StaySafe (no build needed)",
             "built locally": "built locally by `staysafe align`"}.get(aligned.get("source"), "")
    d.markdown(f"{safe_text.code(ALIGNED)} is ready, {where}, and is the default safe reference of every run.")
    d.text(aligned.get("detail", ""))
else:
    st.error(
        f"{safe_text.code(ALIGNED)} (the default safe reference) cannot be served. "
        "Runs on `--model tiny` need no aligned "
        "model; `staysafe align` builds one locally (its time estimate follows the first steps)."
    )
    st.text(aligned.get("detail", ""))
    st.code("staysafe align", language="bash")

st.subheader("Where to go next")
st.markdown(
    "- **Guided demo**: the effect told step by step from a recorded experiment (no waiting).\n"
    "- **Launch a run**: queue small runs; watch them on **Training traces** and **ASR over training**.\n"
    "- **Activation space** and **Judge vs probe**: what the risk signals see.\n"
    "- **Regularization explorer**: which training examples triggered the KL pull.\n"
    "- **Safety-utility trade-off**: the defenses of an experiment side by side, constant-kl's beta sweep as a curve."
)
