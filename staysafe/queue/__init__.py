"""Background launches of ``staysafe train`` and ``staysafe experiment``, one at a time, from a queue on disk.

Training must not run inside the dashboard's process (a rerun or a closed tab would kill it), and two trainings on
a small CPU only slow each other down. Three parts: the job store (:mod:`~staysafe.queue.store`: job files, lock,
pause, cancel), submission (:mod:`~staysafe.queue.submit`: validate, write a job; rebuild a job's command) and the
worker loop (:mod:`~staysafe.queue.worker`). From a terminal: ``staysafe queue list|pause|resume|cancel``.
"""

from __future__ import annotations

from staysafe.queue import submit, worker
from staysafe.queue.store import ACTIVE, JOB_STATES, QUEUE_DIR, JobStore, LaunchError
from staysafe.queue.submit import command, experiment_argv, train_argv

__all__ = ["ACTIVE", "JOB_STATES", "QUEUE_DIR", "LaunchError", "Queue", "command", "experiment_argv", "train_argv"]


class Queue(JobStore):
    """The queue of one runs root: the job store plus submitting and the worker loop."""

    def submit_train(self, spec, run_id: str | None = None, start_worker: bool = True) -> dict:
        return submit.submit_train(self, spec, run_id, start_worker)

    def submit_experiment(self, experiment_id: str | None = None, start_worker: bool = True, **options) -> dict:
        """Queue an experiment into this queue's experiments root (``Queue(runs, experiments_root)``)."""
        return submit.submit_experiment(self, experiment_id, start_worker, **options)

    def work(self, poll: float = 0.5) -> int:
        return worker.work(self, poll)
