"""Launch a run: a form generated from the option schema (RunSpec) with only the options the chosen method reads and
a time estimate, validated before anything is queued; the queue with live progress and cancel.

Runs are started by the queue worker (``staysafe.queue``) as background processes
(argument lists, never a shell), one at a time
on CPU; the queue lives on disk, so it keeps advancing with the browser closed.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import fields

import pandas as pd
import streamlit as st

import charts
import loaders
import safe_text
import settings
import widgets
from staysafe.methods import METHODS, method_options
from staysafe.models.names import TINY
from staysafe.options import ExperimentSpec, RunSpec, SpecError, spec_flags
from staysafe.presets import DEFAULT_METHODS, PRESETS, preset_options
from staysafe.queue import ACTIVE, LaunchError, Queue
from widgets import option_input

OWN_DATA = "(my own data file)"
# The form's layout: which options go where (their widgets, help and choices come from the schema). An option that
# only some methods read (the registry's Method.options) is shown only when one of them is chosen.
ABOVE = ("model", "method")  # outside the form: a form reruns only when submitted, and these two redraw it
COLUMNS = {
    "Data": ("scenario", "data", "n_harmful", "harmful_percent"),
    "Method's options": ("beta", "beta_min", "beta_max", "risk", "risk_ema", "token_betas", "lisa_align_steps",
                         "lisa_user_steps", "lisa_rho", "safelora_threshold", "safelora_layers", "safelora_unaligned",
                         "drift_every", "drift_gain", "drift_canaries", "drift_tokens"),
    "Training": ("steps", "lr", "lora_r", "eval_every", "batch_size", "seed"),
}
MORE = (  # rows of at most 3 columns under "More options", so that every label reads at 1024 px
    ("eval_harmful", "eval_benign", "max_new_tokens"),
    ("eval_samples", "eval_temperature", "eval_judges"),
    ("task", "eval_task", "max_length"),
    ("judge", "record_judge", "probe"),
    ("calibration", "risk_threshold", "risk_temperature"),
    ("batch_risk", "risk_fallback", "per_example_beta"),
    ("kl_top_k", "reference_cache", "precision"),
    ("lora_alpha", "lora_dropout", "grad_accum"),
    ("threads", "checkpoint_every", "save_model"),
    ("save_activations",),
)
MEASURED_RUNS = 20  # the newest finished runs of a model whose step times make the estimate
TINY_WARNING = ("`tiny` is a test model with random weights: it answers nothing meaningful, so keyword ASR reads "
                "100% from step 0. Use it to try the pipeline, not to measure safety.")
# Options deliberately not on the form, and why (a test fails when an option is neither placed nor listed here).
NOT_ON_FORM = {
    "report_to": "logging integrations are set up where they run (a terminal); the traces hold the same values",
    "fsdp": "several GPU processes under torchrun, not the one-at-a-time CPU queue", "fsdp_config": "with fsdp",
    "lm_head_all_positions": "a benchmark switch (the old, slower path)",
    "runs_dir": "the dashboard's runs root (sidebar)", "run_id": "its own field below the options",
    "experiment": "set by staysafe experiment",
}
WIDGET = {
    "beta": {"step": 0.05},
    "lisa_rho": {"step": 0.1},
    "safelora_threshold": {"step": 0.05},
    "beta_min": {"step": 0.05},
    "beta_max": {"step": 0.05},
    "risk_ema": {"step": 0.1},
    "harmful_percent": {"step": 1.0},
    "lr": {"step": 1e-5, "format": "%.6f"},
}

cfg = settings.page_setup(own=True)  # runs are launched into the user's own roots only
queue = Queue(cfg.runs, cfg.experiments)

st.title(":material/rocket_launch: Launch a run")
st.caption(f"Runs go to {safe_text.code(cfg.runs)}. One run trains at a time; further launches wait in the queue "
           f"(`{cfg.runs}/.queue/`), which keeps advancing when this tab is closed.")

tab_run, tab_exp = st.tabs(["Training run", "Experiment (several methods)"])
read_by = method_options()  # option -> the methods that read it; every other option is read by every method


def _reads(method: str, name: str) -> bool:
    """Whether ``method`` reads option ``name`` (an option that no method claims is read by every method)."""
    return method in read_by.get(name, (method,))


def _inputs(names, where, values: dict, method: str) -> None:
    """The widgets of ``names`` in ``where``, without the options ``method`` does not read."""
    for name in names:
        if _reads(method, name):
            values[name] = option_input(name, where, extra_choices=(OWN_DATA,) if name == "scenario" else (),
                                        **WIDGET.get(name, {}))


def _measured(model: str) -> tuple[list, list, int]:
    """The step and evaluation wall times recorded by the newest finished runs of ``model`` here, and how many runs
    were read."""
    runs = loaders.runs_table(cfg.runs)
    ids = runs.loc[(runs["state"] == "finished") & (runs["model"] == model), "run_id"].tolist()[-MEASURED_RUNS:]
    step_times, eval_times, n = [], [], 0
    for run_id in ids:
        run, _ = loaders.try_load_run(cfg.runs, run_id, ("steps", "evals"))
        if run is not None:
            step_times += run.steps.get("wall_time", pd.Series(dtype=float)).tolist()
            eval_times += run.evals.get("wall_time", pd.Series(dtype=float)).tolist()
            n += 1
    return step_times, eval_times, n


def _estimate(model: str, steps: int, eval_every: int, runs: int = 1) -> str:
    """A caption estimating the time of ``runs`` runs of ``model``, ``steps`` steps each."""
    step_times, eval_times, n = _measured(model)
    evals = widgets.evaluations(steps, eval_every)
    seconds, per_step, measured = widgets.time_estimate(step_times, eval_times, steps, evals)
    source = (f"{per_step:.2g} s per step measured on this machine ({n} finished run(s) of "
              f"{safe_text.code(model)})" if measured else
              f"not measured on this machine (no finished run of {safe_text.code(model)} here yet): a rough guess "
              f"from the README's {per_step:g} s per step for smollm2-135m on 2 CPU cores")
    each = f"{runs} runs × {widgets.duration(seconds)} = " if runs > 1 else ""
    return (f":material/schedule: Estimated time: {each}about {widgets.duration(seconds * runs)} ({steps} steps and "
            f"{evals} evaluation(s) per run, plus loading the model); {source}.")


def _tiny_warning(model: str) -> None:
    if model == TINY:
        st.warning(TINY_WARNING, icon=":material/warning:")


def _preset_input(where) -> str | None:
    """The experiment's preset, ``live`` first and chosen (the schema lists the presets in their own order)."""
    f = next(f for f in fields(ExperimentSpec) if f.name == "preset")
    options = [*sorted(f.metadata["choices"], key=lambda p: p != "live"), None]
    return where.selectbox(widgets.option_label("preset", ExperimentSpec), options, help=f.metadata["help"],
                           key="exp_preset", format_func=lambda v: "(none)" if v is None else v)


