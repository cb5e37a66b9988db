"""The job store of one runs root: job files under ``<runs_root>/.queue/``, one lock for every change of state.

Files: ``<job_id>.json`` (a job; written atomically), ``<job_id>.log`` (its output), ``worker.json`` (the live
worker's process identity), ``paused`` (present while the queue is paused: queued jobs wait, a running one
finishes), ``worker.log`` and ``.lock`` (a ``flock`` that serialises every change, so a cancel and a start never
race). A job file is data, never a command: the worker rebuilds the command from the job's validated spec
(:mod:`staysafe.queue.submit`), and a cancel signals only a process whose recorded identity (pid, start time, boot)
still matches, so a job file written by someone else cannot make StaySafe run or kill anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from staysafe import process
from staysafe.atomic import write_json, write_text
from staysafe.errors import StaySafeError
from staysafe.traces import TraceError, read_json

QUEUE_DIR = ".queue"
JOB_STATES = ("queued", "running", "finished", "failed", "cancelled", "interrupted")
ACTIVE = ("queued", "running")
KINDS = ("train", "experiment")
JOB_ID = re.compile(r"^[0-9]{13}-(train|experiment)-[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class LaunchError(StaySafeError, RuntimeError):
    """A launch or cancel cannot be done (id taken, unknown job, job already over); the message says why."""


def job_problem(job, job_id: str) -> str | None:
    """Why a parsed job file is not a job (wrong shape), or None."""
    if not isinstance(job, dict):
        return f"holds a JSON {type(job).__name__}, expected a job object"
    if job.get("id") != job_id:
        return f"its id {job.get('id')!r} is not its file name"
    if job.get("kind") not in KINDS or not job_id.split("-", 2)[1] == job.get("kind"):
        return f"kind {job.get('kind')!r} is not one of {KINDS} or differs from its id"
    if not isinstance(job.get("target"), str) or not job_id.endswith("-" + job["target"]):
        return f"target {job.get('target')!r} differs from its id"
    if job.get("state") not in JOB_STATES:
        return f"state {job.get('state')!r} is not one of {JOB_STATES}"
    return None


class JobStore:
    """Job files of one runs root and the liveness of their processes."""

    def __init__(self, runs_root: Path):
        self.root = Path(runs_root).resolve()
        self.dir = self.root / QUEUE_DIR

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

    def write(self, job: dict) -> None:
        write_json(self.job_path(job["id"]), job)

    def read(self, job_id: str) -> dict:
        """A job; TraceError when its file is missing, not JSON or not a job."""
        path = self.job_path(job_id)
        job = read_json(path)
        problem = job_problem(job, job_id)
        if problem:
            raise TraceError(f"{path}: {problem}")
        return job

    def jobs(self, raw: bool = False) -> list[dict]:
        """Every job, oldest first; a job file that cannot be read is listed with state ``corrupt`` and the error.

        Unless ``raw``, a ``running`` job whose process is gone while no worker is alive reads as ``interrupted``
        (as ``run_state`` does for runs), so a crashed worker never leaves a job "running" forever.
        """
        reap_workers()
        out = []
        if not self.dir.is_dir():
            return out
        worker = None if raw else self.worker_pid()
        for p in sorted(self.dir.glob("*.json")):
            if not JOB_ID.match(p.stem):
                continue
            try:
                job = self.read(p.stem)
            except TraceError as err:
                job = {"id": p.stem, "kind": p.stem.split("-", 2)[1], "target": p.stem.split("-", 2)[2],
                       "state": "corrupt", "error": str(err)}
            if (not raw and job["state"] == "running" and worker is None
                    and process.alive(job.get("process") or {}) is not True):
                job = {**job, "state": "interrupted", "error": job.get("error") or "its process is gone"}
            out.append(job)
        return out

    def get(self, job_id: str) -> dict:
        try:
            return self.read(job_id)
        except TraceError as err:
            raise LaunchError(f"no readable job {job_id!r} in {self.dir} ({err})") from None

    def log_tail(self, job_id: str, max_bytes: int = 4000) -> str:
        path = self.log_path(job_id)
        try:
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - max_bytes))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    # -- pausing

    @property
    def paused(self) -> bool:
        return (self.dir / "paused").exists()

    def pause(self) -> None:
        """Queued jobs wait (a running job finishes); e.g. to keep the CPU free during a talk."""
        with self.lock():
            write_text(self.dir / "paused", f"{time.time()}\n")

    def resume(self) -> None:
        with self.lock():
            (self.dir / "paused").unlink(missing_ok=True)
            if any(j["state"] == "queued" for j in self.jobs(raw=True)):
                self._ensure_worker_locked()

    # -- cancelling

    def cancel(self, job_id: str) -> str:
        """A queued job is removed (``removed``); a running one gets SIGTERM (``terminating``) if its recorded
        process is still the one the worker started, else it is marked ``cancelled`` at once."""
        with self.lock():
            job = self.get(job_id)
            if job["state"] == "queued":
                self.job_path(job_id).unlink(missing_ok=True)
                self.log_path(job_id).unlink(missing_ok=True)
                return "removed"
            if job["state"] != "running":
                raise LaunchError(f"job {job_id} is already {job['state']}")
            job["cancel_requested"] = True
            ident = job.get("process")
            if not isinstance(ident, dict) or ident.get("start") is None or process.alive(ident) is not True:
                self.write({**job, "state": "cancelled", "ended": time.time()})  # not a process we can identify
                return "cancelled"
            self.write(job)
            os.kill(ident["pid"], signal.SIGTERM)
            return "terminating"

    # -- the worker process

    def worker_pid(self) -> int | None:
        """The live queue worker's pid, or None."""
        try:
            ident = read_json(self.dir / "worker.json")
        except TraceError:
            return None
        return ident.get("pid") if process.alive(ident) is True and ident.get("start") is not None else None

    def ensure_worker(self) -> int:
        with self.lock():
            return self._ensure_worker_locked()

    def _ensure_worker_locked(self) -> int:
        pid = self.worker_pid()
        if pid is not None:
            return pid
        with open(self.dir / "worker.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "staysafe.cli", "queue", "work", "--runs-dir", str(self.root)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _STARTED.append(proc)
        reap_workers()
        write_json(self.dir / "worker.json", process.identity(proc.pid))
        return proc.pid


_STARTED: list[subprocess.Popen] = []  # workers this process started: waited for so none stays a zombie


def reap_workers() -> None:
    """Collect the exit status of finished workers this process started (a long-lived dashboard would otherwise
    keep one zombie per worker)."""
    for proc in list(_STARTED):
        if proc.poll() is not None:
            _STARTED.remove(proc)
