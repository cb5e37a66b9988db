"""The attack suite: someone who can write files in a shared runs folder tries to make StaySafe send a secret,
signal or stall a process, write or show a file through a link, crash or hang a reader, or train with values out
of range. Each class of attack has its test here; every test would fail on the code before this round.

A fake judge endpoint on 127.0.0.1 records every request: a file-driven path must never reach it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY_RUN, make_records, recording_judge
from staysafe.cli import main
from staysafe.errors import StaySafeError
from staysafe.options import RunSpec, SpecError
from staysafe.queue import Queue
from staysafe.runs import process
from staysafe.runs.files import TraceError, read_json
from staysafe.runs.traces import RunWriter, list_runs, load_run, read_table, run_state

SECRET_ENV = "STAYSAFE_ATTACK_SECRET"
TINY = dict(model="tiny", lora_r=0, batch_size=4, max_length=64, steps=2, eval_every=0, eval_harmful=2,
            eval_benign=2, max_new_tokens=2, eval_judges=[], save_model=False, risk="label", record_judge=False,
            method="sft", scenario="harmful", n_harmful=8)


@pytest.fixture
def trap(monkeypatch):
    """The fake endpoint a planted file names: the test fails if it receives any request."""
    monkeypatch.setenv(SECRET_ENV, "sk-attack-DO-NOT-SEND")
    with recording_judge() as server:
        yield server
    assert server.requests == [], "a file made StaySafe send a request to the endpoint it named"


def planted_run(runs: Path, run_id: str, url: str, **extra) -> Path:
    """A run directory as an attacker writes it: the openai judge at their URL with the victim's key variable."""
    config = {**TINY, "judge": "openai", "risk": "judge", "method": "adaptive", "judge_url": url,
              "judge_model": "m", "judge_key_env": SECRET_ENV, **extra}
    run = RunWriter.create(runs, config, run_id)
    run.set_status("cancelled")
    ckpt = run.path / "checkpoints" / "checkpoint-1"
    ckpt.mkdir(parents=True)
    (ckpt / "staysafe_state.json").write_text("{}")
    return run.path


# ------------------------------------------------------------------------------------ 1. secrets by file


def test_train_resume_of_a_planted_run_sends_nothing(tmp_path, trap, capsys):
    run = planted_run(tmp_path / "runs", "planted", trap.url)
    assert main(["train", "--resume", str(run)]) == 2
    assert "only from the command line" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m"]) == 2
    assert "recorded another judge endpoint" in capsys.readouterr().err


def test_experiment_resume_takes_no_endpoint_or_output_place_from_its_file(tmp_path, trap, capsys):
    exps, runs = tmp_path / "exps", tmp_path / "runs"
    (exps / "e1").mkdir(parents=True)
    (exps / "e1" / "experiment.json").write_text(json.dumps({
        "scenario": "harmful", "methods": ["adaptive-judge"], "seeds": 1, "runs_dir": str(tmp_path / "elsewhere"),
        "overrides": {**{k: v for k, v in TINY.items() if k not in ("method", "risk")}, "judge": "openai",
                      "judge_url": trap.url, "judge_key_env": SECRET_ENV}, "state": "cancelled"}))
    assert main(["experiment", "--resume", "e1", "--out-dir", str(exps), "--runs-dir", str(runs)]) == 2
    assert "give --runs-dir" in capsys.readouterr().err  # its runs_dir is refused, never used
    desc = json.loads((exps / "e1" / "experiment.json").read_text())
    desc.pop("runs_dir")
    (exps / "e1" / "experiment.json").write_text(json.dumps(desc))
    assert main(["experiment", "--resume", "e1", "--out-dir", str(exps), "--runs-dir", str(runs)]) == 2
    assert "judge_url" in capsys.readouterr().err
    # the same without the endpoint fields in overrides: refused for want of an endpoint on the command line
    for k in ("judge_url", "judge_key_env"):
        desc["overrides"].pop(k)
    (exps / "e1" / "experiment.json").write_text(json.dumps({**desc, "judge_endpoint": {"url": trap.url}}))
    assert main(["experiment", "--resume", "e1", "--out-dir", str(exps), "--runs-dir", str(runs)]) == 2
    assert "only from the command line" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists() and not runs.exists()