with tab_run:
    values: dict = {}
    top = st.columns(2)
    for name, col in zip(ABOVE, top):
        values[name] = option_input(name, col)
    top[1].caption(f"**{values['method']}**: {safe_text.md(METHODS[values['method']].help)}")
    _tiny_warning(values["model"])
    with st.form("launch_form"):
        for col, (title, names) in zip(st.columns(len(COLUMNS)), COLUMNS.items()):
            col.markdown(f"**{title}**")
            before = len(values)
            _inputs(names, col, values, values["method"])
            if len(values) == before:
                col.caption(f"{values['method']} reads none of these options.")
        with st.expander("More options"):
            for row in MORE:
                read = [n for n in row if _reads(values["method"], n)]
                for col, name in zip(st.columns(3) if read else (), read):
                    _inputs((name,), col, values, values["method"])
            run_id = st.text_input("run id (optional)", key="launch_run_id",
                                   placeholder="letters, digits, '.', '_', '-'; default: time + method")
        st.caption(_estimate(str(values["model"] or ""), values["steps"], values["eval_every"]))
        submitted = st.form_submit_button("Validate and queue", type="primary")

    if submitted:
        own = values["scenario"] == OWN_DATA
        values["scenario"] = None if own else values["scenario"]
        values["data"] = values["data"] if own else None
        values["model"] = str(values["model"] or "").strip()
        try:
            if own and not values["data"]:
                raise SpecError("option data is empty: type a .jsonl/.csv/.parquet file or a hub dataset id")
            if not values["model"]:
                raise SpecError("option model is empty: choose a model")
            job = queue.submit_train(RunSpec(**values), run_id.strip() or None)
        except (SpecError, LaunchError) as err:
            st.error(f"Not queued: {safe_text.md(err)}")
        else:
            st.session_state["launch_last"] = job["id"]
            st.success(f"Queued run {safe_text.code(job['run_id'])} (job {safe_text.code(job['id'])}).")
            st.caption("The same run from a terminal (options that differ from the defaults):")
            st.code("staysafe train " + shlex.join(spec_flags(RunSpec(**values), only_changed=True)
                                                   + ["--run-id", job["run_id"], "--runs-dir", str(cfg.runs)]),
                    language="bash", wrap_lines=True)

