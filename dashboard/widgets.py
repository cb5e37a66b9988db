"""Form widgets generated from the option schema (:mod:`staysafe.options`): label, help, choices, range and default
come from the option's field, so the Launch form cannot drift from the CLI or config.json."""

from __future__ import annotations

import typing
from dataclasses import MISSING, fields
from pathlib import Path

import pandas as pd
import streamlit as st

import safe_text
from loaders import runs_table, try_load_run
from staysafe.methods import regularised
from staysafe.options import DEFAULT_RESPONSE_JUDGE, RunSpec, default_of
from staysafe.runs import trace_names
from staysafe.runs.traces import Run


def option_label(name: str, schema=RunSpec) -> str:
    return _field(schema, name).metadata.get("label") or name.replace("_", " ")


def _field(schema, name: str):
    return next(f for f in fields(schema) if f.name == name)


def option_kind(name: str, schema=RunSpec):
    hint = typing.get_type_hints(schema)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args and typing.get_origin(hint) is not list else hint


def option_input(name: str, where=st, *, extra_choices: tuple = (), schema=RunSpec, prefix: str = "launch_",
                 default=MISSING, **widget):
    """The widget for option ``name`` of ``schema`` (RunSpec, or ExperimentSpec for the experiment form) in
    container ``where``, with key ``<prefix><name>``; ``default`` overrides the schema's (the form's first
    choice); ``widget``: extra keyword arguments of the streamlit call. Returns the value in the option's type."""
    f = _field(schema, name)
    m, kind, key = f.metadata, option_kind(name, schema), f"{prefix}{name}"
    default = default_of(f) if default is MISSING else default
    common = dict(label=option_label(name, schema), help=m["help"], key=key, **widget)
    if isinstance(default, list) or typing.get_origin(kind) is list:
        default = default or []
        options = list(dict.fromkeys([*(m.get("choices") or ()), *default]))
        return list(where.multiselect(options=options, default=default, accept_new_options=m["open_choices"],
                                      **common))
    if m.get("choices"):
        options = (*m["choices"], *extra_choices, *((None,) if default is None and not extra_choices else ()))
        return where.selectbox(options=options, index=options.index(default) if default in options else 0,
                               accept_new_options=m["open_choices"],
                               format_func=lambda v: "(none)" if v is None else v, **common)
    if kind is bool:
        return bool(where.checkbox(value=default, **common))
    if kind in (int, float):
        low = m["low"] if m.get("low") is not None else m.get("above")
        high = m["high"] if m.get("high") is not None else (m["below"] - 0.01 if m.get("below") is not None else None)
        value = where.number_input(min_value=None if low is None else kind(low),
                                   max_value=None if high is None else kind(high),
                                   value=None if default is None else kind(default), **common)
        return None if value is None else kind(value)
    text = where.text_input(value=default or "", **common).strip()
    return text or None


# ------------------------------------------------------------------------------------ pickers and labels


TEXT_COLUMNS = {"example_id", "label", "category", "prompt", "response", "messages", "id", "kind", "prompt_id"}


def sampled_columns(evals: pd.DataFrame) -> list[str]:
    """ASR@k and per-answer sampled ASR columns, per judge (keyword included)."""
    return sorted(trace_names.sampled(evals.columns))


DEFAULT_ASR = trace_names.asr(trace_names.column_judge(DEFAULT_RESPONSE_JUDGE))  # the default judge's ASR column


def judge_asr_columns(evals_frames) -> list[str]:
    """The response judges' ASR columns in any of ``evals_frames``, the default judge's first (a page that shows one
    judge shows the default one where it was recorded, e.g. added by ``staysafe rejudge``), then by name."""
    found = {trace_names.asr(j) for ev in evals_frames for j in trace_names.judges(ev.columns)
             if j != trace_names.KEYWORD}
    return sorted(found, key=lambda c: (c != DEFAULT_ASR, c))