def test_a_queued_experiment_does_not_resume_a_planted_run(tmp_path, trap):
    """A planted run directory under the id a queued experiment will use: the worker refuses it (its options are
    not the experiment's) and the endpoint it names never hears from us."""
    q = Queue(tmp_path / "runs", tmp_path / "exps")
    job = q.submit_experiment("exp1", start_worker=False, scenario="harmful", methods=["sft"], seeds=1,
                              preset="live", steps=2)
    planted_run(tmp_path / "runs", "exp1-sft-s0", trap.url)
    assert q.work(poll=0.05) == 0
    done = q.get(job["id"])
    assert done["state"] == "failed"
    assert "other options than this experiment" in (tmp_path / "runs" / ".queue" / f"{job['id']}.log").read_text()


def test_a_job_file_chooses_neither_endpoint_nor_experiments_root(tmp_path, trap):
    q = Queue(tmp_path / "runs", tmp_path / "exps")
    q.dir.mkdir(parents=True)
    jid = f"{time.time_ns() // 1_000_000:013d}-experiment-x1"
    (q.dir / f"{jid}.json").write_text(json.dumps({
        "id": jid, "kind": "experiment", "target": "x1", "state": "queued", "experiments_root": "/tmp/anywhere",
        "options": {"scenario": "harmful"}}))
    assert q.work(poll=0.05) == 0
    assert "never chooses where its output goes" in q.get(jid)["error"]


def test_judge_transport_refuses_cleartext_caps_size_and_keeps_a_deadline(tmp_path):
    from staysafe.judges import OpenAICompatibleJudge

    with pytest.raises(SpecError, match="cleartext"):
        OpenAICompatibleJudge("http://10.0.0.1:8000/v1", "m")  # never contacted: refused on construction
    OpenAICompatibleJudge("http://10.0.0.1:8000/v1", "m", allow_http=True)  # an explicit opt-in

    class Bad(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.send_response(200)
            self.end_headers()
            if self.server.mode == "huge":
                self.wfile.write(b"x" * 3_000_000)
            else:
                for _ in range(40):  # one byte every 0.3 s: each read is within the timeout
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.3)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Bad)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        server.mode = "huge"
        score = OpenAICompatibleJudge(url, "m", retries=0, max_bytes=100_000).judge(["p"], ["r"])[0]
        assert score.score is None and "larger than 100000 bytes" in score.error
        server.mode = "trickle"
        t0 = time.monotonic()
        score = OpenAICompatibleJudge(url, "m", retries=0, timeout=1.0, deadline=2.0).judge(["p"], ["r"])[0]
        assert score.score is None and "deadline" in score.error
        assert time.monotonic() - t0 < 8  # 12 s of trickle, cut at the 2 s deadline
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------ 2. processes by file


def test_a_forged_running_job_neither_redirects_a_signal_nor_holds_the_slot(tmp_path):
    q = Queue(tmp_path / "runs")
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        q.dir.mkdir(parents=True)
        jid = f"{time.time_ns() // 1_000_000:013d}-train-forged"
        (q.dir / f"{jid}.json").write_text(json.dumps({
            "id": jid, "kind": "train", "target": "forged", "state": "running", "spec": TINY,
            "process": process.identity(stranger.pid)}))  # its identity copied exactly: pid, start, boot
        assert q.cancel(jid) == "cancelled"
        real = q.submit_train(RunSpec(**TINY), "real", start_worker=False)
        assert q.work(poll=0.05) == 0  # the forged "running" job does not hold the only slot
        assert q.get(real["id"])["state"] == "finished"
        time.sleep(0.2)
        assert stranger.poll() is None  # never signalled
    finally:
        stranger.kill()
        stranger.wait()


# ------------------------------------------------------------------------------------ 3. files by symlink


def test_no_log_is_written_or_shown_through_a_link(tmp_path):
    q = Queue(tmp_path / "runs")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    job = q.submit_train(RunSpec(**TINY), "linked", start_worker=False)
    q.log_path(job["id"]).symlink_to(victim)
    assert q.log_tail(job["id"]) == ""  # not shown
    assert q.work(poll=0.05) == 0
    assert victim.read_text() == "precious\n"  # not appended to
    assert q.get(job["id"])["state"] == "failed" and "symbolic link" in q.get(job["id"])["error"]


def test_trace_tables_and_run_directories_are_not_followed_through_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    run = RunWriter.create(tmp_path / "runs", {"method": "sft"}, "r")
    (run.path / "steps.parquet").symlink_to(outside, target_is_directory=True)
    with pytest.raises(TraceError, match="link"):
        run.append("steps", [{"step": 1}])
    assert list(outside.iterdir()) == []
    (tmp_path / "runs" / "alias").symlink_to(run.path, target_is_directory=True)
    assert list(list_runs(tmp_path / "runs")["run_id"]) == ["r"]
    with pytest.raises(TraceError):
        load_run(tmp_path / "runs" / "alias")


