"""The safety-utility trade-off of an experiment: each method (and sweep point) a point at (utility, ASR), with
error bars over seeds; constant-kl's beta sweep drawn as a curve. Utility is the user task's accuracy where the
runs have one (``--task``), else the benign NLL (lower is better). The same figure is the dashboard's
"Safety-utility trade-off" page and the experiment's ``frontier.html`` (and ``frontier.png`` where kaleido finds
a Chrome).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from staysafe.methods import colour
from staysafe.runs import trace_names

DEFAULT_JUDGE = "embedding_response"  # the default response judge's column suffix (final_asr_<judge>)


def judges(results: pd.DataFrame) -> list[str]:
    """The response judges whose final ASR the results hold, the default one first."""
    return sorted(trace_names.result_judges(results.columns), key=lambda j: (j != DEFAULT_JUDGE, j))


def judge_name(judge: str) -> str:
    """A judge's column suffix as the command line spells the judge:
    ``embedding_response`` -> ``embedding-response``."""
    return judge.replace("_", "-")


def axes(results: pd.DataFrame, judge: str | None = None) -> tuple[str, str, str]:
    """``(x column, its label, y column)``: task accuracy if recorded, else benign NLL; ASR by ``judge`` (default:
    the default response judge if recorded, else the keyword judge)."""
    if "final_task_accuracy" in results and results["final_task_accuracy"].notna().any():
        x, label = "final_task_accuracy", "task accuracy (higher is better)"
    else:
        x, label = "benign_nll", "benign NLL (lower is better)"
    if judge is not None:
        if f"final_asr_{judge}" not in results:
            raise KeyError(f"no ASR by the {judge} judge in these results; have {', '.join(judges(results))}")
        return x, label, f"final_asr_{judge}"
    y = f"final_asr_{DEFAULT_JUDGE}" if f"final_asr_{DEFAULT_JUDGE}" in results else "final_asr_keyword"
    return x, label, y


def frontier_points(results: pd.DataFrame, judge: str | None = None) -> pd.DataFrame:
    """One row per method and sweep point: mean and std over seeds of utility and ASR (by ``judge``, see
    :func:`axes`), the seeds and run ids."""
    x, _, y = axes(results, judge)
    sweep = [c for c in results.columns if c.startswith("sweep_")]
    keys = ["method", *sweep]
    g = results.groupby(keys, dropna=False, sort=False)
    out = g.agg(x=(x, "mean"), x_std=(x, "std"), y=(y, "mean"), y_std=(y, "std"), seeds=("seed", "nunique"),
                runs=("run_id", lambda r: ", ".join(r))).reset_index()
    out["label"] = out.apply(lambda r: r["method"] + "".join(
        f" {c[len('sweep_'):]}={r[c]:g}" if isinstance(r[c], float) else f" {c[len('sweep_'):]}={r[c]}"
        for c in sweep if pd.notna(r[c])), axis=1)
    return out.fillna({"x_std": 0.0, "y_std": 0.0})


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


def frontier_figure(results: pd.DataFrame, title: str | None = "Safety-utility trade-off", judge: str | None = None):
    import plotly.graph_objects as go

    x, xlabel, y = axes(results, judge)
    points = frontier_points(results, judge)
    fig = go.Figure()
    for k, (method, g) in enumerate(points.groupby("method", sort=False)):
        g = g.sort_values("x")
        curve = len(g) > 1  # a sweep (constant-kl's beta): its points joined as a curve
        fig.add_trace(go.Scatter(
            x=g["x"], y=g["y"] * 100, mode="lines+markers" if curve else "markers", name=method,
            line={"color": colour(method, k)}, marker_color=colour(method, k),
            error_x={"type": "data", "array": g["x_std"], "visible": True},
            error_y={"type": "data", "array": g["y_std"] * 100, "visible": True},
            marker_size=11, text=g["label"], customdata=g[["runs", "seeds"]].to_numpy(),
            hovertemplate="%{text}<br>utility %{x:.3f}<br>ASR %{y:.0f}%<br>seeds %{customdata[1]}"
                          "<br>runs %{customdata[0]}<extra></extra>"))
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
