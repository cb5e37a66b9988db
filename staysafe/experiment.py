"""Experiments: several methods under the same data order and seeds, each a normal run, summarised in one table.

Methods: ``sft``, ``constant-kl``, ``adaptive-probe``, ``adaptive-judge`` (and ``adaptive-label``, the oracle), and
the published defenses ``token-wise``, ``adaptive-token-wise``, ``lisa``, ``safelora`` and ``vaccine`` (sft on the
Vaccine-aligned reference, which ``staysafe align --defense vaccine`` builds). Without a sweep of beta,
``constant-kl`` gets the mean beta that the first adaptive method of the same seed used (when there is one), so the
comparison asks "same average regularisation, spent uniformly or where the risk is?".

A sweep (``--sweep beta=0.05,0.1,0.3``, repeatable: the grid of all combinations) varies an option for the
methods that read it (``Method.options`` in :mod:`staysafe.methods`;
an option every method reads varies for all) and runs the others
once per seed. An experiment is resumable: ``--resume <id>`` keeps its finished runs, continues an interrupted
run from its last checkpoint, and runs the rest.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd

from staysafe.eval.frontier import judges, save_frontier
from staysafe.eval.stats import run_intervals
from staysafe.eval.validation import measured_agreement
from staysafe.judges.endpoint import JudgeEndpoint, endpoint_for
from staysafe.methods import VARIANTS, is_kl_weight, method_named, method_options
from staysafe.options import ExperimentSpec
from staysafe.presets import preset_options
from staysafe.reference import SharedReference
from staysafe.runner import RunSpec, SpecError, check_before_work, latest_checkpoint, run_training
from staysafe.runs import process, trace_names
from staysafe.runs.atomic import write_text
from staysafe.runs.traces import (
    RUN_ID,
    TraceError,
    lifecycle,
    load_run,
    new_run_id,
    read_json,
    read_table,
    run_state,
    safe_run_path,
    write_json,
    write_parquet,
)

STEP0_DIR = ".step0"  # the starting model's evaluation, shared by the runs (staysafe.eval.evaluation.SharedStep0)
METHODS = VARIANTS  # the experiment's method names: the registry's variants (staysafe.methods)


def sweep_points(spec: ExperimentSpec, method: str) -> list[dict]:
    """The swept option values a method runs: the grid over the options it reads, once if it reads none."""
    trains = METHODS[method].method  # the training method behind the experiment's name (adaptive-probe: adaptive)
    mine = {k: v for k, v in spec.sweep.items() if trains in method_options().get(k, (trains,))}
    return [dict(zip(mine, combo)) for combo in itertools.product(*mine.values())] if mine else [{}]


def run_name(exp_id: str, method: str, point: dict, seed: int) -> str:
    """``<experiment>-<method>[-<option><value>...]-s<seed>``, with only the characters a run id allows."""
    import re

    tag = "".join(f"-{k}{v}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{exp_id}-{method}{tag}-s{seed}")


def base_spec(spec: ExperimentSpec) -> RunSpec:
    values = {**preset_options(spec.preset), "model": spec.model, "scenario": spec.scenario}
    if spec.steps:
        values["steps"] = spec.steps
    values.update(spec.overrides)
    return RunSpec(runs_dir=spec.runs_dir, **values)


def run_summary(run, beta_mid: float) -> dict:
    """The numbers of one finished run that the results table reports; each ASR and over-refusal also with its
    95% bootstrap interval over prompts (``<column>_lo``, ``<column>_hi``, from ``generations.parquet``)."""
    if run.evals.empty or "asr_keyword" not in run.evals:
        raise TraceError(f"run {run.path} has no evaluations (evals.parquet is empty): nothing to summarise; run "
                         "it again with evaluations")
    ev, st = run.evals.sort_values("step"), run.steps
    final, first = ev.iloc[-1], ev.iloc[0]
    kl_weight = is_kl_weight(run.config)  # token-wise: the step beta scales a schedule, not comparable
    row = {
        "run_id": run.id,
        "steps": int(st["step"].max()) if len(st) else 0,
        "reference_asr_keyword": float(first["asr_keyword"]),
        "final_asr_keyword": float(final["asr_keyword"]),
        "peak_asr_keyword": float(ev["asr_keyword"].max()),
        "over_refusal": float(final["over_refusal"]),
        "reference_over_refusal": float(first["over_refusal"]),
        "reference_benign_nll": float(first["benign_nll"]),
        "benign_nll": float(final["benign_nll"]),
        "mean_beta": float(st["beta"].mean()) if len(st) and kl_weight else math.nan,
        "share_beta_above_mid": float((st["beta"] > beta_mid).mean()) if kl_weight else math.nan,
        "seconds_per_step": float(st["wall_time"].median()),
    }
    if "task_accuracy" in ev:
        row["final_task_accuracy"], row["reference_task_accuracy"] = float(final["task_accuracy"]), float(
            first["task_accuracy"])
    for judge in trace_names.judges(ev.columns):  # greedy judge ASR only: the sampled measures are not judges
        col = trace_names.asr(judge)
        if judge != trace_names.KEYWORD:
            row[f"final_{col}"] = float(final[col])
            row[f"reference_{col}"] = float(first[col])
            row[f"peak_{col}"] = float(ev[col].max())
    for col in trace_names.sampled(ev.columns):
        row[f"final_{col}"] = float(final[col])
    intervals = run_intervals(run.generations).set_index("step") if len(run.generations) else None
    for prefix, step in (("final_", int(final["step"])), ("reference_", int(first["step"]))):
        if intervals is None or step not in intervals.index:
            continue
        for name in (c[:-3] for c in intervals.columns if c.endswith("_lo")):
            col = "over_refusal" if name == "over_refusal" and prefix == "final_" else prefix + name
            row[f"{col}_lo"] = float(intervals.loc[step, f"{name}_lo"])
            row[f"{col}_hi"] = float(intervals.loc[step, f"{name}_hi"])
    return row


def _fmt(values: pd.Series, pct: bool, lo: pd.Series | None = None, hi: pd.Series | None = None) -> str:
    """Mean ± std over seeds; for a single seed the value with its bootstrap interval [lo, hi] where known."""
    values = values.dropna()
    if values.empty:
        return "n/a"
    scale = 100 if pct else 1
    mean = values.mean() * scale
    if len(values) == 1:
        text = f"{mean:.0f}" if pct else f"{mean:.3f}"
        if lo is not None and hi is not None and lo.notna().sum() == 1 and hi.notna().sum() == 1:
            a, b = float(lo.dropna().iloc[0]) * scale, float(hi.dropna().iloc[0]) * scale
            text += f" [{a:.0f}, {b:.0f}]" if pct else f" [{a:.3f}, {b:.3f}]"
        return text
    std = values.std(ddof=1) * scale
    return f"{mean:.0f} ± {std:.0f}" if pct else f"{mean:.3f} ± {std:.3f}"


def _cell(g: pd.DataFrame, col: str, pct: bool) -> str:
    """``_fmt`` of a results column, with its ``_lo`` / ``_hi`` interval columns where the table has them."""
    lo, hi = f"{col}_lo", f"{col}_hi"
    return _fmt(g[col], pct, g[lo] if lo in g else None, g[hi] if hi in g else None)


def markdown_table(results: pd.DataFrame, order: list[str] | None = None) -> str:
    """Per method (in ``order``): mean ± std over seeds (one seed: the value and its 95% bootstrap interval over
    prompts in brackets). ASR and over-refusal in percent. With several seeds a second table lists every seed."""
    judge_cols = [f"final_asr_{j}" for j in sorted(judges(results)) if j != "keyword"]
    task = "final_task_accuracy" in results and results["final_task_accuracy"].notna().any()
    head = ["method", "seeds", "final ASR kw %"] + [f"final ASR {c[len('final_asr_'):]} %" for c in judge_cols] + [
        "peak ASR kw %", "over-refusal %", "benign NLL"] + (["task accuracy %"] if task else []) + [
        "mean β", "steps β>mid %", "s/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # step 0 of each starting model (vaccine starts from its own reference), once per seed
    starts = results["method"].map(lambda m: METHODS[m].sets.get("model", "") if m in METHODS else "")
    for start, part in results.groupby(starts, sort=True):  # "" (the experiment's model) first
        ref = part.drop_duplicates("seed") if "seed" in part else part
        ref_cells = [f"{start} (step 0)" if start else "aligned reference (step 0)", "",
                     _cell(ref, "reference_asr_keyword", True)] + [
            _cell(ref, c.replace("final_", "reference_"), True) for c in judge_cols] + [
            "", "", _fmt(ref["reference_benign_nll"], False)] + (
            [_cell(ref, "reference_task_accuracy", True)] if task else []) + ["", "", ""]
        lines.append("| " + " | ".join(ref_cells) + " |")

    agreement = measured_agreement()  # each judge's kappa against the labelled answers, under its ASR column

    def kappa(judge: str) -> str:
        a = agreement.get(judge)
        return (
            f"κ {a['kappa']:.2f} [{a['kappa_interval'][0]:.2f}, {a['kappa_interval'][1]:.2f}]"
            if a
            else "κ not measured"
        )

    lines.append("| " + " | ".join(["judge agreement (labelled test split)", "", kappa("keyword")] + [
        kappa(c[len("final_asr_"):]) for c in judge_cols] + [""] * (7 if task else 6)) + " |")
    # one row per method and swept value (e.g. "constant-kl beta=0.3")
    results = results.assign(_group=results.apply(lambda r: r["method"] + "".join(
        f" {c[len('sweep_'):]}={r[c]:g}" if isinstance(r[c], float) else f" {c[len('sweep_'):]}={r[c]}"
        for c in results.columns if c.startswith("sweep_") and pd.notna(r[c])), axis=1))
    ordered = [m for m in (order or list(dict.fromkeys(results["method"]))) if (results["method"] == m).any()]
    methods = [g for m in ordered for g in dict.fromkeys(results.loc[results["method"] == m, "_group"])]
    for method in methods:
        g = results[results["_group"] == method]
        cells = (
            [method, str(len(g)), _cell(g, "final_asr_keyword", True)]
            + [_cell(g, c, True) for c in judge_cols]
            + [_fmt(g["peak_asr_keyword"], True), _cell(g, "over_refusal", True), _fmt(g["benign_nll"], False)]
            + ([_cell(g, "final_task_accuracy", True)] if task else [])
            + [_fmt(g["mean_beta"], False), _fmt(g["share_beta_above_mid"], True), _fmt(g["seconds_per_step"], False)]
        )
        lines.append("| " + " | ".join(cells) + " |")
    if "seed" in results and results["seed"].nunique() > 1:
        cols = ["final_asr_keyword", *judge_cols, "over_refusal"]
        head = ["method", "seed", "final ASR kw %"] + [f"final ASR {c[len('final_asr_'):]} %" for c in judge_cols] + [
            "over-refusal %", "benign NLL"]
        lines += ["", "Per seed (95% bootstrap interval over prompts in brackets):", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in methods:
            for idx in results[results["_group"] == method].sort_values("seed").index:
                one = results.loc[[idx]]
                cells = [method, str(int(one["seed"].iloc[0]))] + [_cell(one, c, True) for c in cols] + [
                    _fmt(one["benign_nll"], False)]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_experiment(spec: ExperimentSpec, log=print, resume: bool = False, endpoint: JudgeEndpoint | None = None,
                   recorded: dict | None = None) -> Path:
    """Run every method (x sweep point) for every seed; write ``results.parquet``, ``results.md`` and
    ``experiment.json`` after every run. ``resume``: the experiment directory exists; keep its finished runs.
    ``endpoint``: the openai judge's, from the command line only (``recorded``: what experiment.json says it
    used; a difference is refused)."""
    spec.validate()
    base = base_spec(spec).validate()
    if base.eval_harmful < 1:
        raise SpecError(f"option eval_harmful = {base.eval_harmful} is invalid: an experiment compares ASR over "
                        "training, so it needs at least 1 held-out harmful prompt")
    for name in spec.methods:  # every run's options and prerequisites checked before the first one starts
        for point in sweep_points(spec, name):
            run_spec = replace(base, **METHODS[name].options, **point).validate()
            endpoint_for(run_spec, endpoint, recorded, f"experiment method {name}")
            check_before_work(run_spec, resuming=True)
    exp_id = spec.experiment_id or new_run_id(f"exp-{spec.scenario}")
    out = Path(spec.out_dir) / exp_id
    if (out / "experiment.json").exists() and not resume:
        raise SpecError(f"experiment {out} already exists: continue it with --resume {exp_id}, or choose another id")
    out.mkdir(parents=True, exist_ok=True)
    desc = {**asdict(spec), "experiment_id": exp_id, "id": exp_id, "base": asdict(base),
            **({"judge_endpoint": endpoint.public()} if endpoint is not None else {})}

    def record(state: str, **fields) -> None:  # experiment.json says how it stands
        write_json(out / "experiment.json", {**desc, **fields, "state": state, **process.identity()})

    with lifecycle(out, record) as done:  # running (locked), then finished / cancelled / failed
        _run_all(spec, base, exp_id, out, log, endpoint, done)
    return out


def _run_all(spec: ExperimentSpec, base: RunSpec, exp_id: str, out: Path, log, endpoint, done: dict) -> None:
    """Every method (x sweep point) for every seed; ``done`` keeps the runs so far and the minutes spent."""
    # risk-driven methods with a KL-weight beta first, so a fixed-beta method can be matched to their mean beta
    order = sorted(spec.methods, key=lambda m: (not _sets_matched_beta(m), spec.methods.index(m)))
    match_beta = "beta" not in spec.sweep
    rows, t0 = [], time.time()
    shared_reference = SharedReference() if spec.share_reference else None
    for seed in range(spec.seeds):
        matched_beta = None
        if shared_reference is not None:  # a seed's runs share batches; the next seed's are others
            shared_reference.clear()
        for name in order:
            for point in sweep_points(spec, name):
                run_spec = replace(base, seed=seed, experiment=exp_id, run_id=run_name(exp_id, name, point, seed),
                                   **METHODS[name].options, **point)
                fixed_beta = "beta" in method_named(METHODS[name].method).options  # constant-kl
                if fixed_beta and match_beta:
                    run_spec = replace(run_spec, beta=round(matched_beta, 4) if matched_beta is not None
                                       else spec.constant_beta)
                run = load_run(_train_or_reuse(run_spec, log, f"[{exp_id}] seed {seed}: {name} {point or ''}",
                                               endpoint, out / STEP0_DIR if spec.share_step0 else None,
                                               shared_reference))
                row = {"method": name, "seed": seed, "beta": run_spec.beta if fixed_beta else math.nan,
                       **{f"sweep_{k}": v for k, v in point.items()},
                       **run_summary(run, (base.beta_min + base.beta_max) / 2)}
                if _sets_matched_beta(name) and matched_beta is None:  # a KL weight (token-wise
                    # methods' beta is the level that scales their schedule, not a KL weight)
                    matched_beta = row["mean_beta"]
                rows.append(row)
                done.update(runs=[r["run_id"] for r in rows], minutes=(time.time() - t0) / 60)
                results = pd.DataFrame(rows)
                write_parquet(out / "results.parquet", results)  # after every run: a killed experiment keeps its rows
                write_text(out / "results.md", markdown_table(results, spec.methods))
    if spec.sweep or len(set(spec.methods)) > 1:
        save_frontier(pd.DataFrame(rows), out, log)
    done.update(runs=[r["run_id"] for r in rows], minutes=(time.time() - t0) / 60)


def _sets_matched_beta(name: str) -> bool:
    """Whether a variant's mean beta is what a fixed-beta method is matched to: its beta follows the risk and is a
    KL weight (adaptive; not adaptive-token-wise, whose beta scales a schedule)."""
    method = method_named(METHODS[name].method)
    return method.risk and method.kl_weight


def _train_or_reuse(run_spec: RunSpec, log, what: str, endpoint: JudgeEndpoint | None = None,
                    shared_step0: Path | None = None, shared_reference: SharedReference | None = None) -> Path:
    """A finished run of this id is kept; an interrupted one continues from its last complete checkpoint, or is
    moved aside (``.partial-<id>-<time>``, nothing deleted) and run again. A run directory whose config.json
    asks for other options than the experiment's is refused, never trained or kept (it may be planted)."""
    run_dir = Path(run_spec.runs_dir) / run_spec.run_id
    if run_dir.exists() or run_dir.is_symlink():
        differs = config_differences(run_dir, run_spec)
        if differs:
            raise SpecError(f"{run_dir} exists with other options than this experiment's run ({differs}); move it "
                            "away or give the experiment another id")
        state = run_state(run_dir).get("state")
        if state == "finished":
            log(f"{what}: finished before, kept ({run_dir})")
            return run_dir
        if state == "running":  # alive: never moved aside under a live process
            raise SpecError(f"{run_dir} is still running: wait for it or cancel it before resuming the experiment")
        if latest_checkpoint(run_dir) is not None:
            log(f"{what}: {state}, continued from its last checkpoint")
            return run_training(resume=run_dir, progress=False, log=log, endpoint=endpoint,
                                shared_reference=shared_reference)
        aside = run_dir.with_name(f".partial-{run_dir.name}-{int(time.time())}")
        log(f"{what}: {state} without a checkpoint; moved aside to {aside} and run again")
        run_dir.rename(aside)
    log(f"{what} ...")
    return run_training(run_spec, progress=False, log=log, endpoint=endpoint, shared_step0=shared_step0,
                        shared_reference=shared_reference)


