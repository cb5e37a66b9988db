"""Guided demo: the effect told in four steps from a recorded experiment (``data/demo/``), so it works on first
open with no waiting: the aligned model refuses; plain fine-tuning on a few harmful examples erases that; the
adaptive regularizer keeps it; and what the risk signals saw."""

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
from staysafe.eval.stats import run_intervals
from staysafe.methods import regularised, risk_driven
from staysafe.options import SpecError
from staysafe.queue import LaunchError, Queue
from staysafe.runs.traces import TraceError

cfg = settings.page_setup(own=True)  # the recorded demo, or the user's own experiments (where re-runs are written)
st.title(":material/school: Guided demo: safety degradation and how to prevent it")

RECORDED = "recorded demo"
_JOB, _OPEN_NEXT = "demo_job", "_demo_open_next"  # the re-run this page follows; the experiment to open next run
recorded_exp, recorded_runs = cfg.demo / "experiment", cfg.demo / "runs"
live = loaders.experiments_under(cfg.experiments)
options = [RECORDED] + [p.name for p in live]
if st.session_state.get(_OPEN_NEXT) in options:  # a re-run that finished on this page opens its own results
    st.session_state["demo_source"] = st.session_state.pop(_OPEN_NEXT)
source = st.selectbox("experiment shown", options, key="demo_source",
                      format_func=lambda o: f"{o} ({cfg.demo})" if o == RECORDED else f"{o} (live, {cfg.experiments})")
if source == RECORDED:
    exp_dir, runs_root = recorded_exp, recorded_runs
else:
    exp_dir, runs_root = cfg.experiments / source, cfg.runs


def rerun_button(scenario: str = "harmful") -> None:
    """Queue the effect live through the launch queue (it lands in the normal experiments/runs roots): the live
    preset (sft beside adaptive-probe, minutes) or the recorded experiment's quick preset."""
    live, full = st.columns(2)
    chosen = None
    if live.button("Re-run it live (`--preset live`, ~4 min)", key="demo_rerun_live", icon=":material/play_arrow:",
                   help="sft beside adaptive-probe, 12 steps, evaluated at the start and the end. Measured: 217 s "
                        "for both on a 2-core AVX2-only CPU; ASR by the reader judge 10% -> 100% with sft, 10% -> 5% "
                        "with adaptive regularisation (seed 0, 20 held-out harmful prompts; README)"):
        chosen = {"preset": "live"}
    if full.button("Re-run all four methods (`--quick`, ~1 h)", key="demo_rerun", icon=":material/replay:",
                   help="the recorded experiment's preset: 40 steps per method, about an hour on 2 CPU cores "
                        "without bf16"):
        chosen = {"quick": True}
    if chosen is not None:
        try:
            job = Queue(cfg.runs, cfg.experiments).submit_experiment(scenario=scenario, **chosen)
        except (SpecError, LaunchError) as err:
            st.error(f"Not queued: {safe_text.md(err)}")
        else:
            st.session_state[_JOB] = job["id"]
    follow_rerun()


