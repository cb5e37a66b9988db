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

from conftest import make_records
from staysafe.launcher import LaunchError, Queue, experiment_argv, spec_arguments, train_argv
from staysafe.runner import RunSpec, SpecError
from staysafe.traces import list_runs, load_run, run_state

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
    assert "--quick" in argv and argv[argv.index("--id") + 1] == "exp-1"
    assert argv[argv.index("--methods") + 1] == "sft,adaptive-probe"
    from staysafe.cli import build_parser

    args = build_parser().parse_args(argv[3:])
    assert args.quick and args.out_dir == str((tmp_path / "exps").resolve())
    with pytest.raises(SpecError, match="unknown method"):
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
    assert q.jobs() == [] and q.runner_pid() is None
    with pytest.raises(LaunchError, match="not a valid job id"):
        q.cancel("../../x")


def test_queue_runs_one_job_at_a_time_with_literal_arguments(tmp_path):
    """Two jobs: the second waits for the first. A data path full of shell syntax reaches the CLI unchanged."""
    runs = tmp_path / "runs"
    weird = write_jsonl(tmp_path / "data $(touch PWNED) ; echo x.jsonl", make_records(12))
    q = Queue(runs)
    j1 = q.submit_train(RunSpec(**{**TINY, "scenario": None, "data": str(weird)}), "first")
    j2 = q.submit_train(RunSpec(**TINY), "second")
    assert j1["argv"][j1["argv"].index("--data") + 1] == str(weird.resolve())
    runner = wait_for(q.runner_pid, 30, what="the queue runner")
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
    wait_for(lambda: q.runner_pid() is None, 30, what="the runner to exit on an empty queue")
    assert not (runs / ".queue" / "runner.json").exists()
    assert runner > 0


def test_cancel_a_queued_and_a_running_job(tmp_path):
    runs = tmp_path / "runs"
    q = Queue(runs)
    long = q.submit_train(RunSpec(**{**TINY, "steps": 5000}), "long")
    waiting = q.submit_train(RunSpec(**TINY), "waiting")
    wait_for(lambda: (runs / "long" / "steps.parquet").is_dir()
             and any((runs / "long" / "steps.parquet").glob("*.parquet")), 400, what="the first step")
    assert q.cancel(waiting["id"]) == "removed"
    assert [j["target"] for j in q.jobs()] == ["long"]
    assert q.cancel(long["id"]) == "terminating"
    job = wait_for(lambda: next((j for j in q.jobs() if j["state"] not in ("queued", "running")), None), 120,
                   what="the running job to stop")
    assert job["state"] == "cancelled" and job["cancel_requested"]
    status = run_state(runs / "long")
    assert status["state"] == "cancelled" and "SIGTERM" in status["error"]
    steps = load_run(runs / "long").steps["step"].tolist()
    assert steps and steps == list(range(1, len(steps) + 1))  # every completed step is kept
    assert not (runs / "waiting").exists()  # the queued job never started
    wait_for(lambda: q.runner_pid() is None, 30, what="the runner to exit")
    with pytest.raises(LaunchError, match="already cancelled"):
        q.cancel(long["id"])


def test_a_running_job_whose_process_is_gone_reads_interrupted(tmp_path):
    q = Queue(tmp_path / "runs")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    job = q._new_job("train", "ghost", ["true"], run_id="ghost")
    q.dir.mkdir(parents=True)
    (q.dir / f"{job['id']}.json").write_text(json.dumps({**job, "state": "running", "pid": proc.pid}))
    assert q.jobs()[0]["state"] == "interrupted"
    assert q.jobs(raw=True)[0]["state"] == "running"
    assert q.cancel(job["id"]) == "cancelled"  # its process is gone: marked at once


def test_command_line_lists_jobs(tmp_path):
    res = subprocess.run([sys.executable, "-m", "staysafe.launcher", "jobs", str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and res.stdout == ""
    res = subprocess.run([sys.executable, "-m", "staysafe.launcher", "cancel", str(tmp_path),
                          "1234567890123-train-nope"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "no job" in res.stderr


def test_a_paused_queue_holds_jobs_until_resumed(tmp_path):
    q = Queue(tmp_path / "runs")
    q.pause()
    job = q.submit_train(RunSpec(**TINY), "held")
    time.sleep(2)
    assert q.paused and q.runner_pid() is None and q.get(job["id"])["state"] == "queued"
    res = subprocess.run([sys.executable, "-m", "staysafe.launcher", "resume", str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert not q.paused
    wait_for(lambda: q.get(job["id"])["state"] == "finished", 400, what="the resumed job")
    assert run_state(tmp_path / "runs" / "held")["state"] == "finished"