# ------------------------------------------------------------------------------------ 4. untrusted files


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=12)
field_values = st.dictionaries(st.sampled_from(["state", "created", "step", "pid", "error", "max_steps", "host",
                                                "method", "kind", "target", "id", "spec", "process"]),
                               json_values, max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=field_values, config=field_values | json_values)
def test_every_reader_of_a_foreign_run_raises_only_named_errors(tmp_path_factory, status, config):
    root = tmp_path_factory.mktemp("runs")
    d = root / "r"
    d.mkdir()
    (d / "status.json").write_text(json.dumps(status))
    (d / "config.json").write_text(json.dumps(config))
    table = list_runs(root)  # never raises: a bad run is a corrupt row
    assert len(table) == 1
    for reader in (run_state, load_run):
        try:
            reader(d)
        except StaySafeError:
            pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(job=field_values | json_values)
def test_the_queue_lists_any_foreign_job_file(tmp_path_factory, job):
    q = Queue(tmp_path_factory.mktemp("runs"))
    q.dir.mkdir(parents=True)
    (q.dir / f"{time.time_ns() // 1_000_000:013d}-train-x.json").write_text(json.dumps(job))
    assert len(q.jobs()) == 1


def test_deep_nesting_a_fifo_and_huge_files_are_named_not_crashes(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TraceError, match="nests deeper"):
        read_json(deep)
    runs = tmp_path / "runs"
    for name, writer in (("nested", lambda p: p.write_text('{"a":' * 5000 + "1" + "}" * 5000)),
                         ("fifo", lambda p: os.mkfifo(p))):
        (runs / name).mkdir(parents=True)
        writer(runs / name / "config.json")
        (runs / name / "status.json").write_text('{"state": "finished"}')
    done = []
    threading.Thread(target=lambda: done.append(list_runs(runs)), daemon=True).start()
    deadline = time.monotonic() + 60
    while not done and time.monotonic() < deadline:
        time.sleep(0.05)
    assert done, "list_runs hung on a FIFO"
    assert set(done[0]["state"]) == {"corrupt"} and done[0]["error"].str.contains("FIFO|nests").all()
    assert main(["runs", "--runs-dir", str(runs)]) == 0


def test_parquet_parts_of_the_wrong_types_are_skipped_and_named(tmp_path):
    table = tmp_path / "evals.parquet"
    table.mkdir()
    pd.DataFrame({"step": [0, 10], "asr_keyword": [0.5, 0.7]}).to_parquet(table / "0001-00000000-00000000.parquet")
    pd.DataFrame({"step": ["ten"], "asr_keyword": [0.1]}).to_parquet(table / "0001-00000001-00000001.parquet")
    pd.DataFrame({"step": [20], "asr_keyword": ["high"]}).to_parquet(table / "0001-00000002-00000002.parquet")
    (table / "0001-00000003-00000003.parquet").mkdir()  # an empty directory named like a part
    damaged: list[str] = []
    with pytest.warns(UserWarning):
        df = read_table(table, ("step",), damaged)
    assert df["step"].tolist() == [0, 10] and len(damaged) == 3


def test_status_fields_of_the_wrong_type_make_a_corrupt_row(tmp_path):
    run = RunWriter.create(tmp_path, {"method": "sft"}, "r")
    (run.path / "status.json").write_text(json.dumps({"state": "finished", "created": "yesterday"}))
    with pytest.raises(TraceError, match="created"):
        run_state(run.path)
    assert list(list_runs(tmp_path)["state"]) == ["corrupt"]


def test_a_forged_checkpoint_state_is_refused_and_beta_stays_in_bounds():
    import torch

    from staysafe.risk import RiskError, RiskPolicy

    options = RunSpec(method="adaptive", beta_min=0.05, beta_max=0.9, risk_ema=0.5)
    policy = RiskPolicy(options)
    with pytest.raises(RiskError, match="ema = 50"):
        policy.load_state_dict({"ema": 50})
    for drift in (1e9, float("nan"), "1", True):  # adaptive-drift's reading, as forged
        with pytest.raises(RiskError, match="drift = "):
            policy.load_state_dict({"ema": 0.5, "drift": drift})
    policy.ema = 50.0  # however it got there, the step refuses to train with it
    with pytest.raises(RiskError, match="left"):
        policy.beta(torch.tensor([0.5, 0.5]))