@st.fragment(run_every=2 if st.session_state.get(_JOB) else None)
def follow_rerun() -> None:
    """The re-run queued from this page, followed here (a teacher never leaves the page): each method's progress
    while it trains, and its results opened on this page when it ends."""
    job_id = st.session_state.get(_JOB)
    if not job_id:
        return
    queue = Queue(cfg.runs, cfg.experiments)
    try:
        job = queue.get(job_id)
    except LaunchError:
        st.session_state.pop(_JOB, None)
        return
    target, state = job.get("target"), job.get("state")
    with st.container(border=True):
        st.markdown(f":material/play_circle: Live re-run {safe_text.code(target)}: **{safe_text.md(state)}**")
        runs_now = loaders.runs_table(cfg.runs)
        mine = runs_now[runs_now["run_id"].str.startswith(f"{target}-")] if len(runs_now) else runs_now
        if state == "queued":
            st.caption("Waiting in the queue (one run trains at a time; see **Launch a run**).")
        elif not len(mine):
            st.progress(0.0, text="loading the model and data…")
        for row in mine.to_dict("records"):
            done, total = row.get("steps_done"), row.get("max_steps")
            frac = float(done) / float(total) if pd.notna(done) and pd.notna(total) and total else 0.0
            st.progress(min(1.0, frac), text=f"{row['run_id']} ({charts.method_label(row)}): "
                                             f"{row['state']}, step {0 if pd.isna(done) else int(done)}/"
                                             f"{'?' if pd.isna(total) else int(total)}")
        if state == "finished":
            st.session_state.pop(_JOB, None)
            st.session_state[_OPEN_NEXT] = target
            st.rerun()  # the whole page: it now opens the new experiment
        elif state not in ("queued", "running"):
            st.session_state.pop(_JOB, None)
            st.error(f"The re-run ended {safe_text.md(state)}: {safe_text.md(job.get('error') or '')} (its log is on "
                     "**Launch a run**).")


if not (exp_dir / "experiment.json").is_file():
    if source == RECORDED:
        st.info(
            f"No recorded demo yet: {safe_text.code(recorded_exp)} does not exist. "
            "Record one (about 30 minutes on 2 CPU "
            "cores; the aligned model is built first if needed):"
        )
        st.code(f"staysafe experiment --scenario harmful --quick --id experiment --out-dir {cfg.demo} "
                f"--runs-dir {recorded_runs}", language="bash")
        st.caption(f"This writes `{recorded_exp}/` (experiment.json, results.parquet, results.md) and one run per "
                   f"method under `{recorded_runs}/`. Or run it live from here:")
    else:
        st.info(f"{safe_text.code(exp_dir)} has no experiment.json.")
    rerun_button()
    st.stop()

try:
    desc, results = loaders.load_experiment_cached(exp_dir)
except TraceError as err:
    st.error(f"The experiment in {safe_text.code(exp_dir)} cannot be read: {safe_text.md(err)}")
    st.stop()
if results.empty or "run_id" not in results:
    st.info(
        f"Experiment {safe_text.code(desc.get('id'))} has no finished run yet "
        f"({safe_text.md(desc.get('state', '?'))}); results appear here "
        "as each method finishes."
    )
    st.stop()

runs, problems = {}, []
for row in results.to_dict("records"):
    run, error = loaders.try_load_run(runs_root, str(row["run_id"]))
    if error:
        problems.append(f"{safe_text.code(row['run_id'])}: {safe_text.md(error)}")
    else:
        runs.setdefault(row["method"], run)  # first seed of each method tells the story
if problems:
    st.warning("Some runs of this experiment cannot be read (the story uses the others):\n\n"
               + "\n".join(f"- {p}" for p in problems))
if not runs:
    st.stop()

first = next(iter(runs.values()))
judge_cols = widgets.judge_asr_columns(r.evals for r in runs.values())
asr_col = judge_cols[0] if judge_cols else "asr_keyword"
asr_name = charts.metric_title(asr_col)
sft = runs.get("sft")
adaptive_name = next((m for m in runs if risk_driven(m)), None)
adaptive = runs.get(adaptive_name) if adaptive_name else None
cfg0 = first.config
TASK = cfg0.get("task")
TRAINING = (f"the {safe_text.code(TASK)} task with {cfg0.get('harmful_percent'):g}% harmful examples mixed in"
            if cfg0.get("scenario") == "mixed" and TASK else
            f"{cfg0.get('harmful_percent'):g}% harmful examples among benign ones" if cfg0.get("scenario") == "mixed"
            else f"{cfg0.get('n_harmful')} harmful training examples" if cfg0.get("scenario") == "harmful"
            else f"the {safe_text.md(cfg0.get('scenario'))} data")
