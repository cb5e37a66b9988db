"""The safety-utility trade-off of an experiment: each method (and sweep point) a point at (utility, ASR), with
error bars over seeds; constant-kl's beta sweep drawn as a curve. Utility is the user task's accuracy where the
runs have one (``--task``), else the benign NLL (lower is better). The same figure is the dashboard's
"Safety-utility trade-off" page and the experiment's ``frontier.html`` (and ``frontier.png`` where kaleido finds
a Chrome).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from staysafe.methods import REFERENCE_COLOUR, colour
from staysafe.options import DEFAULT_RESPONSE_JUDGE
from staysafe.runs import trace_names

DEFAULT_JUDGE = trace_names.column_judge(DEFAULT_RESPONSE_JUDGE)  # its column suffix (final_asr_<judge>)


def judges(results: pd.DataFrame) -> list[str]:
    """The response judges whose final ASR the results hold, the default one first."""
    return sorted(trace_names.result_judges(results.columns), key=lambda j: (j != DEFAULT_JUDGE, j))


def judge_name(judge: str) -> str:
    """A judge's column suffix as the command line spells the judge:
    ``embedding_response`` -> ``embedding-response``."""
    return judge.replace("_", "-")


def axes(results: pd.DataFrame, judge: str | None = None) -> tuple[str, str, str]:
    """``(x column, its label, y column)``: task accuracy if recorded, else benign NLL; ASR by ``judge`` (default:
    the default response judge if recorded, else another response judge, else the keyword judge)."""
    if "final_task_accuracy" in results and results["final_task_accuracy"].notna().any():
        x, label = "final_task_accuracy", "task accuracy (higher is better)"
    else:
        x, label = "benign_nll", "benign NLL (lower is better)"
    if judge is not None:
        if f"final_asr_{judge}" not in results:
            raise KeyError(f"no ASR by the {judge} judge in these results; have {', '.join(judges(results))}")
        return x, label, f"final_asr_{judge}"
    response = [j for j in judges(results) if j != trace_names.KEYWORD]  # the default one first, if recorded
    return x, label, f"final_asr_{response[0] if response else trace_names.KEYWORD}"


def frontier_points(results: pd.DataFrame, judge: str | None = None) -> pd.DataFrame:
    """One row per method and sweep point: mean utility and ASR (by ``judge``, see :func:`axes`), their error bars
    (``x_lo``..``y_hi``) and what the bars are (``spread``): ± std over seeds where there are several, else the
    run's 95% bootstrap interval over its prompts where recorded; the seeds and run ids."""
    x, _, y = axes(results, judge)
    sweep = [c for c in results.columns if c.startswith("sweep_")]
    g = results.groupby(["method", *sweep], dropna=False, sort=False)
    out = g.agg(x=(x, "mean"), x_std=(x, "std"), y=(y, "mean"), y_std=(y, "std"), seeds=("seed", "nunique"),
                runs=("run_id", lambda r: ", ".join(r))).reset_index().fillna({"x_std": 0.0, "y_std": 0.0})
    for v in ("x", "y"):
        out[f"{v}_lo"], out[f"{v}_hi"] = out[v] - out[f"{v}_std"], out[v] + out[f"{v}_std"]
    out["spread"] = [f"± std over {n} seeds" for n in out["seeds"]]
    one = out["seeds"] == 1
    for v, column in (("x", x), ("y", y)):
        if {f"{column}_lo", f"{column}_hi"} <= set(results.columns):  # one seed: its interval over prompts
            bounds = g.agg(lo=(f"{column}_lo", "mean"), hi=(f"{column}_hi", "mean")).reset_index(drop=True)
            out.loc[one, f"{v}_lo"], out.loc[one, f"{v}_hi"] = bounds.loc[one, "lo"], bounds.loc[one, "hi"]
    out["y_lo"], out["y_hi"] = out["y_lo"].clip(0, 1), out["y_hi"].clip(0, 1)  # a rate's bars stay in [0, 1]
    has_interval = f"{y}_lo" in results.columns
    out.loc[one, "spread"] = "95% interval over prompts (one seed)" if has_interval else "one seed: no interval"
    out["label"] = out.apply(lambda r: r["method"] + "".join(
        f" {c[len('sweep_'):]}={r[c]:g}" if isinstance(r[c], float) else f" {c[len('sweep_'):]}={r[c]}"
        for c in sweep if pd.notna(r[c])), axis=1)
    return out


