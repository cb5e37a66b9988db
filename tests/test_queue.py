"""Background launches through the on-disk queue, with real ``staysafe train`` subprocesses on the tiny model: one
run at a time, cancel of a queued and of a running job, argument lists (never a shell), validation before queueing."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_records, run_cli
from staysafe.options import spec_flags as spec_arguments
from staysafe.queue import LaunchError, Queue, command, experiment_argv, train_argv
from staysafe.runner import RunSpec, SpecError
from staysafe.runs import process
from staysafe.runs.traces import list_runs, load_run, run_state

TINY = dict(model="tiny", lora_r=0, batch_size=4, max_length=64, steps=3, eval_every=0, eval_harmful=2,
            eval_benign=2, max_new_tokens=4, eval_judges=[], record_judge=False, risk="label", method="sft",
            save_model=False)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Training subprocesses use one torch thread: on a small shared CPU, 2 threads against other load run ~5x
    slower than 1."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def wait_for(predicate, timeout: float = 400, every: float = 0.2, what: str = ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_train_argv_is_a_list_that_the_cli_parses_back_to_the_same_spec(tmp_path):
    from staysafe.cli import build_parser, spec_from_args

    spec = RunSpec(**{**TINY, "method": "adaptive", "risk_ema": 0.5, "lr": 3e-5, "eval_judges": ["a", "b"],
                      "per_example_beta": False, "record_judge": True})
    argv = train_argv(spec, "my-run", tmp_path)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    assert argv[:4] == [sys.executable, "-m", "staysafe.cli", "train"]
    assert argv[-4:] == ["--run-id", "my-run", "--runs-dir", str(tmp_path.resolve())]
    parsed = spec_from_args(build_parser().parse_args(argv[3:]))
    assert dataclasses.asdict(parsed) == dataclasses.asdict(
        dataclasses.replace(spec, run_id="my-run", runs_dir=str(tmp_path.resolve())))
    own = dataclasses.replace(spec, data="x.jsonl")
    parsed = spec_from_args(build_parser().parse_args(["train", *spec_arguments(own)]))
    assert parsed.data == "x.jsonl" and parsed.scenario is None


def test_experiment_argv(tmp_path):
    argv = experiment_argv("exp-1", tmp_path / "runs", tmp_path / "exps", methods=["sft", "adaptive-probe"],
                           quick=True)
    assert argv[:4] == [sys.executable, "-m", "staysafe.cli", "experiment"]
    assert argv[argv.index("--preset") + 1] == "quick" and argv[argv.index("--id") + 1] == "exp-1"
    assert argv[argv.index("--methods") + 1] == "sft,adaptive-probe"
    from staysafe.cli import build_parser

    args = build_parser().parse_args(argv[3:])
    assert args.preset == "quick" and args.out_dir == str((tmp_path / "exps").resolve())
    live = experiment_argv("exp-3", tmp_path / "runs", tmp_path / "exps", preset="live")
    assert live[live.index("--preset") + 1] == "live" and live[live.index("--methods") + 1] == "sft,adaptive-probe"
    with pytest.raises(SpecError, match="preset = .nope. is invalid"):
        experiment_argv("exp-4", tmp_path, tmp_path, preset="nope")
    with pytest.raises(SpecError, match="methods = \\['dpo'\\] is invalid"):
        experiment_argv("exp-2", tmp_path, tmp_path, methods=["dpo"])


def test_invalid_input_is_refused_before_anything_is_queued(tmp_path):
    q = Queue(tmp_path / "runs")
    with pytest.raises(SpecError, match="beta_min = 0.9 is greater than beta_max = 0.1"):
        q.submit_train(RunSpec(**{**TINY, "beta_min": 0.9, "beta_max": 0.1}))
    with pytest.raises(SpecError, match="option steps = 0 is invalid"):
        q.submit_train(RunSpec(**{**TINY, "steps": 0}))
    with pytest.raises(SpecError, match="does not exist"):
        q.submit_train(RunSpec(**{**TINY, "data": str(tmp_path / "missing.jsonl")}))
    for bad in ("../escape", "/etc/passwd", "a/b", ".."):
        with pytest.raises(LaunchError):
            q.submit_train(RunSpec(**TINY), bad)
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    with pytest.raises(LaunchError, match="already exists"):
        q.submit_train(RunSpec(**TINY), "taken")
    assert q.jobs() == [] and q.worker_pid() is None
    with pytest.raises(LaunchError, match="not a valid job id"):
        q.cancel("../../x")


def test_queue_runs_one_job_at_a_time_with_literal_arguments(tmp_path):
    """Two jobs: the second waits for the first. A data path full of shell syntax reaches the CLI unchanged."""
    runs = tmp_path / "runs"
    weird = write_jsonl(tmp_path / "data $(touch PWNED) ; echo x.jsonl", make_records(12))
    q = Queue(runs)
    j1 = q.submit_train(RunSpec(**{**TINY, "scenario": None, "data": str(weird)}), "first")
    j2 = q.submit_train(RunSpec(**TINY), "second")
    argv = command(j1, runs)
    assert argv[argv.index("--data") + 1] == str(weird.resolve())
    runner = wait_for(q.worker_pid, 30, what="the queue runner")
    peak, seen_running = 0, set()

    def done():
        nonlocal peak
        jobs = {j["target"]: j for j in q.jobs()}
        running = [t for t, j in jobs.items() if j["state"] == "running"]
        live = [r for r in ("first", "second") if (runs / r / "status.json").exists()
                and run_state(runs / r)["state"] == "running"]
        peak = max(peak, len(running), len(live))
        seen_running.update(running)
        return all(j["state"] not in ("queued", "running") for j in jobs.values())

    wait_for(done, 600, what="both jobs")
    assert peak == 1 and seen_running == {"first", "second"}
    jobs = {j["target"]: j for j in q.jobs()}
    assert jobs["first"]["state"] == "finished" and jobs["second"]["state"] == "finished", q.log_tail(j1["id"])
    assert jobs["first"]["ended"] <= jobs["second"]["started"]  # strictly one after the other
    df = list_runs(runs).set_index("run_id")
    assert df.loc["first", "state"] == "finished" and df.loc["second", "state"] == "finished"
    assert load_run(runs / "first").config["data"] == str(weird.resolve())
    assert not list(tmp_path.rglob("PWNED")) and not (Path.cwd() / "PWNED").exists()
    assert "run finished" in q.log_tail(j2["id"])
    wait_for(lambda: q.worker_pid() is None, 30, what="the runner to exit on an empty queue")
    assert not (runs / ".queue" / "worker.json").exists()
    assert runner > 0


def test_cancel_a_queued_and_a_running_job(tmp_path):
    runs = tmp_path / "runs"
    q = Queue(runs)
    long = q.submit_train(RunSpec(**{**TINY, "steps": 5000}), "long")
    waiting = q.submit_train(RunSpec(**TINY), "waiting")
    wait_for(lambda: (runs / "long" / "steps.parquet").is_dir()
             and any((runs / "long" / "steps.parquet").glob("*.parquet")), 400, what="the first step")
    assert q.cancel(waiting["id"]) == "cancelled"
    assert [(j["target"], j["state"]) for j in q.jobs()] == [("long", "running"), ("waiting", "cancelled")]
    assert q.cancel(long["id"]) == "cancelling"
    job = wait_for(lambda: next((j for j in q.jobs() if j["target"] == "long" and j["state"] != "running"), None),
                   120, what="the running job to stop")
    assert job["state"] == "cancelled" and job["cancel_requested"]
    status = run_state(runs / "long")
    assert status["state"] == "cancelled" and "SIGTERM" in status["error"]
    steps = load_run(runs / "long").steps["step"].tolist()
    assert steps and steps == list(range(1, len(steps) + 1))  # every completed step is kept
    assert not (runs / "waiting").exists()  # the queued job never started
    wait_for(lambda: q.worker_pid() is None, 30, what="the runner to exit")
    with pytest.raises(LaunchError, match="already cancelled"):
        q.cancel(long["id"])


def test_a_running_job_whose_process_is_gone_reads_interrupted(tmp_path):
    q = Queue(tmp_path / "runs")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    job = q.submit_train(RunSpec(**TINY), "ghost", start_worker=False)
    (q.dir / f"{job['id']}.json").write_text(json.dumps({**job, "state": "running",
                                                         "process": process.identity(proc.pid)}))
    assert q.jobs()[0]["state"] == "interrupted"
    assert q.jobs(raw=True)[0]["state"] == "running"
    assert q.cancel(job["id"]) == "cancelled"  # its process is gone: marked at once


def test_command_line_lists_jobs(tmp_path):
    res = run_cli("queue", "list", "--runs-dir", str(tmp_path))
    assert res.returncode == 0 and res.stdout == ""
    res = run_cli("queue", "cancel", "1234567890123-train-nope", "--runs-dir", str(tmp_path))
    assert res.returncode == 2 and "no readable job" in res.stderr


def test_a_paused_queue_holds_jobs_until_resumed(tmp_path):
    q = Queue(tmp_path / "runs")
    q.pause()
    job = q.submit_train(RunSpec(**TINY), "held")
    time.sleep(2)
    assert q.paused and q.worker_pid() is None and q.get(job["id"])["state"] == "queued"
    res = run_cli("queue", "resume", "--runs-dir", str(tmp_path / "runs"))
    assert res.returncode == 0, res.stderr
    assert not q.paused
    wait_for(lambda: q.get(job["id"])["state"] == "finished", 400, what="the resumed job")
    assert run_state(tmp_path / "runs" / "held")["state"] == "finished"


# ----------------------------------------------------------------------------------------------- untrusted job files


def crafted(q: Queue, name: str, body) -> str:
    """Write a job file as someone else could (a shared or unpacked runs root)."""
    job_id = f"{time.time_ns() // 1_000_000:013d}-train-{name}"
    q.dir.mkdir(parents=True, exist_ok=True)
    (q.dir / f"{job_id}.json").write_text(json.dumps(body(job_id) if callable(body) else body))
    time.sleep(0.002)
    return job_id


def test_a_crafted_job_file_never_runs_its_argv_and_the_queue_moves_on(tmp_path):
    """The worker rebuilds every command from the validated spec: stored argv/cwd are ignored, a spec with an
    unknown option, a judge endpoint or key variable, or the wrong shape is marked failed / corrupt, and the
    worker keeps going to the next job."""
    q = Queue(tmp_path / "runs")
    pwned = tmp_path / "PWNED"
    evil = {"argv": ["sh", "-c", f"touch {pwned}"], "cwd": "/", "kind": "train", "state": "queued"}
    a = crafted(q, "argv", lambda i: {**evil, "id": i, "target": "argv", "spec": {"steps": 1, "shell": "x"}})
    b = crafted(
        q,
        "secret",
        lambda i: {
            **evil,
            "id": i,
            "target": "secret",
            "spec": {**TINY, "judge_url": "http://127.0.0.1:9/v1", "judge_key_env": "HOME"},
        },
    )
    c = crafted(q, "shape", [1, 2])
    d = crafted(q, "typed", lambda i: {**evil, "id": i, "target": "typed", "spec": {**TINY, "steps": "3; rm"}})
    assert q.work(poll=0.05) == 0
    jobs = {j["id"]: j for j in q.jobs()}
    assert not pwned.exists()
    assert jobs[a]["state"] == "failed" and "unknown option(s) shell" in jobs[a]["error"]
    assert jobs[b]["state"] == "failed" and "unknown option(s) judge_key_env, judge_url" in jobs[b]["error"]
    assert jobs[c]["state"] == "corrupt" and "holds a JSON list" in jobs[c]["error"]
    assert jobs[d]["state"] == "failed" and "steps" in jobs[d]["error"]
    assert not (tmp_path / "runs" / "argv").exists() and not (tmp_path / "runs" / "secret").exists()


def test_cancel_signals_only_a_process_it_can_identify(tmp_path):
    """A running job whose recorded pid is a live stranger (a crafted file, or a pid reused after a reboot) is
    marked cancelled without a signal; the empty target that once matched every command line matches nothing."""
    q = Queue(tmp_path / "runs")
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        old_style = crafted(q, "old", lambda i: {"id": i, "kind": "train", "target": "old", "state": "running",
                                                 "pid": stranger.pid, "spec": TINY})
        reused = crafted(q, "reused", lambda i: {"id": i, "kind": "train", "target": "reused", "state": "running",
                                                 "spec": TINY, "process": {**process.identity(stranger.pid),
                                                                           "start": 1}})
        assert q.cancel(old_style) == "cancelled"
        assert q.cancel(reused) == "cancelled"
        time.sleep(0.5)
        assert stranger.poll() is None  # never signalled
        (q.dir / "worker.json").write_text(json.dumps({**process.identity(stranger.pid), "start": 1}))
        assert q.worker_pid() is None  # a reused pid is not our worker either
    finally:
        stranger.kill()
        stranger.wait()


def test_the_openai_judge_cannot_be_queued_without_an_endpoint(tmp_path):
    q = Queue(tmp_path / "runs")
    with pytest.raises(SpecError, match="a queued run uses the openai judge"):
        q.submit_train(RunSpec(**{**TINY, "risk": "judge", "judge": "openai"}), "no-url")
    assert q.jobs() == []


def test_a_worker_started_by_this_process_is_reaped(tmp_path):
    """The dashboard starts workers from a long-lived process: each finished one must not stay a zombie."""
    q = Queue(tmp_path / "runs")
    pid = q.ensure_worker()  # an empty queue: the worker exits at once

    def reaped():
        q.jobs()  # what every dashboard rerun calls
        try:
            with open(f"/proc/{pid}/stat") as f:
                return False if f.read().rsplit(")", 1)[1].split()[0] != "Z" else False
        except OSError:
            return True

    wait_for(reaped, 900, 0.5, what="the finished worker to be reaped")