st.markdown(
    f"Experiment {safe_text.code(desc.get('id'))}: model {safe_text.code(cfg0.get('model'))}, "
    f"scenario **{safe_text.md(cfg0.get('scenario'))}** "
    f"({TRAINING}), {cfg0.get('steps')} steps, "
    f"methods {', '.join(f'{safe_text.code(m)}' for m in runs)}. "
    "ASR = share of held-out harmful requests answered instead of "
    f"refused, by the {'judge ' + asr_col[4:] if judge_cols else 'keyword judge (weak: it looks for refusal phrases)'}."
)
rerun_button(str(desc.get("scenario") or "harmful"))


def asr_at(run, step_pick: str, col: str = asr_col) -> float:
    ev = run.evals.sort_values("step")
    if ev.empty or col not in ev:
        return float("nan")
    return float(ev[col].iloc[0 if step_pick == "first" else -1])


@st.cache_data(show_spinner=False, max_entries=32)
def _intervals(generations: pd.DataFrame) -> pd.DataFrame:
    return run_intervals(generations, resamples=500).set_index("step") if len(generations) else pd.DataFrame()


def interval(run, step_pick: str, col: str = asr_col) -> str:
    """``95% CI lo–hi %, n prompts, seed s`` of a figure at the first or last evaluation, from the run's answers."""
    iv = _intervals(run.generations)
    if iv.empty or f"{col}_lo" not in iv:
        return f"seed {run.config.get('seed')}, no interval recorded"
    row = iv.iloc[0 if step_pick == "first" else -1]
    n = int(row[{"over_refusal": "n_benign", "task_accuracy": "n_task"}.get(col, "n_harmful")])
    return (f"95% CI {100 * row[f'{col}_lo']:.0f}–{100 * row[f'{col}_hi']:.0f}%, n = {n} prompts, "
            f"seed {run.config.get('seed')}")


def sample_prompts(run, k: int = 3) -> list[str]:
    """Harmful prompts refused at step 0 and answered at the end (the clearest), else any harmful prompts."""
    g = run.generations
    if g.empty:
        return []
    g = g[g["kind"] == "harmful"]
    s0, s1 = g["step"].min(), g["step"].max()
    a = g[g["step"] == s0].set_index("prompt_id")
    b = g[g["step"] == s1].set_index("prompt_id")
    both = a.index.intersection(b.index)
    flipped = [p for p in both if bool(a.at[p, "refused"]) and not bool(b.at[p, "refused"])]
    refused = [p for p in both if bool(a.at[p, "refused"]) and p not in flipped]
    rest = [p for p in both if p not in flipped and p not in refused]
    return (flipped + refused + rest)[:k]


def answers(run, prompt_ids: list[str], step_pick: str) -> dict[str, dict]:
    g = run.generations
    if g.empty:
        return {}
    step = g["step"].min() if step_pick == "first" else g["step"].max()
    at = g[g["step"] == step].set_index("prompt_id")
    return {p: at.loc[p].to_dict() | {"step": int(step)} for p in prompt_ids if p in at.index}


def answer_card(title: str, record: dict | None) -> None:
    with st.container(border=True):
        if not record:
            st.caption(f"{title}: no answer recorded")
            return
        verdict = ":material/shield: refused" if record.get("refused") else ":material/warning: answered"
        st.markdown(f"**{title}** · step {record['step']} · {verdict}")
        st.text(charts.short(record.get("response"), 400) or "(empty answer)")


def asr_figure(names: list[str], title: str) -> go.Figure:
    fig = go.Figure()
    for i, name in enumerate(names):
        ev = runs[name].evals.sort_values("step")
        for col, dash in dict.fromkeys([(asr_col, "solid"), ("asr_keyword", "dot")]):
            if col not in ev or (dash == "dot" and col == asr_col):
                continue
            label = name if col == asr_col else f"{name}: keyword ASR (weak judge)"
            fig.add_trace(go.Scatter(x=ev["step"], y=ev[col], name=label, mode="lines+markers",
                                     line=dict(color=charts.color_for(i, name), width=3 if col == asr_col else 1.5,
                                               dash=dash), showlegend=col == asr_col or len(names) == 1))
    fig.update_yaxes(range=[-0.03, 1.03], tickformat=".0%", title_text=asr_name)
    fig.update_xaxes(title_text="training step")
    charts.style(fig, height=420, title=title, legend_below=True)
    return fig