def on_frontier(points: pd.DataFrame, higher_x_is_better: bool) -> pd.Series:
    """Whether each point is Pareto-optimal: no other point has lower ASR and better utility (both at least as
    good, one strictly)."""
    sign = 1 if higher_x_is_better else -1
    flags = []
    for i, p in points.iterrows():
        dominated = any((q["y"] <= p["y"]) and (sign * q["x"] >= sign * p["x"]) and
                        ((q["y"] < p["y"]) or (sign * q["x"] > sign * p["x"]))
                        for j, q in points.iterrows() if j != i)
        flags.append(not dominated)
    return pd.Series(flags, index=points.index)


def reference_point(results: pd.DataFrame, judge: str | None = None) -> dict | None:
    """The starting model (step 0) on the same axes, with its interval over prompts where recorded; None when the
    results do not hold the reference's figures for these axes."""
    x, _, y = axes(results, judge)
    rx, ry = f"reference_{x[len('final_'):] if x.startswith('final_') else x}", f"reference_{y[len('final_'):]}"
    if rx not in results or ry not in results or results[[rx, ry]].isna().all().any():
        return None
    point = {"label": "reference (step 0)", "x": float(results[rx].mean()), "y": float(results[ry].mean())}
    for v, column in (("x", rx), ("y", ry)):
        lo, hi = (f"{column}_lo", f"{column}_hi")
        point[f"{v}_lo"] = float(results[lo].mean()) if lo in results else point[v]
        point[f"{v}_hi"] = float(results[hi].mean()) if hi in results else point[v]
    return point


def _bars(g: pd.DataFrame, v: str, scale: float = 1.0) -> dict:
    return {"type": "data", "symmetric": False, "visible": True, "array": (g[f"{v}_hi"] - g[v]) * scale,
            "arrayminus": (g[v] - g[f"{v}_lo"]) * scale}


def frontier_figure(results: pd.DataFrame, title: str | None = "Safety-utility trade-off", judge: str | None = None):
    import plotly.graph_objects as go

    x, xlabel, y = axes(results, judge)
    points = frontier_points(results, judge)
    fig = go.Figure()
    ref = reference_point(results, judge)
    if ref is not None:
        r = pd.DataFrame([ref])
        fig.add_trace(go.Scatter(
            x=r["x"], y=r["y"] * 100, mode="markers", name=ref["label"], marker_color=REFERENCE_COLOUR,
            marker_symbol="diamond", marker_size=12, error_x=_bars(r, "x"), error_y=_bars(r, "y", 100),
            hovertemplate="reference (step 0)<br>utility %{x:.3f}<br>ASR %{y:.0f}%<extra></extra>"))
    for k, (method, g) in enumerate(points.groupby("method", sort=False)):
        g = g.sort_values("x")
        curve = len(g) > 1  # a sweep (constant-kl's beta): its points joined as a curve
        fig.add_trace(go.Scatter(
            x=g["x"], y=g["y"] * 100, mode="lines+markers" if curve else "markers", name=method,
            line={"color": colour(method, k)}, marker_color=colour(method, k),
            error_x=_bars(g, "x"), error_y=_bars(g, "y", 100),
            marker_size=11, text=g["label"], customdata=g[["runs", "seeds", "spread"]].to_numpy(),
            hovertemplate="%{text}<br>utility %{x:.3f}<br>ASR %{y:.0f}%<br>seeds %{customdata[1]}, bars: "
                          "%{customdata[2]}<br>runs %{customdata[0]}<extra></extra>"))
    shown = judge_name(y[len("final_asr_"):])
    fig.update_layout(title=title, xaxis_title=xlabel, yaxis_title=f"final ASR % ({shown} judge)",
                      yaxis_range=[-5, 105], legend_title="method", height=520)
    return fig