def test_resuming_a_run_with_a_forged_state_fails_it_before_any_step(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_records(16)))
    runs = tmp_path / "runs"
    args = [*TINY_RUN, "--data", str(data), "--method", "adaptive", "--risk-ema", "0.5", "--steps", "4",
            "--checkpoint-every", "2", "--runs-dir", str(runs), "--run-id", "v", "--eval-every", "0"]
    assert main(["train", *args]) == 0
    state = runs / "v" / "checkpoints" / "checkpoint-4" / "staysafe_state.json"
    state.write_text(json.dumps({"ema": 50, "last": 0.3}))
    with pytest.raises(StaySafeError, match="ema = 50"):
        from staysafe.runner import run_training

        run_training(resume=runs / "v", progress=False, log=lambda *a: None)
    assert run_state(runs / "v")["state"] == "failed"
    assert load_run(runs / "v").steps["beta"].between(0.05, 0.9).all()


# ------------------------------------------------------------------------------------ 5. checked before work


@pytest.mark.parametrize("flags, message", [
    (["--seed", "4294967296"], "seed = 4294967296"),
    (["--report-to", "bogus"], "report_to"),
    (["--eval-temperature", "1e-300"], "eval_temperature"),
    (["--threads", "100000000000"], "threads"),
    (["--run-id", "ok\n"], "run_id"),
])
def test_values_that_fail_deep_in_libraries_stop_before_the_run_directory(tmp_path, capsys, flags, message):
    runs = tmp_path / "runs"
    assert main(["train", *TINY_RUN, "--runs-dir", str(runs), *flags]) == 2
    assert message in capsys.readouterr().err and not runs.exists()


def test_a_bad_probe_file_stops_before_the_run_directory(tmp_path, capsys):
    meta = {"format": "staysafe-probe/1", "layers": [1], "hidden_size": 4, "intercept": 0.0, "weights": "w.npz"}
    (tmp_path / "p.json").write_text(json.dumps(meta))
    np.savez(tmp_path / "w.npz", mean=np.array(["a"] * 4), scale=np.array(["b"] * 4), coef=np.array(["c"] * 4))
    runs = tmp_path / "runs"
    base = ["train", *TINY_RUN, "--runs-dir", str(runs), "--method", "adaptive", "--risk", "probe"]
    assert main([*base, "--probe", str(tmp_path / "p.json")]) == 2
    assert "floating-point" in capsys.readouterr().err and not runs.exists()
    np.savez(tmp_path / "w.npz", **{k: np.zeros(64, np.float32) for k in ("mean", "scale", "coef")})
    (tmp_path / "p.json").write_text(json.dumps({**meta, "layers": [99], "hidden_size": 64}))
    assert main([*base, "--probe", str(tmp_path / "p.json")]) == 2
    assert "layer 99 does not exist" in capsys.readouterr().err and not runs.exists()


# ------------------------------------------------------------------------------------ 6. roots, ids, flags, help


def test_a_config_file_does_not_choose_where_the_run_goes(tmp_path):
    from staysafe.cli import build_parser, spec_from_cli

    config = tmp_path / "c.json"
    config.write_text(json.dumps({"runs_dir": "/tmp/elsewhere", "run_id": "x", "steps": 3}))
    argv = ["train", "--config", str(config)]
    spec = spec_from_cli(build_parser().parse_args(argv), argv)
    assert spec.steps == 3 and spec.runs_dir == (os.environ.get("STAYSAFE_RUNS") or "runs") and spec.run_id is None