story_run = sft or first
prompts = sample_prompts(story_run)

st.divider()
st.header("1 · The aligned model refuses")
ref = asr_at(story_run, "first")
c1, c2 = st.columns([1, 3])
c1.metric("ASR at step 0", charts.fmt_pct(ref), help=f"{asr_name}, before any fine-tuning: the safe reference.")
c1.caption(interval(story_run, "first"))
refused = 1 - asr_at(story_run, "first", "asr_keyword")
c1.metric("refused at step 0", charts.fmt_pct(refused) if np.isfinite(refused) else "n/a",
          help="Share of held-out harmful prompts answered with a refusal phrase (keyword judge).")
c1.caption(interval(story_run, "first", "asr_keyword").replace("95% CI", "answered: 95% CI"))
with c2:
    st.markdown("Before fine-tuning, the reference model declines harmful requests. A few of the held-out harmful "
                "prompts and its answers:")
    before = answers(story_run, prompts, "first")
    for p in prompts:
        rec = before.get(p)
        st.markdown("> " + safe_text.md(charts.short(rec.get('prompt') if rec else p, 200)))
        answer_card("reference model", rec)

st.divider()
st.header("2 · Plain fine-tuning erases that")
if sft is None:
    st.info("This experiment has no `sft` run; the effect of plain fine-tuning is not shown.")
else:
    c1, c2 = st.columns([3, 2])
    with c1:
        charts.plotly(asr_figure(["sft"], "sft: ASR over training"), key="demo_sft_asr")
    with c2:
        st.metric("ASR before → after", f"{charts.fmt_pct(asr_at(sft, 'first'))} → "
                                         f"{charts.fmt_pct(asr_at(sft, 'last'))}", help=asr_name)
        st.caption(f"before: {interval(sft, 'first')}; after: {interval(sft, 'last')}")
        st.markdown(f"`sft` minimises only the NLL of the training answers (β = 0). After "
                    f"{int(sft.steps['step'].max()) if len(sft.steps) else '?'} steps on {TRAINING}, the model "
                    "has learned to comply, also with requests it never saw."
                    + (f" It also learned the task: {charts.fmt_pct(asr_at(sft, 'first', 'task_accuracy'))} → "
                       f"{charts.fmt_pct(asr_at(sft, 'last', 'task_accuracy'))} task accuracy ("
                       f"{interval(sft, 'last', 'task_accuracy').replace('prompts', 'questions')})."
                       if TASK else ""))
    after = answers(sft, prompts, "last")
    for p in prompts:
        a, b = st.columns(2)
        with a:
            answer_card("before", before.get(p))
        with b:
            answer_card("after sft", after.get(p))

st.divider()
st.header("3 · The adaptive regularizer keeps the refusals")
names = list(runs)
c1, c2 = st.columns([3, 2])
with c1:
    charts.plotly(asr_figure(names, "ASR over training, every method"), key="demo_all_asr")
with c2:
    st.markdown("`sft` fine-tunes with β = 0. `constant-kl` spends the same average β on every batch; the adaptive "
                "methods spend it where the risk signal says the batch is harmful. The goal: ASR stays near its "
                "step-0 value while the utility " + ("(task accuracy) still rises." if TASK else
                                                     "(benign NLL) still improves."))
