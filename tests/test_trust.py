"""Files from elsewhere choose nothing dangerous, bad input stops before any work, and a run's end is recorded
before anything on the way out can fail: config trust, early checks, resume checks, the final status."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import TINY_RUN, make_records, paused_cli, recording_judge
from staysafe.cli import main
from staysafe.runs.traces import RunWriter, load_run


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def endpoint():
    with recording_judge() as server:
        yield server


def test_a_config_file_cannot_choose_the_judge_endpoint_or_key_variable(tmp_path, endpoint, monkeypatch, capsys):
    """A config.json sets where the judge is and which environment variable is sent as the bearer token: the
    file's endpoint is never used. Without the endpoint on the command line the run is refused; with another
    endpoint on the command line than the file recorded, refused too; nothing is sent, no run directory made."""
    monkeypatch.setenv("STAYSAFE_SECRET_FOR_TEST", "s3cret")
    url = f"http://127.0.0.1:{endpoint.server_address[1]}/v1"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"judge": "openai", "judge_url": url, "judge_model": "m", "risk": "judge",
                                  "judge_key_env": "STAYSAFE_SECRET_FOR_TEST"}))
    runs = tmp_path / "runs"
    rc = main(["train", "--config", str(config), *TINY_RUN, "--runs-dir", str(runs), "--risk", "judge"])
    err = capsys.readouterr().err
    assert rc == 2 and "only from the command line" in err and "--judge-url" in err
    rc = main(["train", "--config", str(config), *TINY_RUN, "--runs-dir", str(runs), "--risk", "judge",
               "--judge-url", url, "--judge-model", "m"])  # the key variable differs from what the file says
    err = capsys.readouterr().err
    assert rc == 2 and "recorded another judge endpoint" in err and "key_env" in err
    assert endpoint.requests == [] and not runs.exists()


def test_judge_url_credentials_are_redacted_in_config_json(tmp_path):
    from staysafe.judges.endpoint import JudgeEndpoint
    from staysafe.options import RunSpec
    from staysafe.runner import recorded_config

    spec = RunSpec(judge="openai")
    stored = json.dumps(recorded_config(spec, JudgeEndpoint("https://user:pw@judge.example/v1?key=abc", "m")))
    assert "pw" not in stored and "abc" not in stored and "judge.example/v1" in stored


def test_config_missing_file_and_a_runs_own_config(tmp_path, capsys):
    rc = main(["train", "--config", str(tmp_path / "nope.json"), *TINY_RUN])
    assert rc == 2 and "nope.json" in capsys.readouterr().err
    (tmp_path / "list.json").write_text("[1, 2]")
    rc = main(["train", "--config", str(tmp_path / "list.json"), *TINY_RUN])
    assert rc == 2 and "list.json" in capsys.readouterr().err
    # a run's own config.json (with its run_id, versions, command): a new run with a fresh id, not FileExistsError
    from staysafe.cli import build_parser, spec_from_cli

    run = RunWriter.create(tmp_path / "runs", {"method": "sft", "steps": 7, "versions": {}, "command": ["x"],
                                               "runs_dir": str(tmp_path / "runs")}, run_id="old")
    argv = ["train", "--config", str(run.path / "config.json")]
    spec = spec_from_cli(build_parser().parse_args(argv), argv)
    assert spec.steps == 7 and spec.run_id is None


def test_explicit_flags_override_the_config_even_at_their_default(tmp_path):
    from staysafe.cli import build_parser, spec_from_cli
    from staysafe.options import RunSpec

    config = tmp_path / "c.json"
    config.write_text(json.dumps({"steps": 7, "lr": 0.01, "method": "sft"}))
    default_steps = RunSpec().steps
    argv = ["train", "--config", str(config), "--steps", str(default_steps)]
    spec = spec_from_cli(build_parser().parse_args(argv), argv)
    assert spec.steps == default_steps and spec.lr == 0.01 and spec.method == "sft"


@pytest.mark.parametrize("flags, message", [
    (["--eval-harmful", "1000"], "eval_harmful = 1000"),
    (["--eval-benign", "999"], "eval_benign = 999"),
    (["--eval-judges", "no-such-judge"], "no-such-judge"),
    (["--run-id", "../x"], "run_id = '../x' is invalid"),
])
def test_bad_input_stops_before_any_model_load(tmp_path, capsys, flags, message):
    runs = tmp_path / "runs"
    rc = main(["train", *TINY_RUN, "--runs-dir", str(runs), *flags])
    assert rc == 2 and message in capsys.readouterr().err
    assert not runs.exists() or not [p for p in runs.iterdir() if not p.name.startswith(".")]


def test_a_max_length_too_short_for_the_template_stops_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """On the embedded aligned model in an empty home: the error names max_length, and neither the embedded model's
    conversion nor the aligned adapter's merge (the model load) has happened, nor a run directory."""
    home = tmp_path / "home"
    monkeypatch.setenv("STAYSAFE_HOME", str(home))
    runs = tmp_path / "runs"
    rc = main(["train", *TINY_RUN, "--model", "smollm2-135m-aligned", "--max-length", "16", "--runs-dir", str(runs),
               "--scenario", "harmful"])
    assert rc == 2 and "max_length = 16 is too short for the chat template" in capsys.readouterr().err
    assert sorted(p.name for p in (home / "models").iterdir()) == ["smollm2-135m-instruct-tokenizer"]
    assert not runs.exists() or not [p for p in runs.iterdir() if not p.name.startswith(".")]


def test_a_taken_run_id_stops_before_any_work(tmp_path, capsys):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    rc = main(["train", *TINY_RUN, "--runs-dir", str(tmp_path / "runs"), "--run-id", "taken"])
    assert rc == 2 and "already exists" in capsys.readouterr().err


def test_resume_refuses_a_running_run_and_changed_data(tmp_path, capsys):
    from staysafe.data import load_records
    from staysafe.runner import data_digest

    data = write_jsonl(tmp_path / "d.jsonl", make_records(8))
    run = RunWriter.create(tmp_path / "runs", {"model": "tiny", "method": "sft", "data": str(data), "scenario": None,
                                               "data_sha256": data_digest(load_records(str(data)))}, run_id="r")
    from staysafe.runs import process

    run.set_status("running")
    with process.LifeLock(run.path / process.LOCK_NAME):  # held by a live run
        assert main(["train", "--resume", str(run.path)]) == 2
        assert "still running" in capsys.readouterr().err
    run.set_status("cancelled")
    write_jsonl(data, make_records(9))
    assert main(["train", "--resume", str(run.path)]) == 2
    err = capsys.readouterr().err
    assert "changed since it was trained" in err and "d.jsonl" in err


def test_the_final_status_is_written_before_the_way_out_can_fail(tmp_path):
    """SIGTERM at a step, then more SIGTERMs while the run is shutting down (merging its parts): the run is still
    recorded as cancelled (a second signal once cut the cancel path before status.json was written)."""
    data = write_jsonl(tmp_path / "d.jsonl", make_records(40))
    log = tmp_path / "log"
    proc = paused_cli(["train", *TINY_RUN, "--data", str(data), "--steps", "20", "--eval-every", "0", "--run-id",
                       "victim", "--runs-dir", str(tmp_path / "runs")], "step@3", log, timeout=900)
    while proc.poll() is None:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.01)
    run = load_run(tmp_path / "runs" / "victim")
    assert run.status["state"] == "cancelled", (run.status, log.read_text()[-2000:])
    assert run.steps["step"].tolist() == [1, 2, 3]