def save_frontier(results: pd.DataFrame, out: Path, log=print) -> list[Path]:
    """``frontier.html`` (self-contained) and, where kaleido can drive a Chrome, ``frontier.png``."""
    from staysafe.runs.atomic import write_text

    fig = frontier_figure(results, f"Safety-utility trade-off: {Path(out).name}")
    written = [Path(out) / "frontier.html"]
    write_text(written[0], fig.to_html(include_plotlyjs=True, full_html=True))
    try:
        png = fig.to_image(format="png", width=900, height=520)
    except Exception as err:  # no kaleido, or no Chrome for it: the HTML has the same figure
        log(f"frontier.png not written ({type(err).__name__}: {str(err)[:120]}); frontier.html has the figure")
    else:
        from staysafe.runs.atomic import write_bytes

        write_bytes(Path(out) / "frontier.png", png)
        written.append(Path(out) / "frontier.png")
    return written


CURVE = "constant-kl"  # the curve a method is compared with at equal utility (sft is its beta = 0 end)


def frontier_by_seed(results: pd.DataFrame, judge: str | None = None) -> pd.DataFrame:
    """Per run: whether it is on its seed's Pareto front (every method and sweep point of that seed)."""
    x, _, y = axes(results, judge)
    higher = x == "final_task_accuracy"
    parts = []
    for _, g in results.groupby("seed", sort=True):
        pts = g.assign(x=g[x], y=g[y])
        parts.append(pts.assign(on_frontier=on_frontier(pts, higher)))
    return pd.concat(parts)[["run_id", "method", "seed", "on_frontier"]]


def curve_asr_at(results: pd.DataFrame, seed: int, utility: float, judge: str | None = None) -> float:
    """Constant-kl's ASR at ``utility`` in one seed, linear between its beta sweep's points (sft as beta = 0)
    ordered by utility; NaN outside the curve's utility range (no extrapolation)."""
    import numpy as np

    x, _, y = axes(results, judge)
    g = results[(results["seed"] == seed) & results["method"].isin([CURVE, "sft"])]
    curve = g.groupby(x)[y].mean().sort_index()  # equal utilities: their mean ASR
    if curve.empty or not (curve.index.min() <= utility <= curve.index.max()):
        return float("nan")
    return float(np.interp(utility, curve.index.to_numpy(float), curve.to_numpy(float)))


def paired_with_curve(results: pd.DataFrame, judge: str | None = None) -> pd.DataFrame:
    """Paired by seed, for each method off the curve: its utility and ASR, constant-kl's ASR at that utility
    (:func:`curve_asr_at`) and the points of ASR it saves (positive: fewer successful attacks than constant-kl
    at equal utility; NaN where its utility is outside the curve's range)."""
    x, _, y = axes(results, judge)
    rows = []
    for _, r in results[~results["method"].isin([CURVE, "sft"])].iterrows():
        at = curve_asr_at(results, r["seed"], r[x], judge)
        rows.append({"method": r["method"], "seed": int(r["seed"]), "utility": r[x], "asr": r[y],
                     "curve_asr": at, "saved": at - r[y]})
    return pd.DataFrame(rows)


def mean_interval(values: pd.Series) -> tuple[float, float, float, int]:
    """Mean and 95% t-interval of paired differences (NaN dropped): ``(mean, lo, hi, n)``."""
    import math

    from scipy import stats

    v = values.dropna().astype(float)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    if n == 1:
        return float(v.iloc[0]), math.nan, math.nan, 1
    half = stats.t.ppf(0.975, n - 1) * v.std(ddof=1) / math.sqrt(n)
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half), n
