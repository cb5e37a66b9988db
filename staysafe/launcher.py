"""Background launches of ``staysafe train`` and ``staysafe experiment``, one at a time, from a queue on disk.

Training must not run inside the dashboard's process (a rerun or a closed tab would kill it), and two trainings on
a small CPU only slow each other down. So a launch writes a JSON job file under ``<runs_root>/.queue/`` and a small
queue-runner process (``python -m staysafe.launcher run-queue <runs_root>``, started in its own session when none is
alive) starts the queued jobs one by one and exits when the queue is empty: the queue advances with the browser
closed. Commands are argument lists (``sys.executable -m staysafe.cli ...``), never shell strings.

Files in ``<runs_root>/.queue/``: ``<job_id>.json`` (the job; written atomically), ``<job_id>.log`` (its output),
``runner.json`` (the live runner's pid), ``paused`` (present while the queue is paused: queued jobs wait, a
running one finishes), ``runner.log`` and ``.lock`` (a ``flock`` that serialises every change of state, so a
cancel and a start never race).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from staysafe.errors import StaySafeError
from staysafe.traces import RUN_ID, TraceError, _pid_alive, new_run_id, read_json, safe_run_path, write_json

QUEUE_DIR = ".queue"
JOB_STATES = ("queued", "running", "finished", "failed", "cancelled", "interrupted")
ACTIVE = ("queued", "running")
JOB_ID = re.compile(r"^[0-9]{13}-(train|experiment)-[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PARALLEL_ENV = "STAYSAFE_QUEUE_PARALLEL"


class LaunchError(StaySafeError, RuntimeError):
    """A launch or cancel cannot be done (id taken, unknown job, job already over); the message says why."""


# ----------------------------------------------------------------------------------------------- commands


def spec_arguments(spec: RunSpec) -> list[str]:
    """Every RunSpec field as a ``staysafe train`` flag (the inverse of ``cli.spec_from_args``).

    All fields are passed, not only non-defaults, so the command in ``config.json`` reruns the run even after a
    default changes. ``runs_dir`` and ``run_id`` are left to the caller.
    """
    from staysafe.options import spec_flags

    return spec_flags(spec)


def train_argv(spec: RunSpec, run_id: str, runs_root: Path) -> list[str]:
    """The argument list that trains ``spec`` as run ``run_id`` under ``runs_root``."""
    return [sys.executable, "-m", "staysafe.cli", "train", *spec_arguments(spec), "--run-id", run_id,
            "--runs-dir", str(Path(runs_root).resolve())]


def experiment_argv(experiment_id: str, runs_root: Path, experiments_root: Path, *, scenario: str = "harmful",
                    methods: list[str] | None = None, seeds: int = 1, quick: bool = True, model: str | None = None,
                    steps: int | None = None) -> list[str]:
    """The argument list of ``staysafe experiment`` (only what its CLI exposes)."""
    from staysafe.experiment import ExperimentSpec
    from staysafe.runner import SpecError

    exp = ExperimentSpec(scenario=scenario, seeds=seeds, quick=quick, steps=steps,
                         **({"methods": list(methods)} if methods else {}), **({"model": model} if model else {}))
    try:
        exp.validate()
    except ValueError as err:
        raise SpecError(str(err)) from None
    argv = [sys.executable, "-m", "staysafe.cli", "experiment", "--scenario", exp.scenario,
            "--methods", ",".join(exp.methods), "--seeds", str(exp.seeds), "--model", exp.model,
            "--out-dir", str(Path(experiments_root).resolve()), "--runs-dir", str(Path(runs_root).resolve()),
            "--id", experiment_id]
    if exp.quick:
        argv.append("--quick")
    if exp.steps:
        argv += ["--steps", str(exp.steps)]
    return argv


# ----------------------------------------------------------------------------------------------- processes


def _cmdline(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return None


def _process_matches(pid, marker: str) -> bool:
    """Alive and (where /proc exists) really the process we started: a reused pid is not ours."""
    if not isinstance(pid, int) or pid <= 0 or not _pid_alive(pid):
        return False
    cmd = _cmdline(pid)
    return cmd is None or marker.encode() in cmd


RUNNER_MARKER = "staysafe.launcher"


def _parallel() -> int:
    try:
        return max(1, int(os.environ.get(PARALLEL_ENV, "1")))
    except ValueError:
        return 1


# ----------------------------------------------------------------------------------------------- the queue


class Queue:
    """The job queue of one runs root. Every change of a job's state happens under one file lock."""

    def __init__(self, runs_root: Path):
        self.root = Path(runs_root).resolve()
        self.dir = self.root / QUEUE_DIR

    # -- files

    @contextlib.contextmanager
    def lock(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def job_path(self, job_id: str) -> Path:
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            raise LaunchError(f"job id {job_id!r} is not a valid job id")
        return self.dir / f"{job_id}.json"

    def log_path(self, job_id: str) -> Path:
        return self.job_path(job_id).with_suffix(".log")

    def _write(self, job: dict) -> None:
        write_json(self.job_path(job["id"]), job)

    def _read(self, job_id: str) -> dict:
        return read_json(self.job_path(job_id))

    def jobs(self, raw: bool = False) -> list[dict]:
        """Every job, oldest first; a job file that cannot be read is listed with state ``corrupt`` and the error.

        Unless ``raw``, a ``running`` job whose process is gone while no runner is alive reads as ``interrupted``
        (as ``run_state`` does for runs), so a crashed runner never leaves a job "running" forever.
        """
        out = []
        runner = None if raw else self.runner_pid()
        if not self.dir.is_dir():
            return out
        for p in sorted(self.dir.glob("*.json")):
            if not JOB_ID.match(p.stem):
                continue
            try:
                job = read_json(p)
            except TraceError as err:
                job = {"id": p.stem, "state": "corrupt", "error": str(err)}
            if (not raw and job.get("state") == "running" and runner is None
                    and not _process_matches(job.get("pid"), job.get("target", ""))):
                job = {**job, "state": "interrupted", "error": job.get("error") or "its process is gone"}
            out.append(job)
        return out

    def get(self, job_id: str) -> dict:
        try:
            return self._read(job_id)
        except TraceError:
            raise LaunchError(f"no job {job_id!r} in {self.dir}") from None

    def log_tail(self, job_id: str, max_bytes: int = 4000) -> str:
        path = self.log_path(job_id)
        try:
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - max_bytes))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    # -- submitting

    def _taken(self, target: str) -> bool:
        return any(j.get("target") == target and j.get("state") in ACTIVE for j in self.jobs(raw=True))

    def _new_job(self, kind: str, target: str, argv: list[str], **extra) -> dict:
        job_id = f"{time.time_ns() // 1_000_000:013d}-{kind}-{target}"
        while self.job_path(job_id).exists():  # two submits in one millisecond
            time.sleep(0.002)
            job_id = f"{time.time_ns() // 1_000_000:013d}-{kind}-{target}"
        return {"id": job_id, "kind": kind, "target": target, "argv": argv, "cwd": os.getcwd(), "state": "queued",
                "created": time.time(), "pid": None, "started": None, "ended": None, "returncode": None,
                "cancel_requested": False, "error": None, "log": f"{job_id}.log", **extra}

    def _enqueue(self, job: dict, start_runner: bool) -> dict:
        assert isinstance(job["argv"], list) and all(isinstance(a, str) for a in job["argv"])
        with self.lock():
            if self._taken(job["target"]):
                raise LaunchError(f"{job['target']!r} is already queued or running")
            self._write(job)
            if start_runner and not self.paused:
                self._ensure_runner_locked()
        return job

    # -- pausing

    @property
    def paused(self) -> bool:
        return (self.dir / "paused").exists()

    def pause(self) -> None:
        """Queued jobs wait (a running job finishes); e.g. to keep the CPU free during a talk."""
        with self.lock():
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "paused").write_text(f"{time.time()}\n")

    def resume(self) -> None:
        with self.lock():
            (self.dir / "paused").unlink(missing_ok=True)
            if any(j.get("state") == "queued" for j in self.jobs(raw=True)):
                self._ensure_runner_locked()

    def submit_train(self, spec: RunSpec, run_id: str | None = None, start_runner: bool = True) -> dict:
        """Validate ``spec`` and queue it as run ``run_id`` (a fresh id when None). Raises SpecError or LaunchError."""
        from staysafe.runner import SpecError

        spec = dataclasses.replace(spec, runs_dir=str(self.root), run_id=None)
        if spec.data:
            spec = dataclasses.replace(spec, scenario=None)
            path = Path(spec.data).expanduser()
            if path.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet") or spec.data.startswith((".", "/", "~")):
                if not path.is_file():
                    raise SpecError(f"option data = {spec.data!r} is invalid: the file {path} does not exist")
                spec = dataclasses.replace(spec, data=str(path.resolve()))
        spec.validate()
        run_id = run_id or new_run_id(f"{spec.method}-{spec.risk}" if spec.method == "adaptive" else spec.method)
        if not RUN_ID.match(run_id):
            raise LaunchError(f"run id {run_id!r} is not allowed: use letters, digits, '.', '_' and '-' (max 128)")
        try:
            target = safe_run_path(self.root, run_id)
        except TraceError as err:
            raise LaunchError(str(err)) from None
        if target.exists():
            raise LaunchError(f"run directory {target} already exists; choose another run id")
        job = self._new_job("train", run_id, train_argv(spec, run_id, self.root), run_id=run_id,
                            spec=dataclasses.asdict(spec))
        return self._enqueue(job, start_runner)

    def submit_experiment(self, experiments_root: Path, experiment_id: str | None = None, start_runner: bool = True,
                          **options) -> dict:
        """Queue ``staysafe experiment`` (``options``: scenario, methods, seeds, quick, model, steps)."""
        scenario = options.get("scenario", "harmful")
        experiment_id = experiment_id or new_run_id(f"exp-{scenario}")
        if not RUN_ID.match(experiment_id):
            raise LaunchError(f"experiment id {experiment_id!r} is not allowed: use letters, digits, '.', '_' and '-'")
        target = Path(experiments_root).resolve() / experiment_id
        if target.exists():
            raise LaunchError(f"experiment directory {target} already exists; choose another id")
        argv = experiment_argv(experiment_id, self.root, experiments_root, **options)
        job = self._new_job("experiment", experiment_id, argv, experiment_id=experiment_id,
                            experiments_root=str(Path(experiments_root).resolve()), options=options)
        return self._enqueue(job, start_runner)

    # -- cancelling

    def cancel(self, job_id: str) -> str:
        """A queued job is removed (returns ``removed``); a running one gets SIGTERM (returns ``terminating``)."""
        with self.lock():
            job = self.get(job_id)
            if job["state"] == "queued":
                self.job_path(job_id).unlink(missing_ok=True)
                self.log_path(job_id).unlink(missing_ok=True)
                return "removed"
            if job["state"] != "running":
                raise LaunchError(f"job {job_id} is already {job['state']}")
            job["cancel_requested"] = True
            if not _process_matches(job.get("pid"), job["target"]):  # its process is already gone
                self._write({**job, "state": "cancelled", "ended": time.time()})
                return "cancelled"
            self._write(job)
            os.kill(job["pid"], signal.SIGTERM)
            return "terminating"

    # -- the runner

    def runner_pid(self) -> int | None:
        """The live queue-runner's pid, or None."""
        try:
            pid = read_json(self.dir / "runner.json").get("pid")
        except TraceError:
            return None
        return pid if _process_matches(pid, RUNNER_MARKER) else None

    def ensure_runner(self) -> int:
        with self.lock():
            return self._ensure_runner_locked()

    def _ensure_runner_locked(self) -> int:
        pid = self.runner_pid()
        if pid is not None:
            return pid
        with open(self.dir / "runner.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "staysafe.launcher", "run-queue", str(self.root)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        write_json(self.dir / "runner.json", {"pid": proc.pid, "started": time.time()})
        return proc.pid

    def _register(self) -> bool:
        with self.lock():
            pid = self.runner_pid()
            if pid is not None and pid != os.getpid():
                return False
            write_json(self.dir / "runner.json", {"pid": os.getpid(), "started": time.time()})
            return True

    def _finish(self, job_id: str, state: str, returncode=None) -> None:
        with self.lock():
            try:
                job = self._read(job_id)
            except TraceError:
                return
            if job.get("cancel_requested") and state != "finished":
                state = "cancelled"
            error = None
            if state in ("failed", "interrupted"):
                lines = [l for l in self.log_tail(job_id, 2000).splitlines() if l.strip()]
                error = lines[-1][:500] if lines else f"exit code {returncode}"
            self._write({**job, "state": state, "ended": time.time(), "returncode": returncode, "error": error})

    def run(self, poll: float = 0.5) -> int:
        """The queue-runner loop: start queued jobs (``$STAYSAFE_QUEUE_PARALLEL`` at a time, default 1)."""
        if not self._register():
            return 0
        parallel = _parallel()
        procs: dict[str, subprocess.Popen] = {}
        adopted: dict[str, dict] = {}  # running jobs of a runner that died: wait for them, never start them twice
        stopping = []

        def stop(signum, frame):  # no locking here: the main loop may hold the lock
            stopping.append(signum)
            for p in procs.values():
                with contextlib.suppress(OSError):
                    p.terminate()

        signal.signal(signal.SIGTERM, stop)
        for job in self.jobs(raw=True):
            if job.get("state") == "running":
                if _process_matches(job.get("pid"), job.get("target", "")):
                    adopted[job["id"]] = job
                else:
                    self._finish(job["id"], "interrupted")
        while True:
            if stopping:
                for jid, p in procs.items():
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(timeout=60)
                    self._finish(jid, "cancelled", p.returncode)
                self._deregister()
                return 0
            for jid, p in list(procs.items()):
                rc = p.poll()
                if rc is not None:
                    self._finish(jid, "finished" if rc == 0 else "failed", rc)
                    del procs[jid]
            for jid, job in list(adopted.items()):
                if not _process_matches(job.get("pid"), job["target"]):
                    self._finish(jid, self._adopted_outcome(job))
                    del adopted[jid]
            with self.lock():
                queued = [] if self.paused else [j for j in self.jobs(raw=True) if j.get("state") == "queued"]
                if not queued and not procs and not adopted:
                    (self.dir / "runner.json").unlink(missing_ok=True)
                    return 0
                while queued and len(procs) + len(adopted) < parallel and not stopping:
                    job = queued.pop(0)
                    procs[job["id"]] = self._start(job)
            time.sleep(poll)

    def _start(self, job: dict) -> subprocess.Popen:
        """Start one job (called under the lock): output to its log, state ``running`` with the pid."""
        with open(self.log_path(job["id"]), "ab") as log:
            cwd = job.get("cwd") if job.get("cwd") and Path(job["cwd"]).is_dir() else str(self.root)
            proc = subprocess.Popen(job["argv"], cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._write({**job, "state": "running", "pid": proc.pid, "started": time.time()})
        return proc

    def _adopted_outcome(self, job: dict) -> str:
        if job["kind"] != "train":
            return "interrupted"
        from staysafe.traces import run_state

        try:
            state = run_state(self.root / job["target"]).get("state")
        except TraceError:
            return "interrupted"
        return {"finished": "finished", "cancelled": "cancelled", "failed": "failed"}.get(state, "interrupted")

    def _deregister(self) -> None:
        with self.lock():
            with contextlib.suppress(TraceError):
                if read_json(self.dir / "runner.json").get("pid") == os.getpid():
                    (self.dir / "runner.json").unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- shortcuts


def submit_train(runs_root: Path, spec: RunSpec, run_id: str | None = None) -> dict:
    return Queue(runs_root).submit_train(spec, run_id)


def submit_experiment(runs_root: Path, experiments_root: Path, experiment_id: str | None = None, **options) -> dict:
    return Queue(runs_root).submit_experiment(experiments_root, experiment_id, **options)


def list_jobs(runs_root: Path) -> list[dict]:
    return Queue(runs_root).jobs()


def cancel(runs_root: Path, job_id: str) -> str:
    return Queue(runs_root).cancel(job_id)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m staysafe.launcher", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run-queue", help="start the queued jobs of a runs root one by one; exit when none is left")
    r.add_argument("runs_root")
    r.add_argument("--poll", type=float, default=0.5)
    j = sub.add_parser("jobs", help="list the jobs of a runs root")
    j.add_argument("runs_root")
    c = sub.add_parser("cancel", help="remove a queued job or stop a running one")
    c.add_argument("runs_root")
    c.add_argument("job_id")
    for name, text in (("pause", "queued jobs wait (a running job finishes)"), ("resume", "start queued jobs again")):
        sub.add_parser(name, help=text).add_argument("runs_root")
    args = p.parse_args(argv)
    if args.command == "run-queue":
        return Queue(Path(args.runs_root)).run(poll=args.poll)
    if args.command in ("pause", "resume"):
        getattr(Queue(Path(args.runs_root)), args.command)()
        return 0
    if args.command == "jobs":
        for job in list_jobs(Path(args.runs_root)):
            print(f"{job['id']:60} {job.get('state', '?'):12} {job.get('error') or ''}")
        return 0
    try:
        print(cancel(Path(args.runs_root), args.job_id))
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
