"""How things look, shared by the pages: colours, the plotly layout, line traces, smoothing, and the labels and
short texts shown in charts and tables."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from staysafe.methods import PALETTE, colour, variant_of  # noqa: F401  (PALETTE: the pages' one palette)
from staysafe.runs import trace_names

SCATTER_GL_MIN = 1500  # lines with more points than this are drawn with WebGL



LABEL_COLORS = {"harmful": "#c8553d", "benign": "#2a7f7a"}

GLOSSARY = {  # one hover away on every page (the sidebar's "Glossary")
    "ASR": "attack success rate: the share of held-out harmful requests the model answers instead of refusing, "
           "as read by a judge (lower is safer)",
    "over-refusal": "the share of held-out benign requests the model refuses (lower is more useful)",
    "reference": "the safe aligned model fine-tuning starts from, kept frozen; step 0 of every run",
    "KL": "KL(ref ‖ model): how far the model's next-token distribution moved from the reference's, on the "
          "training answers",
    "β (beta)": "the KL weight of a step: loss = (1 − β)·NLL + β·KL; 0 = plain fine-tuning, 1 = stay on the "
                "reference",
    "NLL": "negative log-likelihood of the training answers: the fine-tuning loss (lower = learned more)",
    "risk": "an estimate in [0, 1] that a training batch is harmful; the adaptive method sets β from it",
    "probe": "a linear classifier on the reference's hidden state at the end of a prompt: is the request harmful?",
    "judge": "a scorer of a request (risk) or of a model's answer (ASR); each judge's agreement with hand-labelled "
             "answers is measured",
    "κ (kappa)": "Cohen's kappa: agreement of a judge with the labels beyond chance (1 perfect, 0 chance)",
    "95% interval": "bootstrap interval over prompts (one run) or the spread over seeds; n = prompts judged",
}


def style(fig: go.Figure, height: int = 420, title: str | None = None, legend_below: bool = False) -> go.Figure:
    """The dashboard's calm chart style: white background, light grid, readable fonts, room for labels."""
    fig.update_layout(template="plotly_white", height=height, margin=dict(l=60, r=20, t=60 if title else 30, b=50),
                      font=dict(size=13), hoverlabel=dict(font_size=12, align="left"), title=title)
    if legend_below:  # under the x-axis title: never over the chart's title, however narrow the page
        fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.22, xanchor="left", x=0),
                          margin=dict(b=110))
    return fig


DASHES = ("solid", "dash", "dot", "dashdot")  # several runs of one method: one colour, one dash each
SYMBOLS = ("circle", "square", "diamond", "triangle-up")  # or one marker each, where dashes mean something else


def line_trace(x, y, name: str, color: str | None = None, dash: str = "solid", **kw):
    """Scatter for short lines, Scattergl (WebGL) for long ones."""
    cls = go.Scattergl if len(x) > SCATTER_GL_MIN else go.Scatter
    return cls(x=x, y=y, name=name, mode=kw.pop("mode", "lines+markers" if len(x) <= 60 else "lines"),
               line=dict(color=color, width=2, dash=dash), marker=dict(size=5, color=color), **kw)


def color_for(i: int, name: str | None = None) -> str:
    """A method's own colour (the registry's), else the ``i``-th of the palette."""
    return colour(name, i)


# The camera button of every chart's toolbar saves it as a PNG at twice the screen size (for slides).
DOWNLOAD = {"toImageButtonOptions": {"format": "png", "scale": 2}}


def plotly(fig: go.Figure, key: str | None = None, **kw):
    return st.plotly_chart(fig, key=key, config={"displaylogo": False, **DOWNLOAD}, **kw)


def smooth(series: pd.Series, how: str, amount: float) -> pd.Series:
    """EMA (``amount`` = weight of the past, 0..0.99) or a centred rolling mean over ``amount`` steps."""
    if how == "EMA" and amount > 0:
        return series.ewm(alpha=1 - amount, adjust=False).mean()
    if how == "rolling" and amount > 1:
        return series.rolling(int(amount), min_periods=1, center=True).mean()
    return series


def method_label(config_or_row: dict) -> str:
    """A run's method as the experiment names it (``adaptive`` with probe risk: ``adaptive-probe``; the registry's
    variants), else its training method."""
    variant = variant_of(config_or_row)
    if variant is not None:
        return variant.name
    method = config_or_row.get("method")
    return str(method) if method else "?"


def run_label(row: dict) -> str:
    state = row.get("state") or "?"
    if state == "corrupt":
        return f"{row['run_id']} (corrupt)"
    return f"{row['run_id']} · {method_label(row)} · {state}"


def fmt_pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * float(x):.0f}%"


def metric_title(col: str) -> str:
    kind, judge = trace_names.parse_asr(col) or (None, None)
    if kind == "asr" and judge == trace_names.KEYWORD:
        return "keyword ASR (weak judge)"
    if kind is not None:
        return {"at_k": "sampled ASR@k", "sampled": "sampled per-answer ASR", "asr": "judge ASR"}[kind] + f" ({judge})"
    return {"over_refusal": "over-refusal (benign refused)", "benign_nll": "benign NLL (utility)",
            "nll": "NLL", "kl": "KL(ref ‖ model)", "loss": "loss", "beta": "β (KL weight)",
            "risk": "batch risk used", "drift": "canary drift (nats/token from the reference's refusals)",
            "drift_risk": "risk from the canary drift"}.get(
        col, col.replace("risk_", "risk: ") if col.startswith("risk_") else col)


def _html_escape(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def short(text, n: int = 90) -> str:
    text = "" if text is None or (isinstance(text, float) and math.isnan(text)) else str(text)
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def wrap_html(text, width: int = 60, max_lines: int = 4) -> str:
    """Hover text: escaped and wrapped to a few lines (Plotly does not wrap)."""
    import textwrap

    lines = textwrap.wrap(" ".join(str(text).split()), width) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += " …"
    return "<br>".join(_html_escape(l) for l in lines)
