"""Submitting jobs, and the one way a job becomes a command.

A job records *what* to run (a ``staysafe train`` RunSpec or the options of ``staysafe experiment``), never *how*:
:func:`command` validates that spec again and rebuilds the argument list (``sys.executable -m staysafe.cli ...``,
never a shell string), so a job file written by anyone else can only ask for a StaySafe run with known options.
A queued job cannot carry a judge endpoint or key variable: those are not run options at all (see
:mod:`staysafe.judges.endpoint`), so a queued run that would need the openai judge is refused. A job cannot choose where
its output goes either: runs go to the queue's runs root and experiments to the experiments root that the queue
was started with.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from staysafe.judges.endpoint import endpoint_for
from staysafe.methods import variant_of
from staysafe.options import ExperimentSpec
from staysafe.queue.store import ACTIVE, JobStore, LaunchError
from staysafe.runs.traces import RUN_ID, TraceError, new_run_id, safe_run_path

EXPERIMENT_OPTIONS = tuple(f.name for f in dataclasses.fields(ExperimentSpec) if "help" in f.metadata
                           and f.name not in ("out_dir", "runs_dir", "experiment_id"))  # where output goes: not a job's


def train_argv(spec, run_id: str, runs_root: Path) -> list[str]:
    """The argument list that trains ``spec`` as run ``run_id`` under ``runs_root``."""
    from staysafe.options import spec_flags

    return [sys.executable, "-m", "staysafe.cli", "train", *spec_flags(spec), "--run-id", run_id,
            "--runs-dir", str(Path(runs_root).resolve())]


def experiment_argv(experiment_id: str, runs_root: Path, experiments_root: Path, **options) -> list[str]:
    """The argument list of ``staysafe experiment`` for ``options`` (fields of ExperimentSpec, checked as every
    experiment's options are, then written back as flags by the same schema)."""
    from staysafe.options import SpecError, spec_flags

    unknown = sorted(set(options) - set(EXPERIMENT_OPTIONS))
    if unknown:
        raise SpecError(f"experiment option(s) {', '.join(map(str, unknown))} cannot be queued; known: "
                        f"{', '.join(EXPERIMENT_OPTIONS)}")
    if options.get("preset") is not None:
        options = {**options, "quick": False}  # a named preset replaces the quick one
    exp = ExperimentSpec(**options, experiment_id=experiment_id, out_dir=str(Path(experiments_root).resolve()),
                         runs_dir=str(Path(runs_root).resolve())).validate()
    return [sys.executable, "-m", "staysafe.cli", "experiment", *spec_flags(exp, skip=())]


def train_spec(values, runs_root: Path):
    """A RunSpec from a job's stored spec: only known fields, no judge endpoint or key, every option valid."""
    from staysafe.options import RunSpec, SpecError

    if not isinstance(values, dict):
        raise SpecError(f"the job's spec is a {type(values).__name__}, expected an object of run options")
    known = {f.name for f in dataclasses.fields(RunSpec)} - {"runs_dir", "run_id"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SpecError(f"the job's spec has unknown option(s) {', '.join(map(str, unknown))}")
    try:
        spec = RunSpec(**values, runs_dir=str(runs_root))
    except TypeError as err:
        raise SpecError(f"the job's spec is invalid ({err})") from None
    spec.validate()
    endpoint_for(spec, None, None, "a queued run")  # it needs an endpoint: refused, as no file may give one
    return spec


def command(job: dict, runs_root: Path, experiments_root: Path | None = None) -> list[str]:
    """The argument list of a job, rebuilt from its validated spec (never from anything else in the file). An
    experiment goes to ``experiments_root``, the queue's own; a job naming another is refused."""
    from staysafe.options import SpecError

    if not isinstance(job.get("target"), str) or not RUN_ID.match(job["target"]):
        raise SpecError(f"job target {job.get('target')!r} is not a valid id")
    if job["kind"] == "train":
        spec = train_spec(job.get("spec"), runs_root)
        return train_argv(spec, job["target"], runs_root)
    options = job.get("options")
    if not isinstance(options, dict) or set(options) - set(EXPERIMENT_OPTIONS):
        raise SpecError(f"the job's experiment options must be an object with keys among {EXPERIMENT_OPTIONS}")
    exps = Path(experiments_root or JobStore(runs_root).experiments).resolve()
    if job.get("experiments_root") not in (None, str(exps)):
        raise SpecError(f"the job's experiments_root {job.get('experiments_root')!r} is not this queue's "
                        f"experiments root {exps}: a job never chooses where its output goes")
    return experiment_argv(job["target"], runs_root, exps, **options)


def _new_job(store: JobStore, kind: str, target: str, **extra) -> dict:
    job_id = f"{time.time_ns() // 1_000_000:013d}-{kind}-{target}"
    while store.job_path(job_id).exists():  # two submits in one millisecond
        time.sleep(0.002)
        job_id = f"{time.time_ns() // 1_000_000:013d}-{kind}-{target}"
    return {"id": job_id, "kind": kind, "target": target, "state": "queued", "created": time.time(),
            "process": None, "started": None, "ended": None, "returncode": None, "cancel_requested": False,
            "error": None, "log": f"{job_id}.log", **extra}


def _enqueue(store: JobStore, job: dict, start_worker: bool) -> dict:
    command(job, store.root, store.experiments)  # exactly what the worker will check
    with store.lock():
        if any(j["target"] == job["target"] and j["state"] in ACTIVE for j in store.jobs(raw=True)):
            raise LaunchError(f"{job['target']!r} is already queued or running")
        store.write(job)
        if start_worker and not store.paused:
            store._ensure_worker_locked()
    return job


def submit_train(store: JobStore, spec, run_id: str | None = None, start_worker: bool = True) -> dict:
    """Validate ``spec`` and queue it as run ``run_id`` (a fresh id when None). Raises SpecError or LaunchError."""
    from staysafe.options import SpecError

    spec = dataclasses.replace(spec, runs_dir=str(store.root), run_id=None)
    if spec.data:
        spec = dataclasses.replace(spec, scenario=None)
        path = Path(spec.data).expanduser()
        if path.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet") or spec.data.startswith((".", "/", "~")):
            if not path.is_file():
                raise SpecError(f"option data = {spec.data!r} is invalid: the file {path} does not exist")
            spec = dataclasses.replace(spec, data=str(path.resolve()))
    spec.validate()
    variant = variant_of(dataclasses.asdict(spec))
    run_id = run_id or new_run_id(variant.name if variant else spec.method)
    if not RUN_ID.match(run_id):
        raise LaunchError(f"run id {run_id!r} is not allowed: use letters, digits, '.', '_' and '-' (max 128)")
    try:
        target = safe_run_path(store.root, run_id)
    except TraceError as err:
        raise LaunchError(str(err)) from None
    if target.exists():
        raise LaunchError(f"run directory {target} already exists; choose another run id")
    values = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("runs_dir", "run_id")}
    job = _new_job(store, "train", run_id, run_id=run_id, spec=values)
    return _enqueue(store, job, start_worker)


def submit_experiment(store: JobStore, experiment_id: str | None = None, start_worker: bool = True,
                      **options) -> dict:
    """Queue ``staysafe experiment`` (``options``: scenario, methods, seeds, quick, model, steps) into the queue's
    experiments root."""
    unknown = sorted(set(options) - set(EXPERIMENT_OPTIONS))
    if unknown:
        raise LaunchError(f"unknown experiment option(s) {', '.join(unknown)}")
    scenario = options.get("scenario", "harmful")
    experiment_id = experiment_id or new_run_id(f"exp-{scenario}")
    if not isinstance(experiment_id, str) or not RUN_ID.match(experiment_id):
        raise LaunchError(f"experiment id {experiment_id!r} is not allowed: use letters, digits, '.', '_' and '-'")
    target = store.experiments / experiment_id
    if target.exists():
        raise LaunchError(f"experiment directory {target} already exists; choose another id")
    job = _new_job(store, "experiment", experiment_id, experiment_id=experiment_id,
                   experiments_root=str(store.experiments), options=options)
    return _enqueue(store, job, start_worker)
