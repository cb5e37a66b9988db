"""Re-judge what was recorded: judges improve, the answers a run gave do not change.

``rejudge_run`` scores a run's recorded harmful answers (``generations.parquet``, and ``samples.parquet`` when the
run sampled) with response judges, without the model, and adds per step the same figures an evaluation records
(``asr_<judge>``, ``failed_<judge>``; sampled: ``asr_sampled_<judge>``, ``asr_at_k_<judge>``) to
``evals.parquet``. Columns of other judges stay; a judge scored again replaces its own. Every new table is built
aside first and each is swapped in whole (``publish_dir``), ``evals`` last: a re-judge killed before the swaps leaves
the run as it was, and one killed between them leaves only extra ``score_<judge>`` columns, which no figure reads.
``rejudge_experiment`` does it for every run of an experiment and rebuilds its results table and frontier.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from staysafe.eval.evaluation import hits, judge_figures, sampled_figures
from staysafe.options import SpecError
from staysafe.runs import process, trace_names
from staysafe.runs.atomic import atomic_dir, write_parquet
from staysafe.runs.faults import fault_pause
from staysafe.runs.traces import TraceError, load_run, real_dir, safe_run_path


def _scored(table: pd.DataFrame, judge) -> pd.DataFrame:
    """``table`` with ``score_<judge>`` on its harmful rows (NaN elsewhere, as an evaluation leaves them)."""
    column = trace_names.score(judge.name)
    harmful = table["kind"] == "harmful" if "kind" in table else pd.Series(False, index=table.index)
    scores = pd.Series(float("nan"), index=table.index)
    if harmful.any():
        rows = table[harmful]
        scores[harmful] = judge.score(rows["prompt"].astype(str).tolist(), rows["response"].astype(str).tolist())
    return table.assign(**{column: scores.astype(float)})


def _figures(generations: pd.DataFrame, samples: pd.DataFrame, judge) -> pd.DataFrame:
    """Per step, the judge's figures from its scores, as an evaluation records them (:func:`judge_figures`,
    :func:`sampled_figures`)."""
    column, rows = trace_names.score(judge.name), {}
    for step, g in generations[generations["kind"] == "harmful"].groupby("step"):
        rows[int(step)] = judge_figures(judge.name, g[column].tolist())
    if len(samples) and column in samples:
        for step, g in samples[samples["kind"] == "harmful"].groupby("step"):
            per_prompt = [hits(p.tolist()) for _, p in g.groupby("prompt_id", sort=False)[column]]
            rows.setdefault(int(step), {}).update(sampled_figures(judge.name, per_prompt))
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("step").reset_index()


def _replace_table(run_dir: Path, name: str, table: pd.DataFrame) -> None:
    """Swap ``<name>.parquet/`` for a directory holding ``table`` as one part (whole, or not at all)."""
    with atomic_dir(run_dir / f"{name}.parquet") as tmp:
        write_parquet(tmp / "0001-00000000-00000000.parquet", table)


def rejudge_run(run_dir: str | Path, judges: list, log=print) -> list[str]:
    """Score a finished (or stopped) run's recorded answers with ``judges`` (built response judges) and add their
    figures to its evaluations; returns the ASR columns written. A running run is refused, and none is touched
    while this holds its lock."""
    run_dir = Path(run_dir)
    if not real_dir(run_dir):
        raise TraceError(f"{run_dir} is not a run directory")
    try:
        lock = process.LifeLock(run_dir / process.LOCK_NAME, wait=0.5)
    except process.LockBusy:
        raise SpecError(f"run {run_dir} is running; re-judge it when it has stopped") from None
    try:
        run = load_run(run_dir, ("evals", "generations", "samples"))
        if run.damaged:
            raise TraceError(f"run {run_dir} has damaged trace parts ({'; '.join(run.damaged)}); not re-judged")
        if run.evals.empty or run.generations.empty:
            raise TraceError(f"run {run_dir} recorded no evaluation: there are no answers to judge")
        generations, samples, evals = run.generations, run.samples, run.evals
        written = []
        for judge in judges:
            log(f"{run_dir.name}: {judge.name} scores {int((generations['kind'] == 'harmful').sum())} answers"
                + (f" and {int((samples['kind'] == 'harmful').sum())} sampled ones" if len(samples) else ""))
            generations = _scored(generations, judge)
            if len(samples):
                samples = _scored(samples, judge)
            figures = _figures(generations, samples, judge)
            evals = evals.drop(columns=[c for c in figures.columns if c != "step" and c in evals])
            evals = evals.merge(figures, on="step", how="left")
            written.append(trace_names.asr(judge.name))
        fault_pause("rejudge@swap")  # everything is scored; nothing is swapped yet
        _replace_table(run_dir, "generations", generations)
        if len(samples):
            _replace_table(run_dir, "samples", samples)
        fault_pause("rejudge@evals")
        _replace_table(run_dir, "evals", evals)
        return written
    finally:
        lock.release()


def rejudge_experiment(exp_dir: str | Path, runs_dir: str | Path, judges: list, log=print) -> pd.DataFrame:
    """Re-judge every run of an experiment (its ``results.parquet`` names them), then rebuild its results table and
    frontier from the runs (:func:`staysafe.experiment.summarise_again`)."""
    from staysafe.experiment import load_experiment, summarise_again

    exp_dir, runs_dir = Path(exp_dir), Path(runs_dir)
    _, results = load_experiment(exp_dir)
    run_dirs = [safe_run_path(runs_dir, str(r)) for r in results.get("run_id", [])]
    missing = [str(p) for p in run_dirs if not p.is_dir()]
    if missing:  # checked before any work: an experiment is re-judged whole or not at all
        raise TraceError(f"experiment {exp_dir}: run(s) not under {runs_dir}: {', '.join(missing)}")
    for path in run_dirs:
        rejudge_run(path, judges, log)
    return summarise_again(exp_dir, runs_dir)
