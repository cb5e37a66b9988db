"""The queue worker: one background process per runs root that starts queued jobs one by one and exits when none
is left, so the queue advances with the browser closed (``staysafe queue work <runs_root>``, started by a submit).

Each job's command is rebuilt from its validated spec (:func:`staysafe.queue.submit.command`); a job that fails
that check, is not a readable job, or whose process cannot start is marked ``failed`` with the reason and the
queue moves on. The worker records every child's process identity, so a cancel can tell it from a reused pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

from staysafe import process
from staysafe.atomic import write_json
from staysafe.queue.store import JobStore
from staysafe.queue.submit import command
from staysafe.traces import TraceError, read_json

PARALLEL_ENV = "STAYSAFE_QUEUE_PARALLEL"


def _parallel() -> int:
    try:
        return max(1, int(os.environ.get(PARALLEL_ENV, "1")))
    except ValueError:
        return 1


def _finish(store: JobStore, job_id: str, state: str, returncode=None, error: str | None = None) -> None:
    with store.lock():
        try:
            job = store.read(job_id)
        except TraceError:
            return
        if job.get("cancel_requested") and state != "finished":
            state = "cancelled"
        if error is None and state in ("failed", "interrupted"):
            lines = [line for line in store.log_tail(job_id, 2000).splitlines() if line.strip()]
            error = lines[-1][:500] if lines else f"exit code {returncode}"
        store.write({**job, "state": state, "ended": time.time(), "returncode": returncode, "error": error})


def _start(store: JobStore, job: dict) -> subprocess.Popen | None:
    """Start one job (under the lock): output to its log, state ``running`` with the child's identity. A job whose
    spec is invalid or whose process cannot start is marked ``failed`` and None returned."""
    try:
        argv = command(job, store.root)
        with open(store.log_path(job["id"]), "ab") as log:
            proc = subprocess.Popen(argv, cwd=str(store.root), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except Exception as err:  # SpecError, OSError, a wrong-typed field: this job fails, the queue goes on
        store.write({**job, "state": "failed", "ended": time.time(),
                     "error": f"not started: {type(err).__name__}: {err}"[:500]})
        return None
    store.write({**job, "state": "running", "process": process.identity(proc.pid), "started": time.time()})
    return proc


def _adopted_outcome(store: JobStore, job: dict) -> str:
    if job["kind"] != "train":
        return "interrupted"
    from staysafe.traces import run_state

    try:
        state = run_state(store.root / job["target"]).get("state")
    except TraceError:
        return "interrupted"
    return {"finished": "finished", "cancelled": "cancelled", "failed": "failed"}.get(state, "interrupted")


def _register(store: JobStore) -> bool:
    with store.lock():
        pid = store.worker_pid()
        if pid is not None and pid != os.getpid():
            return False
        write_json(store.dir / "worker.json", process.identity())
        return True


def _deregister(store: JobStore) -> None:
    with store.lock():
        with contextlib.suppress(TraceError):
            if read_json(store.dir / "worker.json").get("pid") == os.getpid():
                (store.dir / "worker.json").unlink(missing_ok=True)


def work(store: JobStore, poll: float = 0.5) -> int:
    """The worker loop: start queued jobs (``$STAYSAFE_QUEUE_PARALLEL`` at a time, default 1)."""
    if not _register(store):
        return 0
    parallel = _parallel()
    procs: dict[str, subprocess.Popen] = {}
    adopted: dict[str, dict] = {}  # running jobs of a worker that died: wait for them, never start them twice
    stopping = []

    def stop(signum, frame):  # no locking here: the main loop may hold the lock
        stopping.append(signum)
        for p in procs.values():
            with contextlib.suppress(OSError):
                p.terminate()

    signal.signal(signal.SIGTERM, stop)
    for job in store.jobs(raw=True):
        if job["state"] == "running":
            if process.alive(job.get("process") or {}) is True:
                adopted[job["id"]] = job
            else:
                _finish(store, job["id"], "interrupted")
    while True:
        if stopping:
            for jid, p in procs.items():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=60)
                _finish(store, jid, "cancelled", p.returncode)
            _deregister(store)
            return 0
        for jid, p in list(procs.items()):
            rc = p.poll()
            if rc is not None:
                _finish(store, jid, "finished" if rc == 0 else "failed", rc)
                del procs[jid]
        for jid, job in list(adopted.items()):
            if process.alive(job.get("process") or {}) is not True:
                _finish(store, jid, _adopted_outcome(store, job))
                del adopted[jid]
        with store.lock():
            queued = [] if store.paused else [j for j in store.jobs(raw=True) if j["state"] == "queued"]
            if not queued and not procs and not adopted:
                (store.dir / "worker.json").unlink(missing_ok=True)
                return 0
            while queued and len(procs) + len(adopted) < parallel and not stopping:
                job = queued.pop(0)
                proc = _start(store, job)
                if proc is not None:
                    procs[job["id"]] = proc
        time.sleep(poll)
