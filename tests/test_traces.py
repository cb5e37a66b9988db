"""Run directories: atomic creation, chunked tables, readers that survive kills and damage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import TINY_RUN, make_records
from staysafe.errors import SpecError
from staysafe.runs import process
from staysafe.runs.traces import (
    RunWriter,
    TableWriter,
    TraceError,
    list_runs,
    load_run,
    read_table,
    run_state,
    safe_run_path,
)


def test_table_writer_parts_merge_and_dedup(tmp_path):
    w = TableWriter(tmp_path / "steps.parquet", merge_every=3)
    for s in range(1, 8):
        w.append([{"step": s, "x": float(s)}])
    parts = sorted(p.name for p in (tmp_path / "steps.parquet").glob("*.parquet"))
    assert len(parts) < 7  # merged
    assert read_table(tmp_path / "steps.parquet", ("step",))["step"].tolist() == list(range(1, 8))
    # A resumed writer starts a new session; its rows for the same step win.
    w2 = TableWriter(tmp_path / "steps.parquet")
    w2.append([{"step": 7, "x": 70.0}, {"step": 8, "x": 80.0}])
    df = read_table(tmp_path / "steps.parquet", ("step",))
    assert df["step"].tolist() == list(range(1, 9))
    assert df.set_index("step").loc[7, "x"] == 70.0
    # pandas reads the directory as one table too (the documented format).
    assert len(pd.read_parquet(tmp_path / "steps.parquet")) >= 8


def test_merge_interrupted_before_deleting_parts_only_duplicates(tmp_path):
    w = TableWriter(tmp_path / "t.parquet", merge_every=100)
    for s in range(5):
        w.append([{"step": s}])
    small = list(w.small)
    merged = pd.concat([pd.read_parquet(p) for p in small])
    merged.to_parquet(tmp_path / "t.parquet" / "0001-00000000-00000004.parquet")  # as if killed before unlink
    assert read_table(tmp_path / "t.parquet", ("step",))["step"].tolist() == [0, 1, 2, 3, 4]


def test_damaged_part_names_the_file(tmp_path):
    w = TableWriter(tmp_path / "steps.parquet")
    w.append([{"step": 1}])
    bad = tmp_path / "steps.parquet" / "0001-00000001-00000001.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    # a damaged part of a table is skipped with a warning naming it (issue 14: one bad part hides nothing else)
    with pytest.warns(UserWarning, match="0001-00000001-00000001.parquet"):
        assert read_table(tmp_path / "steps.parquet", ("step",))["step"].tolist() == [1]
    with pytest.raises(TraceError, match="0001-00000001-00000001.parquet"):  # a single damaged file still raises
        read_table(bad)


def test_run_creation_is_atomic_and_ids_unique(tmp_path):
    a = RunWriter.create(tmp_path, {"method": "sft"}, run_id="same")
    with pytest.raises(FileExistsError):
        RunWriter.create(tmp_path, {"method": "sft"}, run_id="same")
    assert [p.name for p in tmp_path.iterdir()] == ["same"]  # no leftover temporary directory
    assert json.loads((a.path / "config.json").read_text())["run_id"] == "same"
    with pytest.raises(ValueError, match="not allowed"):
        RunWriter.create(tmp_path, {}, run_id="../escape")


def test_half_created_run_is_not_listed(tmp_path):
    (tmp_path / ".creating-x-1234").mkdir()
    (tmp_path / ".creating-x-1234" / "config.json").write_text("{}")
    RunWriter.create(tmp_path, {"method": "sft"}, run_id="ok")
    assert list_runs(tmp_path)["run_id"].tolist() == ["ok"]


def test_list_runs_survives_a_corrupt_run(tmp_path):
    good = RunWriter.create(tmp_path, {"method": "sft"}, run_id="good")
    good.append("steps", [{"step": 1}])
    bad = RunWriter.create(tmp_path, {"method": "sft"}, run_id="bad")
    (bad.path / "config.json").write_text("{not json")
    df = list_runs(tmp_path).set_index("run_id")
    assert df.loc["good", "steps_done"] == 1
    assert df.loc["bad", "state"] == "corrupt" and "config.json" in df.loc["bad", "error"]


def test_running_status_of_a_dead_process_reads_interrupted(tmp_path):
    w = RunWriter.create(tmp_path, {"method": "sft"})
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    w.set_status("running")
    status = json.loads((w.path / "status.json").read_text())
    status["pid"] = proc.pid
    (w.path / "status.json").write_text(json.dumps(status))
    assert run_state(w.path)["state"] == "interrupted"
    w.set_status("running")  # this process, alive, but holding no lock: a pid in a file proves nothing
    assert run_state(w.path)["state"] == "interrupted"
    with process.LifeLock(w.path / process.LOCK_NAME):  # what the run's lifecycle holds while it runs
        assert run_state(w.path)["state"] == "running"


@pytest.mark.parametrize("run_id", ["../x", "/etc", "a/../../b", "..", ".", "a/b", ""])
def test_safe_run_path_refuses_escapes(tmp_path, run_id):
    with pytest.raises(TraceError):
        safe_run_path(tmp_path, run_id)


def test_safe_run_path_refuses_symlink_escape(tmp_path):
    (tmp_path / "runs").mkdir()
    os.symlink("/etc", tmp_path / "runs" / "link")
    with pytest.raises(TraceError, match="outside"):
        safe_run_path(tmp_path / "runs", "link")
    assert safe_run_path(tmp_path / "runs", "ok-run") == (tmp_path / "runs" / "ok-run").resolve()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_sigkill_mid_training_keeps_every_completed_step(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_records(64))
    cmd = [sys.executable, "-m", "staysafe.cli", "train", *TINY_RUN, "--data", str(data), "--steps", "400",
           "--method", "adaptive", "--risk", "label", "--eval-every", "0", "--eval-harmful", "0", "--eval-benign", "0",
           "--runs-dir", str(tmp_path / "runs"), "--run-id", "victim"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    steps_dir = tmp_path / "runs" / "victim" / "steps.parquet"
    deadline = time.time() + 300
    while time.time() < deadline:
        if steps_dir.is_dir() and len(list(steps_dir.glob("*.parquet"))) >= 5:
            break
        assert proc.poll() is None, "training exited before it could be killed"
        time.sleep(0.2)
    time.sleep(0.37)  # land somewhere inside a step
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = load_run(tmp_path / "runs" / "victim")
    steps = run.steps["step"].tolist()
    assert len(steps) >= 5
    assert steps == list(range(1, len(steps) + 1))  # every completed step, no gaps
    assert set(run.examples["step"]) <= set(steps) and len(run.examples) >= 4 * (len(steps) - 1)
    assert run.status["state"] == "interrupted"


def test_a_row_repeated_before_a_merge_is_read_once_after_it(tmp_path):
    """safelora records the last step's evaluation again after its projection; once the parts are merged into one
    the reader still keeps only the newest row per key (it once kept both)."""
    from staysafe.runs.traces import RunWriter, load_run

    w = RunWriter.create(tmp_path, {"method": "safelora"}, run_id="r")
    w.append("evals", [{"step": 0, "asr_keyword": 0.1}, {"step": 4, "asr_keyword": 0.5}])
    w.append("evals", [{"step": 4, "asr_keyword": 0.2, "stage": "safelora"}])
    assert load_run(w.path).evals["asr_keyword"].tolist() == [0.1, 0.2]
    w.close()  # merged into one part
    assert len(list((w.path / "evals.parquet").glob("*.parquet"))) == 1
    assert load_run(w.path).evals["asr_keyword"].tolist() == [0.1, 0.2]


def test_the_run_lifecycle_records_finished_failed_and_cancelled(tmp_path):
    """One context manager owns a run's states: running (its lock held, so readers see it alive), then finished
    with what the body recorded, failed with the error, or cancelled on SIGTERM (turned into KeyboardInterrupt)."""
    finished = RunWriter.create(tmp_path, {"method": "sft"}, "ok")
    with finished.lifecycle(log=lambda *a: None, max_steps=3) as done:
        assert run_state(finished.path)["state"] == "running"
        done["step"] = 3
    status = run_state(finished.path)
    assert status["state"] == "finished" and status["step"] == 3 and status["max_steps"] == 3
    assert not process.held(finished.path / process.LOCK_NAME)

    failed = RunWriter.create(tmp_path, {"method": "sft"}, "bad")
    with pytest.raises(ZeroDivisionError):
        with failed.lifecycle(log=lambda *a: None):
            1 / 0
    status = run_state(failed.path)
    assert status["state"] == "failed" and "ZeroDivisionError" in status["error"] and status["traceback"]

    cancelled = RunWriter.create(tmp_path, {"method": "sft"}, "stop")
    with pytest.raises(KeyboardInterrupt):
        with cancelled.lifecycle(log=lambda *a: None):
            os.kill(os.getpid(), signal.SIGTERM)
            pytest.fail("the SIGTERM handler did not raise")
    status = run_state(cancelled.path)
    assert status["state"] == "cancelled" and "SIGTERM" in status["error"]
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back

    busy = RunWriter.create(tmp_path, {"method": "sft"}, "busy")
    with process.LifeLock(busy.path / process.LOCK_NAME):  # another live process runs it
        with pytest.raises(SpecError, match="still running"):
            with busy.lifecycle(log=lambda *a: None):
                pass