def asr_columns(evals: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(judge ASR columns, the default judge's first; keyword ASR column if present): keyword is the weak judge."""
    keyword = trace_names.asr(trace_names.KEYWORD)
    return judge_asr_columns([evals]), ([keyword] if keyword in evals.columns else [])


def pick_runs(runs: pd.DataFrame, label: str, key: str, multi: bool = False, default_n: int = 1,
              prefer=None) -> list[str]:
    """A run picker over ``runs_table`` rows; defaults to the newest readable runs (those ``prefer(row)`` accepts
    first, e.g. runs that were regularized)."""
    options = runs["run_id"].tolist()
    labels = dict(zip(runs["run_id"], runs["label"]))
    readable = [r["run_id"] for r in runs.to_dict("records") if r["state"] != "corrupt"]
    if prefer is not None:
        preferred = [r["run_id"] for r in runs.to_dict("records") if r["state"] != "corrupt" and prefer(r)]
        readable = [r for r in readable if r not in preferred] + preferred
    if multi:  # runs another page opened (session state) replace the default; runs that are gone are dropped
        chosen = st.session_state.get(key)
        default = [r for r in chosen if r in options] if chosen is not None else readable[-default_n:]
        reset_on_change(key, (tuple(options), tuple(chosen or ())), default)
        return st.multiselect(label, options, format_func=lambda r: labels.get(r, r), key=key)
    if not options:
        return []
    index = options.index(readable[-1]) if readable else 0
    chosen = st.selectbox(label, options, index=index, format_func=lambda r: labels.get(r, r), key=key)
    return [chosen] if chosen else []


def regularized_run_or_stop(root: Path, key: str, tables: tuple[str, ...] = ("examples",)) -> Run:
    """The run picked on a page about risk and beta (regularized runs offered first); stops the page with a plain
    note when there is none or it cannot be read."""
    runs = runs_table(root)
    if runs.empty:
        no_runs(root)
        st.stop()
    run_id = pick_runs(runs, "run", key=key, prefer=regularised)[0]
    run, error = try_load_run(root, run_id, tables)
    if error:
        run_error(run_id, error)
        st.stop()
    return run


def pick_folder(root: Path, found: list[Path], what: str, key: str, placeholder: str) -> str:
    """A folder under ``root``: one of those ``found`` or one typed (checked later with ``safe_subdir``)."""
    base = root.resolve() if root.exists() else root
    options = [str(p.relative_to(base)) if p != base else "." for p in found]
    c1, c2 = st.columns(2)
    picked = c1.selectbox("found folders", options or ["(none found)"], key=key)
    typed = c2.text_input(f"or a folder inside the {what} root", key=f"{key}_typed", placeholder=placeholder)
    return typed.strip() or (picked if options else "")


def no_runs(root: Path) -> None:
    st.info(f"No runs under {safe_text.code(root)} yet. Launch one on the **Launch a run** page, or from a terminal:")
    st.code(f"staysafe train --scenario harmful --method sft --steps 40 --runs-dir {root}", language="bash")


def run_error(run_id: str, error: str) -> None:
    st.error(f"Run {safe_text.code(run_id)} cannot be read: {safe_text.md(error)}")


def status_line(run: Run) -> None:
    """One line about a run's state: running (with step), failed (with the error), interrupted..."""
    state = run.status.get("state")
    steps = int(run.steps["step"].max()) if len(run.steps) else 0
    total = run.config.get("steps")
    if state == "failed":
        st.warning(f"Run {safe_text.code(run.id)} failed after {steps} steps: {safe_text.md(run.status.get('error'))}")
    elif state in ("interrupted", "cancelled"):
        st.warning(
            f"Run {safe_text.code(run.id)} was {state} after {steps}/{total} steps: "
            f"{safe_text.md(run.status.get('error') or '')}"
        )
    elif state in ("running", "created"):
        st.info(
            f"Run {safe_text.code(run.id)} is {state}: {steps}/{total} steps so far "
            "(this page refreshes on every rerun)."
        )


# ------------------------------------------------------------------------------------ run time estimate (Launch page)

# README ("The live experiment", smollm2-135m on a 2-core CPU): 3.0 (sft) to 4.3 (adaptive) s per step, 9-11 s per
# evaluation; the fallback when no run of the model was measured on this machine.
README_STEP_SECONDS, README_EVAL_SECONDS = 4.3, 10.0


def evaluations(steps: int, eval_every: int) -> int:
    """How many evaluations a run makes: at step 0, every ``eval_every`` steps and at the last step."""
    return len({0, steps, *(range(0, steps, eval_every) if eval_every else ())})


def time_estimate(step_times, eval_times, steps: int, evals: int) -> tuple[float, float, bool]:
    """(seconds, seconds per step, measured) of a run of ``steps`` steps and ``evals`` evaluations: the median of
    the measured step times (``wall_time`` of steps.parquet) and of the evaluation times (evals.parquet; none
    recorded: 0); without any measured step, the README's figures and ``measured`` False."""
    step_times, eval_times = pd.Series(step_times, dtype=float).dropna(), pd.Series(eval_times, dtype=float).dropna()
    if step_times.empty:
        return steps * README_STEP_SECONDS + evals * README_EVAL_SECONDS, README_STEP_SECONDS, False
    per_eval = float(eval_times.median()) if len(eval_times) else 0.0
    per_step = float(step_times.median())
    return steps * per_step + evals * per_eval, per_step, True


def duration(seconds: float) -> str:
    """``seconds`` rounded for a person: 40 s, 3 min, 1.5 h."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


# ------------------------------------------------------------------------------- widget values that follow the data


def reset_on_change(key: str, signature, default) -> None:
    """Set widget ``key`` to ``default`` when what it chooses from changed (``signature``: another run, other
    options) or when it has no value yet. Call it before drawing the widget, and draw the widget without a default.

    Streamlit keeps a keyed widget's value across reruns even when its options change, so a filter chosen for one
    run would silently apply to the next; and only dropping the value leaves the browser showing the old choice
    while the page plots the default. Setting it through session state tells the browser.
    """
    marker = f"_signature_of_{key}"
    if key not in st.session_state or st.session_state.get(marker) != signature:
        st.session_state[key] = default
        st.session_state[marker] = signature