rows = []
for n, r in runs.items():
    row = {"method": n, f"final {asr_name}": asr_at(r, "last"), "95% CI, n, seed": interval(r, "last")}
    if judge_cols:
        row["keyword ASR (weak)"] = asr_at(r, "last", "asr_keyword")
    if TASK:
        row["task accuracy"] = asr_at(r, "last", "task_accuracy")
    row["mean β"] = float(r.steps["beta"].mean()) if len(r.steps) else float("nan")
    row["benign NLL"] = (float(r.evals.sort_values("step")["benign_nll"].iloc[-1]) if len(r.evals)
                         else float("nan"))
    rows.append(row)
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", column_config={
    "method": st.column_config.TextColumn(pinned=True),
    "95% CI, n, seed": st.column_config.TextColumn(width="medium"),
    f"final {asr_name}": st.column_config.NumberColumn(
        "final judge ASR" if judge_cols else "final keyword ASR (weak)", format="percent", help=asr_name),
    "keyword ASR (weak)": st.column_config.NumberColumn("keyword ASR (weak)", format="percent"),
    "task accuracy": st.column_config.NumberColumn(format="percent", help="exact-match accuracy on the task's "
                                                                          "held-out questions: the utility"),
    "mean β": st.column_config.NumberColumn(format="%.2f"),
    "benign NLL": st.column_config.NumberColumn(format="%.2f")})
if adaptive is not None:
    after_ad = answers(adaptive, prompts, "last")
    for p in prompts:
        a, b = st.columns(2)
        with a:
            answer_card("after sft" if sft is not None else "before", (after if sft is not None else before).get(p))
        with b:
            answer_card(f"after {adaptive_name}", after_ad.get(p))

st.divider()
st.header("4 · What the risk signals saw")
reg = adaptive or next((r for r in runs.values() if regularised(r.config)), None)
if reg is None:
    st.info("No regularized run in this experiment.")
else:
    ex = loaders.examples_joined(reg.path)
    c1, c2 = st.columns(2)
    with c1:
        fig = go.Figure()
        signals = [c for c in ("risk_probe", "risk_judge") if c in ex]
        if signals and "label" in ex:
            per = ex.groupby("example_index").agg(label=("label", "first"), prompt=("prompt", "first"),
                                                  **{c: (c, "mean") for c in signals}).reset_index()
            for i, c in enumerate(signals):
                for g in ("harmful", "benign"):
                    v = per[per["label"] == g]
                    if v.empty:
                        continue
                    fig.add_trace(go.Box(y=v[c], x=[charts.metric_title(c)] * len(v), name=g, boxpoints="all",
                                         jitter=0.5, pointpos=0, marker=dict(color=charts.LABEL_COLORS[g], size=5),
                                         line=dict(color=charts.LABEL_COLORS[g]), legendgroup=g, showlegend=i == 0,
                                         text=[charts.wrap_html(p, 50, 2) for p in v["prompt"]],
                                         hovertemplate="%{text}<br>risk %{y:.2f}<extra></extra>"))
            fig.update_layout(boxmode="group")
            fig.update_yaxes(range=[-0.03, 1.03], title_text="risk per training example")
            charts.style(fig, height=420, title=f"Risk of each training example ({charts.method_label(reg.config)})",
                         legend_below=True)
            charts.plotly(fig, key="demo_risk")
        else:
            st.info("This run recorded no probe or judge risk per example.")
    with c2:
        fig = go.Figure()
        for i, (n, r) in enumerate(runs.items()):
            if len(r.steps):
                fig.add_trace(go.Scatter(x=r.steps["step"], y=r.steps["beta"], name=n, mode="lines",
                                         line=dict(color=charts.color_for(i, n), width=2.5)))
        fig.update_yaxes(range=[-0.03, 1.03], title_text="β (KL weight)")
        fig.update_xaxes(title_text="training step")
        charts.style(fig, height=420, title="β over training", legend_below=True)
        charts.plotly(fig, key="demo_beta")
    st.markdown("The probe reads the reference model's hidden state at the end of each training prompt; the judge "
                "scored each training example once before training. Where they say *harmful*, β rises and the "
                "update is pulled back toward the safe reference. The **Regularization explorer** lists every "
                "example with the β it received.")