with tab_exp:
    st.markdown("Runs several methods under the same data order and seeds (`staysafe experiment`); each method is "
                "a normal run, summarised in one results table. Presets: `live` (sft beside adaptive-probe, about "
                "4 minutes on 2 CPU cores: for showing the effect in class) and `quick` (the README's experiments, "
                "15-20 minutes per method on a 2-core CPU without bf16).")
    top = st.columns(2)
    preset = _preset_input(top[0])
    exp_model = widgets.option_input("model", top[1], schema=ExperimentSpec, prefix="exp_")
    _tiny_warning(exp_model)
    with st.form("experiment_form"):
        x1, x2 = st.columns(2)
        exp = {name: widgets.option_input(name, where, schema=ExperimentSpec, prefix="exp_", **extra)
               for name, where, extra in (("scenario", x1, {}), ("methods", x2, {"placeholder": "the preset's"}),
                                          ("seeds", x1, {}), ("steps", x2, {"placeholder": "the preset's"}))}
        exp = {**exp, "methods": exp["methods"] or None, "preset": preset, "model": exp_model}
        preset_run = RunSpec(**preset_options(preset))
        n_runs = len(exp["methods"] or (preset and PRESETS[preset].methods) or DEFAULT_METHODS) * exp["seeds"]
        exp_id = st.text_input("experiment id (optional)", key="exp_id")
        st.caption(_estimate(str(exp_model or ""), exp["steps"] or preset_run.steps, preset_run.eval_every, n_runs))
        exp_submit = st.form_submit_button("Validate and queue the experiment")
    if exp_submit:
        try:
            job = queue.submit_experiment(exp_id.strip() or None, **{k: v for k, v in exp.items() if v is not None})
        except (SpecError, LaunchError) as err:
            st.error(f"Not queued: {safe_text.md(err)}")
        else:
            st.success(
                f"Queued experiment {safe_text.code(job['target'])} (job {safe_text.code(job['id'])}); "
                f"results in {safe_text.code(cfg.experiments)}."
            )

# ----------------------------------------------------------------------------------------------- the queue

head, toggle = st.columns([2, 1], vertical_alignment="bottom")
head.subheader("Queue")


def _set_paused() -> None:
    """Only a click changes the queue's state; the widget itself always shows the state on disk."""
    queue.pause() if st.session_state["launch_paused"] else queue.resume()


st.session_state["launch_paused"] = queue.paused  # paused elsewhere (another tab, `staysafe queue pause`)
toggle.toggle("pause the queue", key="launch_paused", on_change=_set_paused,
              help="Queued runs wait while paused; a running one finishes. Useful to keep the CPU free. "
                   "From a terminal: `staysafe queue pause|resume`.")
initial_jobs = queue.jobs()
polling = any(j.get("state") in ACTIVE for j in initial_jobs)


def _ago(t) -> str:
    if not t:
        return ""
    s = max(0, time.time() - float(t))
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.1f} h ago"


def _cancel(job_id: str) -> None:
    try:
        outcome = queue.cancel(job_id)
        st.toast(f"job {job_id}: {outcome}")
    except LaunchError as err:
        st.toast(f"cannot cancel: {safe_text.md(err)}")