def test_resume_refuses_flags_it_would_ignore(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--lr", "5", "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "--lr" in err and "--steps" in err and "ignore" in err


def test_ids_with_a_trailing_newline_are_refused(tmp_path):
    from staysafe.queue.store import JOB_ID
    from staysafe.runs.traces import RUN_ID

    assert not RUN_ID.match("run\n") and not JOB_ID.match("1234567890123-train-x\n")
    with pytest.raises(SpecError):
        RunSpec(run_id="ok\n").validate()


def test_every_help_text_renders():
    for command in ("train", "experiment", "queue", "runs", "safelora", "validate-judges"):
        out = subprocess.run([sys.executable, "-m", "staysafe.cli", command, "--help"], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and "%(" not in out.stdout and "{'" not in out.stdout, (command, out.stderr)
    train = subprocess.run([sys.executable, "-m", "staysafe.cli", "train", "--help"], capture_output=True, text=True)
    assert "p% harmful" in " ".join(train.stdout.split())


def test_a_summary_of_a_run_without_evaluations_is_a_named_error(tmp_path):
    from staysafe.experiment import run_summary

    run = RunWriter.create(tmp_path, {"method": "sft"}, "r")
    run.set_status("finished")
    with pytest.raises(TraceError, match="no evaluations"):
        run_summary(load_run(run.path), 0.5)


def test_the_dashboard_binds_loopback_from_any_directory():
    """Streamlit reads the config beside the script, so started from anywhere the server listens on 127.0.0.1."""
    import tomllib

    repo = Path(__file__).resolve().parent.parent
    beside = tomllib.loads((repo / "dashboard" / ".streamlit" / "config.toml").read_text())
    assert beside["server"]["address"] == "127.0.0.1"
    assert beside == tomllib.loads((repo / ".streamlit" / "config.toml").read_text())


parquet_columns = st.dictionaries(
    st.sampled_from(["step", "slot", "prompt_id", "asr_keyword", "beta", "loss", "response", "other"]),
    st.one_of(st.lists(st.integers(-5, 5), min_size=1, max_size=3), st.lists(st.text(max_size=5), min_size=1,
                                                                                max_size=3),
              st.lists(st.floats(allow_nan=True), min_size=1, max_size=3), st.lists(st.none(), min_size=1, max_size=3)),
    min_size=1, max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(columns=parquet_columns, name=st.sampled_from(["steps", "evals", "examples", "generations"]))
def test_any_foreign_parquet_part_is_read_or_skipped_and_named(tmp_path_factory, columns, name):
    from staysafe.runs.traces import TABLES

    run = RunWriter.create(tmp_path_factory.mktemp("runs"), {"method": "sft"}, "r")
    run.set_status("finished")
    table = run.path / f"{name}.parquet"
    table.mkdir()
    n = min(len(v) for v in columns.values())
    try:
        pd.DataFrame({k: v[:n] for k, v in columns.items()}).to_parquet(table / "0001-00000000-00000000.parquet")
    except Exception:  # pyarrow cannot write this mix: nothing to read
        return
    damaged: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a skipped part warns; what counts is that it is named in `damaged`
        frame = read_table(table, TABLES[name], damaged)
    assert damaged or all(k in frame for k in TABLES[name])
    list_runs(run.path.parent)  # never raises


npz_arrays = st.dictionaries(st.sampled_from(["mean", "scale", "coef", "other"]),
                             st.one_of(st.lists(st.floats(allow_nan=True), max_size=6),
                                       st.lists(st.text(max_size=3), max_size=6),
                                       st.lists(st.integers(-3, 3), max_size=6)), max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(meta=field_values | json_values, arrays=npz_arrays)
def test_any_foreign_probe_file_is_a_named_error(tmp_path_factory, meta, arrays):
    from staysafe.probe import Probe, ProbeError

    d = tmp_path_factory.mktemp("probe")
    base = {"format": "staysafe-probe/1", "layers": [1], "hidden_size": 2, "intercept": 0.0, "weights": "w.npz"}
    (d / "p.json").write_text(json.dumps({**base, **meta} if isinstance(meta, dict) else meta))
    np.savez(d / "w.npz", **{k: np.array(v) for k, v in arrays.items()})
    try:
        probe = Probe.load(d / "p.json", hidden_size=2, num_layers=4)
    except ProbeError:
        return
    assert all(np.isfinite(a).all() and a.dtype.kind == "f" for a in (probe.mean, probe.scale, probe.coef))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(desc=field_values | json_values)
def test_any_foreign_experiment_description_is_read_or_named(tmp_path_factory, desc):
    from staysafe.experiment import list_experiments, load_experiment

    root = tmp_path_factory.mktemp("exps")
    (root / "e").mkdir()
    (root / "e" / "experiment.json").write_text(json.dumps(desc))
    for path in list_experiments(root):
        try:
            load_experiment(path)
        except StaySafeError:
            pass


def test_the_dashboard_server_listens_on_loopback_whatever_the_current_directory_says(tmp_path):
    """Started from a directory whose .streamlit/config.toml says 0.0.0.0, the server binds 127.0.0.1 only (the
    config beside the script wins), so no socket is ever open to the network that nobody asked for."""
    import socket

    repo = Path(__file__).resolve().parent.parent
    (tmp_path / ".streamlit").mkdir()
    (tmp_path / ".streamlit" / "config.toml").write_text('[server]\naddress = "0.0.0.0"\nheadless = true\n')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(repo / "dashboard" / "app.py"),
                             "--server.port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not (found := _listeners(port)):
            assert proc.poll() is None and time.monotonic() < deadline, "the dashboard did not start"
            time.sleep(0.2)
        assert found == {"127.0.0.1"}, found
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _listeners(port: int) -> set[str]:
    """Local addresses listening on ``port`` (from /proc/net/tcp and tcp6)."""
    import ipaddress

    out = set()
    for table, size in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # LISTEN
                raw = bytes.fromhex(addr)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # per-word little endian
                out.add(str(ipaddress.ip_address(raw)))
    return out
