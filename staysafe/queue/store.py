"""The job store of one runs root: job files under ``<runs_root>/.queue/``, one lock for every change of state.

Files: ``<job_id>.json`` (a job; written atomically), ``<job_id>.log`` (its output), ``<job_id>.lock`` (held by
the job's process while it runs), ``worker.lock`` (held by the live worker), ``worker.json`` (the worker's identity,
for people to read), ``paused`` (present while the queue is paused: queued jobs wait, a running one finishes),
``worker.log`` and ``.lock`` (a ``flock`` that serialises every change, so a cancel and a start never race).

A job file is data, never a command: the worker rebuilds the command from the job's validated spec
(:mod:`staysafe.queue.submit`). Whether a job or the worker is alive is whether its lock is held
(:class:`staysafe.runs.process.LifeLock`), never what a file says; a cancel only asks (``cancel_requested``), and the
worker signals the one process it started itself for that job. No file in the queue is read or written through a
symbolic link. So a job file written by someone else cannot make StaySafe run, kill or stall anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from staysafe.errors import StaySafeError
from staysafe.options import ID
from staysafe.runs import process
from staysafe.runs.atomic import write_json, write_text
from staysafe.runs.files import open_append, open_regular, real_dir
from staysafe.runs.traces import TraceError, read_json

QUEUE_DIR = ".queue"
JOB_STATES = ("queued", "running", "finished", "failed", "cancelled", "interrupted")
ACTIVE = ("queued", "running")
KINDS = ("train", "experiment")
JOB_ID = re.compile(rf"^[0-9]{{13}}-(train|experiment)-{ID}\Z")
WORKER_LOCK = "worker.lock"


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

    def __init__(self, runs_root: Path, experiments_root: Path | None = None):
        self.root = Path(runs_root).resolve()
        self.dir = self.root / QUEUE_DIR
        # Where this queue's experiments go: said by whoever starts the queue (the dashboard's settings, the
        # command line, $STAYSAFE_EXPERIMENTS), never by a job file.
        self.experiments = Path(experiments_root or os.environ.get("STAYSAFE_EXPERIMENTS") or "experiments").resolve()

    @contextlib.contextmanager
    def lock(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        if not real_dir(self.dir):
            raise LaunchError(f"{self.dir} is not a directory (a link?); the queue does not work through links")
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def job_lock(self, job_id: str) -> Path:
        return self.job_path(job_id).with_suffix(".lock")

    def job_alive(self, job_id: str) -> bool:
        """A live process (the one the worker started for the job) holds the job's lock."""
        return process.held(self.job_lock(job_id))

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

        Unless ``raw``, a ``running`` job whose lock no live process holds, while no worker is alive, reads as
        ``interrupted`` (as ``run_state`` does for runs), so a crashed worker never leaves a job "running" forever.
        """
        reap_workers()
        out = []
        if not real_dir(self.dir):
            return out
        worker = self.worker_alive()  # a live worker finishes its own jobs' records
        for p in sorted(self.dir.glob("*.json")):
            if not JOB_ID.match(p.stem):
                continue
            try:
                job = self.read(p.stem)
            except TraceError as err:
                job = {"id": p.stem, "kind": p.stem.split("-", 2)[1], "target": p.stem.split("-", 2)[2],
                       "state": "corrupt", "error": str(err)}
            if not raw and job["state"] == "running" and not worker and not self.job_alive(job["id"]):
                job = {**job, "state": "interrupted", "error": job.get("error") or "its process is gone"}
            out.append(job)
        return out

    def get(self, job_id: str) -> dict:
        try:
            return self.read(job_id)
        except TraceError as err:
            raise LaunchError(f"no readable job {job_id!r} in {self.dir} ({err})") from None

    def log_tail(self, job_id: str, max_bytes: int = 4000) -> str:
        """The end of the job's own log (a link or anything but a regular file in its place shows nothing)."""
        try:
            with os.fdopen(open_regular(self.log_path(job_id)), "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - max_bytes))
                return f.read().decode(errors="replace")
        except (TraceError, OSError):
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
        """A queued job is marked ``cancelled`` (kept in the list). A running one is marked ``cancel_requested``:
        the worker that started it sends it SIGTERM (``cancelling``); when no live process holds the job's lock,
        it is marked ``cancelled`` at once. Nothing here signals a process: no pid from a file is trusted."""
        with self.lock():
            job = self.get(job_id)
            if job["state"] == "queued":
                self.write({**job, "state": "cancelled", "ended": time.time(), "error": "cancelled before it started"})
                return "cancelled"
            if job["state"] != "running":
                raise LaunchError(f"job {job_id} is already {job['state']}")
            if not self.job_alive(job_id):
                self.write({**job, "state": "cancelled", "cancel_requested": True, "ended": time.time()})
                return "cancelled"
            self.write({**job, "cancel_requested": True})
            return "cancelling"

    # -- the worker process

    def worker_alive(self) -> bool:
        return process.held(self.dir / WORKER_LOCK)

    def worker_pid(self) -> int | None:
        """The live queue worker's pid as it recorded it (for people to read), or None when no worker holds the
        worker lock."""
        if not self.worker_alive():
            return None
        try:
            pid = read_json(self.dir / "worker.json").get("pid")
        except TraceError:
            return -1
        return pid if isinstance(pid, int) and not isinstance(pid, bool) else -1

    def ensure_worker(self) -> int:
        with self.lock():
            return self._ensure_worker_locked()

    def _ensure_worker_locked(self) -> int:
        pid = self.worker_pid()
        if pid is not None:
            return pid
        with open_append(self.dir / "worker.log") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "staysafe.cli",
                    "queue",
                    "work",
                    "--runs-dir",
                    str(self.root),
                    "--experiments-dir",
                    str(self.experiments),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        _STARTED.append(proc)
        reap_workers()
        return proc.pid


_STARTED: list[subprocess.Popen] = []  # workers this process started: waited for so none stays a zombie


def reap_workers() -> None:
    """Collect the exit status of finished workers this process started (a long-lived dashboard would otherwise
    keep one zombie per worker)."""
    for proc in list(_STARTED):
        if proc.poll() is not None:
            _STARTED.remove(proc)
