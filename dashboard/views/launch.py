"""Launch a run: a form over RunSpec, validated before anything is queued; the queue with live progress and cancel.

Runs are started by the queue worker (``staysafe.queue``) as background processes (argument lists, never a shell), one at a time
on CPU; the queue lives on disk, so it keeps advancing with the browser closed.
"""

from __future__ import annotations

import shlex
import time

import pandas as pd
import streamlit as st

import common
from staysafe.queue import ACTIVE, LaunchError, Queue, spec_arguments
from staysafe.runner import RISKS, RunSpec, SpecError

SCENARIOS = ("harmful", "mixed", "benign", "identity-shift")
METHODS = ("sft", "constant-kl", "adaptive")
MODELS = ("smollm2-135m-aligned", "smollm2-135m-instruct", "tiny")
JUDGES = ("embedding", "local-lm", "keyword", "openai")
EVAL_JUDGES = ("embedding-response", "local-lm")
OWN_DATA = "(my own data file)"

cfg = common.page_setup()
queue = Queue(cfg.runs)
d = RunSpec()

st.title(":material/rocket_launch: Launch a run")
st.caption(f"Runs go to {common.code(cfg.runs)}. One run trains at a time; further launches wait in the queue "
           f"(`{cfg.runs}/.queue/`), which keeps advancing when this tab is closed.")

tab_run, tab_exp = st.tabs(["Training run", "Experiment (several methods)"])

with tab_run:
    with st.form("launch_form"):
        c1, c2, c3 = st.columns(3)
        with c1:
            st.markdown("**Model and data**")
            model = st.selectbox("model", MODELS, index=0, accept_new_options=True, key="launch_model",
                                 help="A known name, a local model directory or a hub id (type it).")
            scenario = st.selectbox("scenario", (*SCENARIOS, OWN_DATA), key="launch_scenario",
                                    help="harmful: N harmful examples; mixed: the benign task with p% harmful; "
                                         "benign; identity-shift (the obedient-agent persona).")
            data = st.text_input("data file (when 'my own data file')", key="launch_data",
                                 placeholder="my_data.jsonl (.jsonl / .csv / .parquet or a hub id)")
            n_harmful = st.number_input("harmful examples (harmful scenario)", 1, 120, d.n_harmful,
                                        key="launch_n_harmful")
            harmful_percent = st.number_input("harmful % (mixed scenario)", 1.0, 10.0, d.harmful_percent, step=1.0,
                                              key="launch_harmful_percent")
        with c2:
            st.markdown("**Regularizer**")
            method = st.selectbox("method", METHODS, index=METHODS.index(d.method), key="launch_method",
                                  help="sft: plain fine-tuning (β = 0); constant-kl: fixed β; adaptive: β from risk.")
            beta = st.number_input("β (constant-kl)", 0.0, 1.0, d.beta, step=0.05, key="launch_beta")
            b1, b2 = st.columns(2)
            beta_min = b1.number_input("β min (adaptive)", 0.0, 1.0, d.beta_min, step=0.05, key="launch_beta_min")
            beta_max = b2.number_input("β max (adaptive)", 0.0, 1.0, d.beta_max, step=0.05, key="launch_beta_max")
            risk_ema = st.number_input("risk EMA (weight of the past)", 0.0, 0.99, d.risk_ema, step=0.1,
                                       key="launch_risk_ema")
            risk = st.selectbox("risk source", RISKS, index=RISKS.index(d.risk), key="launch_risk",
                                help="probe: activation probe on the reference; judge: cached judge score per "
                                     "training example; label: the oracle.")
            judge = st.selectbox("judge (for risk = judge)", JUDGES, key="launch_judge")
        with c3:
            st.markdown("**Training**")
            steps = st.number_input("steps", 1, 100_000, d.steps, key="launch_steps")
            lr = st.number_input("learning rate", 1e-7, 1.0, d.lr, step=1e-5, format="%.6f", key="launch_lr")
            lora_r = st.number_input("LoRA rank (0 = full fine-tuning)", 0, 512, d.lora_r, key="launch_lora_r")
            eval_every = st.number_input("evaluate every N steps", 0, 100_000, d.eval_every, key="launch_eval_every")
            batch_size = st.number_input("batch size", 1, 512, d.batch_size, key="launch_batch_size")
            seed = st.number_input("seed", 0, 2**31 - 1, d.seed, key="launch_seed")
        with st.expander("More options"):
            e1, e2, e3 = st.columns(3)
            eval_harmful = e1.number_input("held-out harmful prompts per evaluation", 0, 1000, d.eval_harmful,
                                           key="launch_eval_harmful")
            eval_benign = e1.number_input("held-out benign prompts per evaluation", 0, 1000, d.eval_benign,
                                          key="launch_eval_benign")
            max_new_tokens = e2.number_input("answer tokens per evaluation", 1, 1024, d.max_new_tokens,
                                             key="launch_max_new_tokens")
            max_length = e2.number_input("max sequence length", 16, 8192, d.max_length, key="launch_max_length")
            eval_judges = e3.multiselect("response judges for judge ASR", EVAL_JUDGES, default=d.eval_judges,
                                         key="launch_eval_judges",
                                         help="Keyword ASR is always measured; it is a weak judge.")
            record_judge = e3.checkbox("record the judge's risk too", d.record_judge, key="launch_record_judge")
            save_model = e3.checkbox("save the final model", d.save_model, key="launch_save_model")
            run_id = st.text_input("run id (optional)", key="launch_run_id",
                                   placeholder="letters, digits, '.', '_', '-'; default: time + method")
        submitted = st.form_submit_button("Validate and queue", type="primary")

    if submitted:
        own = scenario == OWN_DATA
        values = dict(model=str(model or "").strip(), scenario=None if own else scenario,
                      data=(data.strip() or None) if own else None, n_harmful=int(n_harmful),
                      harmful_percent=float(harmful_percent), method=method, beta=float(beta),
                      beta_min=float(beta_min), beta_max=float(beta_max), risk_ema=float(risk_ema), risk=risk,
                      judge=judge, steps=int(steps), lr=float(lr), lora_r=int(lora_r), eval_every=int(eval_every),
                      batch_size=int(batch_size), seed=int(seed), eval_harmful=int(eval_harmful),
                      eval_benign=int(eval_benign), max_new_tokens=int(max_new_tokens), max_length=int(max_length),
                      eval_judges=list(eval_judges), record_judge=bool(record_judge), save_model=bool(save_model))
        try:
            if own and not values["data"]:
                raise SpecError("option data is empty: type a .jsonl/.csv/.parquet file or a hub dataset id")
            if not values["model"]:
                raise SpecError("option model is empty: choose a model")
            job = queue.submit_train(RunSpec(**values), run_id.strip() or None)
        except (SpecError, LaunchError) as err:
            st.error(f"Not queued: {common.md(err)}")
        else:
            st.session_state["launch_last"] = job["id"]
            st.success(f"Queued run {common.code(job['run_id'])} (job {common.code(job['id'])}).")
            spec = RunSpec(**{**values, "runs_dir": str(cfg.runs)})
            st.caption("The same run from a terminal:")
            st.code("staysafe train " + shlex.join(spec_arguments(spec) + ["--run-id", job["run_id"],
                                                                          "--runs-dir", str(cfg.runs)]),
                    language="bash", wrap_lines=True)