def config_differences(run_dir: Path, run_spec: RunSpec) -> str:
    """The options in which a run directory's config.json differs from ``run_spec`` ('' when none)."""
    try:
        config = read_json(run_dir / "config.json")
        theirs = asdict(RunSpec.from_dict({k: v for k, v in config.items() if k not in ("runs_dir", "run_id")}))
    except (TraceError, SpecError, TypeError) as err:
        return f"its config.json is not readable: {err}"
    ours = asdict(run_spec)
    diff = [k for k in ours if k not in ("runs_dir", "run_id") and theirs.get(k) != ours[k]]
    return ", ".join(f"{k} {theirs.get(k)!r} instead of {ours[k]!r}" for k in diff[:5])


def resume_experiment(out_dir: str | Path, experiment_id: str, runs_dir: str | Path, log=print,
                      endpoint: JudgeEndpoint | None = None) -> Path:
    """Continue an experiment with the options its ``experiment.json`` recorded, checked again as any options
    are. Where it writes (``out_dir``, ``runs_dir``) and the judge endpoint come from the caller (the command
    line), never from the file; a ``runs_dir`` other than the recorded one is refused (its runs are elsewhere)."""
    if not isinstance(experiment_id, str) or not RUN_ID.match(experiment_id):
        raise SpecError(f"experiment id {experiment_id!r} is not allowed: use letters, digits, '.', '_' and '-'")
    path = Path(out_dir) / experiment_id
    desc = read_json(path / "experiment.json")
    if process.held(path / process.LOCK_NAME):
        raise SpecError(f"experiment {path} is still running; wait or cancel it first")
    known = {f for f in ExperimentSpec.__dataclass_fields__} - {"out_dir", "runs_dir", "experiment_id"}
    try:
        spec = ExperimentSpec(**{k: v for k, v in desc.items() if k in known})
    except TypeError as err:
        raise SpecError(f"{path / 'experiment.json'} is not an experiment's description ({err})") from None
    recorded = desc.get("runs_dir")
    if isinstance(recorded, str) and Path(recorded).resolve() != Path(runs_dir).resolve():
        raise SpecError(f"experiment {path} recorded its runs under {recorded}, not {runs_dir}: give --runs-dir "
                        f"{recorded} to continue it there")
    spec.experiment_id, spec.out_dir, spec.runs_dir = experiment_id, str(out_dir), str(runs_dir)
    return run_experiment(spec, log=log, resume=True, endpoint=endpoint, recorded=desc)