def _running_job(job: dict) -> None:
    with st.container(border=True):
        top, btn = st.columns([5, 1], vertical_alignment="center")
        top.markdown(
            f":material/hourglass_top: **{job['kind']}** {safe_text.code(job['target'])} "
            f"· started {_ago(job.get('started'))} · pid "
            f"{(job.get('process') or {}).get('pid')}" + (" · cancelling…" if job.get("cancel_requested") else "")
        )
        btn.button("Cancel", key=f"cancel_{job['id']}", on_click=_cancel, args=(job["id"],),
                   disabled=bool(job.get("cancel_requested")))
        if job["kind"] == "train":
            path = cfg.runs / job["target"]
            if not path.is_dir():
                st.progress(0.0, text="loading the model and data…")
            else:
                run, error = loaders.try_load_run(cfg.runs, job["target"], ("steps", "evals"))
                if error:
                    st.warning(f"progress unavailable: {safe_text.md(error)}")
                else:
                    total = int(run.config.get("steps") or 1)
                    done = int(run.steps["step"].max()) if len(run.steps) else 0
                    st.progress(min(1.0, done / total), text=f"step {done} / {total}")
                    if len(run.steps):
                        last = run.steps.iloc[-1]
                        cols = st.columns(6)
                        for col, name in zip(cols, ("loss", "nll", "kl", "beta", "risk", "wall_time")):
                            value = last.get(name)
                            col.metric({"wall_time": "s / step", "beta": "β"}.get(name, name),
                                       "n/a" if value is None or pd.isna(value) else f"{float(value):.3g}")
                    if len(run.evals):
                        ev = run.evals.iloc[-1]
                        judges, kw = widgets.asr_columns(run.evals)
                        parts = [f"{charts.metric_title(c)} {charts.fmt_pct(ev[c])}" for c in judges + kw]
                        st.caption(f"last evaluation (step {int(ev['step'])}): " + " · ".join(parts))
        else:
            runs = loaders.runs_table(cfg.runs)
            mine = runs[runs["run_id"].str.startswith(job["target"] + "-")]
            st.caption(f"{int((mine['state'] == 'finished').sum())} run(s) finished so far: "
                       + ", ".join(f"{safe_text.code(r)}" for r in mine["run_id"]) if len(mine) else "starting…")
        with st.expander("log"):
            st.code(queue.log_tail(job["id"]) or "(no output yet)", language=None)


@st.fragment(run_every=2 if polling else None)
def queue_view() -> None:
    jobs = queue.jobs()
    if not jobs:
        st.info("The queue is empty: nothing is running or waiting.")
        return
    running = [j for j in jobs if j.get("state") == "running"]
    waiting = [j for j in jobs if j.get("state") == "queued"]
    done = [j for j in jobs if j.get("state") not in ACTIVE][::-1]
    if not running and not waiting:
        st.info("Nothing is running or waiting.")
    for job in running:
        _running_job(job)
    if waiting:
        st.markdown(f"**Waiting** ({len(waiting)})")
        for i, job in enumerate(waiting, 1):
            a, b = st.columns([5, 1], vertical_alignment="center")
            a.markdown(f"{i}. **{job['kind']}** {safe_text.code(job['target'])} · queued {_ago(job.get('created'))}")
            b.button("Cancel", key=f"cancel_{job['id']}", on_click=_cancel, args=(job["id"],))
    if waiting and queue.paused:
        st.caption("The queue is paused: waiting runs start when you resume it.")
    elif waiting and not running and queue.worker_pid() is None:
        st.warning("Runs are waiting but no queue worker is alive.")
        if st.button("Start the queue worker", key="start_runner"):
            queue.ensure_worker()
    if done:
        st.markdown("**Finished jobs**")
        st.dataframe(pd.DataFrame([{
            "job": j["id"], "kind": j.get("kind"), "target": j.get("target"),
            "state": j.get("state"),
            "ended": _ago(j.get("ended")), "error": j.get("error") or ""} for j in done[:20]]),
            hide_index=True, column_config={"error": st.column_config.TextColumn(width="large")})
        pick = st.selectbox("log of", [j["id"] for j in done[:20]], key="launch_log_pick")
        with st.expander("log"):
            st.code(queue.log_tail(pick) or "(empty)", language=None)
    if polling and not running and not waiting:
        st.rerun()  # all done: one full rerun stops the polling and refreshes the page


queue_view()