with tab_exp:
    st.markdown("Runs several methods under the same data order and seeds (`staysafe experiment`); each method is "
                "a normal run, summarised in one results table. The CPU preset (`--quick`) takes about 30 minutes "
                "on the aligned model.")
    with st.form("experiment_form"):
        x1, x2, x3 = st.columns(3)
        exp_scenario = x1.selectbox("scenario", SCENARIOS, key="exp_scenario")
        exp_methods = x1.multiselect("methods", ["sft", "constant-kl", "adaptive-probe", "adaptive-judge",
                                                 "adaptive-label"],
                                     default=["sft", "constant-kl", "adaptive-probe", "adaptive-judge"],
                                     key="exp_methods")
        exp_seeds = x2.number_input("seeds", 1, 20, 1, key="exp_seeds")
        exp_quick = x2.checkbox("quick CPU preset (--quick)", True, key="exp_quick")
        exp_model = x3.selectbox("model", MODELS, accept_new_options=True, key="exp_model")
        exp_steps = x3.number_input("steps (0 = preset)", 0, 100_000, 0, key="exp_steps")
        exp_id = st.text_input("experiment id (optional)", key="exp_id")
        exp_submit = st.form_submit_button("Validate and queue the experiment")
    if exp_submit:
        try:
            job = queue.submit_experiment(cfg.experiments, exp_id.strip() or None, scenario=exp_scenario,
                                          methods=list(exp_methods), seeds=int(exp_seeds), quick=bool(exp_quick),
                                          model=str(exp_model or "").strip() or None,
                                          steps=int(exp_steps) or None)
        except (SpecError, LaunchError) as err:
            st.error(f"Not queued: {common.md(err)}")
        else:
            st.success(f"Queued experiment {common.code(job['target'])} (job {common.code(job['id'])}); results in {common.code(cfg.experiments)}.")

# ----------------------------------------------------------------------------------------------- the queue

head, toggle = st.columns([4, 1], vertical_alignment="bottom")
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
        st.toast(f"cannot cancel: {common.md(err)}")


def _running_job(job: dict) -> None:
    with st.container(border=True):
        top, btn = st.columns([5, 1], vertical_alignment="center")
        top.markdown(f":material/hourglass_top: **{job['kind']}** {common.code(job['target'])} · started {_ago(job.get('started'))} · pid "
                     f"{(job.get('process') or {}).get('pid')}" + (" · cancelling…" if job.get("cancel_requested") else ""))
        btn.button("Cancel", key=f"cancel_{job['id']}", on_click=_cancel, args=(job["id"],),
                   disabled=bool(job.get("cancel_requested")))
        if job["kind"] == "train":
            path = cfg.runs / job["target"]
            if not path.is_dir():
                st.progress(0.0, text="loading the model and data…")
            else:
                run, error = common.try_load_run(cfg.runs, job["target"], ("steps", "evals"))
                if error:
                    st.warning(f"progress unavailable: {common.md(error)}")
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
                        judges, kw = common.asr_columns(run.evals)
                        parts = [f"{common.metric_title(c)} {common.fmt_pct(ev[c])}" for c in judges + kw]
                        st.caption(f"last evaluation (step {int(ev['step'])}): " + " · ".join(parts))
        else:
            runs = common.runs_table(cfg.runs)
            mine = runs[runs["run_id"].str.startswith(job["target"] + "-")]
            st.caption(f"{int((mine['state'] == 'finished').sum())} run(s) finished so far: "
                       + ", ".join(f"{common.code(r)}" for r in mine["run_id"]) if len(mine) else "starting…")
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
            a.markdown(f"{i}. **{job['kind']}** {common.code(job['target'])} · queued {_ago(job.get('created'))}")
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