def summarise_again(out: Path, runs_dir: Path) -> pd.DataFrame:
    """Rewrite an experiment's ``results.parquet`` / ``results.md`` (and frontier) from its runs' traces as they are
    now (after a re-judge, or for columns added since it was recorded: intervals), keeping each row's method, seed
    and sweep point. A run that cannot be read stops it before anything is written."""
    desc, old = load_experiment(out)
    spec_cols = [c for c in old.columns if c in ("method", "seed", "beta") or c.startswith("sweep_")]
    base = desc.get("base") if isinstance(desc.get("base"), dict) else {}  # the runs' recorded common options
    try:
        beta_mid = (float(base.get("beta_min", RunSpec.beta_min)) + float(base.get("beta_max", RunSpec.beta_max))) / 2
    except (TypeError, ValueError):
        raise TraceError(f"{out / 'experiment.json'}: base beta_min / beta_max are not numbers") from None
    rows = [{**{c: r[c] for c in spec_cols}, **run_summary(load_run(safe_run_path(runs_dir, str(r["run_id"]))),
                                                           beta_mid)} for r in old.to_dict("records")]
    results = pd.DataFrame(rows)
    write_parquet(out / "results.parquet", results)
    write_text(out / "results.md", markdown_table(results, list(dict.fromkeys(results["method"]))))
    if (out / "frontier.html").exists():
        save_frontier(results, out, log=lambda *a: None)
    return results


def load_experiment(path: Path) -> tuple[dict, pd.DataFrame]:
    """An experiment directory's description and results table."""
    path = Path(path)
    desc = read_json(path / "experiment.json")
    if desc.get("state") == "running" and not process.elsewhere(desc) and not process.held(path / process.LOCK_NAME):
        desc = {**desc, "state": "interrupted", "error": desc.get("error") or "its process is gone"}
    return desc, read_table(path / "results.parquet")


def list_experiments(root: Path) -> list[Path]:
    root = Path(root)
    return sorted(p for p in root.iterdir() if (p / "experiment.json").is_file()) if root.is_dir() else []

