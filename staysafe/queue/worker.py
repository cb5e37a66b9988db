"""The queue worker: one background process per runs root that starts queued jobs one by one and exits when none
is left, so the queue advances with the browser closed (``staysafe queue work <runs_root>``, started by a submit).

Each job's command is rebuilt from its validated spec (:func:`staysafe.queue.submit.command`); a job that fails
that check, is not a readable job, or whose process cannot start is marked ``failed`` with the reason and the
queue moves on. The worker holds ``worker.lock`` while it lives; each child inherits its job's ``<job>.lock``
(held for the child's lifetime) and is ended by the kernel if the worker dies. The worker signals only the
children it started, when their job file asks for a cancel.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

from staysafe.queue.store import WORKER_LOCK, JobStore
from staysafe.queue.submit import command
from staysafe.runs import process
from staysafe.runs.atomic import write_json
from staysafe.runs.files import open_append
from staysafe.runs.traces import TraceError

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


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the worker ends (Linux), so no job outlives the worker that can
    cancel it (a new worker never has to signal a process it did not start)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _start(store: JobStore, job: dict) -> subprocess.Popen | None:
    """Start one job (under the lock): output to its log, its lock passed to the child, state ``running``. A job
    whose spec is invalid or whose process cannot start is marked ``failed`` and None returned."""
    try:
        argv = command(job, store.root, store.experiments)
        with process.LifeLock(store.job_lock(job["id"]), wait=0.0) as lock, open_append(
                store.log_path(job["id"])) as log:
            proc = subprocess.Popen(argv, cwd=str(store.root), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                    pass_fds=(lock.fd,), preexec_fn=_die_with_parent)
    except Exception as err:  # SpecError, OSError, a busy lock, a wrong-typed field: this job fails, the queue goes on
        store.write({**job, "state": "failed", "ended": time.time(),
                     "error": f"not started: {type(err).__name__}: {err}"[:500]})
        return None
    store.write({**job, "state": "running", "process": process.identity(proc.pid), "started": time.time()})
    return proc


def _outcome(store: JobStore, job: dict) -> str:
    """How a job that ended out of this worker's sight ended: a train job's run status says."""
    if job["kind"] != "train":
        return "interrupted"
    from staysafe.runs.traces import run_state

    try:
        state = run_state(store.root / job["target"]).get("state")
    except TraceError:
        return "interrupted"
    return {"finished": "finished", "cancelled": "cancelled", "failed": "failed"}.get(state, "interrupted")


def work(store: JobStore, poll: float = 0.5) -> int:
    """The worker loop: start queued jobs (``$STAYSAFE_QUEUE_PARALLEL`` at a time, default 1)."""
    store.dir.mkdir(parents=True, exist_ok=True)
    try:
        alive = process.LifeLock(store.dir / WORKER_LOCK, wait=0.0)
    except process.LockBusy:
        return 0  # another worker serves this queue
    write_json(store.dir / "worker.json", process.identity())
    parallel = _parallel()
    procs: dict[str, subprocess.Popen] = {}
    waiting: set[str] = set()  # running jobs a previous worker started that still hold their lock
    stopping = []

    def stop(signum, frame):  # no locking here: the main loop may hold the lock
        stopping.append(signum)
        for p in procs.values():
            with contextlib.suppress(OSError):
                p.terminate()

    signal.signal(signal.SIGTERM, stop)
    try:
        for job in store.jobs(raw=True):
            if job["state"] == "running":
                if store.job_alive(job["id"]):
                    waiting.add(job["id"])
                else:
                    _finish(store, job["id"], _outcome(store, job))
        while not stopping:
            for jid, p in list(procs.items()):
                rc = p.poll()
                if rc is not None:
                    _finish(store, jid, "finished" if rc == 0 else "failed", rc)
                    del procs[jid]
                elif _cancel_requested(store, jid):
                    with contextlib.suppress(OSError):
                        p.terminate()  # our own child, by its handle: never a pid read from a file
            for jid in list(waiting):
                if not store.job_alive(jid):
                    with contextlib.suppress(TraceError):
                        _finish(store, jid, _outcome(store, store.read(jid)))
                    waiting.discard(jid)
            with store.lock():
                queued = [] if store.paused else [j for j in store.jobs(raw=True) if j["state"] == "queued"]
                if not queued and not procs and not waiting:
                    with contextlib.suppress(OSError):
                        (store.dir / "worker.json").unlink()
                    alive.release()  # under the queue lock: a submit from now on starts a new worker
                    return 0
                while queued and len(procs) + len(waiting) < parallel and not stopping:
                    job = queued.pop(0)
                    proc = _start(store, job)
                    if proc is not None:
                        procs[job["id"]] = proc
            time.sleep(poll)
        for jid, p in procs.items():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=60)
            _finish(store, jid, "cancelled", p.returncode)
        return 0
    finally:
        with contextlib.suppress(OSError):
            (store.dir / "worker.json").unlink()
        alive.release()


def _cancel_requested(store: JobStore, job_id: str) -> bool:
    try:
        return store.read(job_id).get("cancel_requested") is True
    except TraceError:
        return False
