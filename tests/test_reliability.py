"""What happens when things go wrong: kills at chosen moments, resume, judge outages, concurrent launches,
untrusted files and secrets, fuzzed loaders."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, make_records, paused_cli
from staysafe.data import DataError, load_records, normalize_record
from staysafe.options import spec_flags as spec_arguments
from staysafe.runner import RunSpec, SpecError, latest_checkpoint, run_training
from staysafe.runs.traces import load_run


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tiny_spec(tmp_path, **kw) -> RunSpec:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "train.jsonl", make_records(40))
    base = dict(model="tiny", data=str(data), scenario=None, lora_r=0, batch_size=4, max_length=64, steps=8,
                eval_every=0, eval_harmful=0, eval_benign=0, eval_judges=[], record_judge=False, risk="label",
                save_model=False, runs_dir=str(tmp_path / "runs"), lr=1e-3)
    base.update(kw)
    return RunSpec(**base)


def spec_flags(spec: RunSpec) -> list[str]:
    """The run's ``staysafe train`` flags, encoded as the launch queue encodes them."""
    return spec_arguments(spec) + (["--run-id", spec.run_id] if spec.run_id else []) + ["--runs-dir", spec.runs_dir]


# ----------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("lora_r,method,more", [
    (0, "adaptive", {}), (4, "constant-kl", {}),
    # the checkpoint after step 3 falls inside a user phase whose anchor was taken at step 2
    (4, "lisa", {"lisa_align_steps": 2, "lisa_user_steps": 2, "lisa_rho": 50.0}),
    # the canary drift read at step 2 holds until step 4's reading: the checkpoint after step 3 must keep it
    (0, "adaptive-drift", {"drift_every": 2})])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, lora_r, method, more):
    """Kill after a checkpoint, resume: the trace rows equal those of a run that was never interrupted."""
    full = load_run(run_training(tiny_spec(tmp_path / "a", lora_r=lora_r, method=method, risk_ema=0.5,
                                           checkpoint_every=3, **more), progress=False))
    spec = tiny_spec(tmp_path / "b", lora_r=lora_r, method=method, risk_ema=0.5, checkpoint_every=3, run_id="cut",
                     **more)
    run_dir = Path(spec.runs_dir) / "cut"
    kill_at(spec, "step@5", tmp_path / "log")
    assert load_run(run_dir).status["state"] == "interrupted"
    assert latest_checkpoint(run_dir).name == "checkpoint-3"
    resumed = load_run(run_training(resume=run_dir, progress=False))
    assert resumed.status["state"] == "finished"
    a, b = full.steps.set_index("step"), resumed.steps.set_index("step")
    assert list(b.index) == list(range(1, 9))
    for col in ("loss", "nll", "kl", "beta", "risk", *(("drift",) if "drift" in a else ())):  # constant-kl has
        # no risk: NaN on both sides
        np.testing.assert_allclose(a[col], b[col], rtol=0, atol=1e-6, equal_nan=True, err_msg=col)
    ea = full.examples.set_index(["step", "slot"])["example_index"]
    eb = resumed.examples.set_index(["step", "slot"])["example_index"]
    assert ea.equals(eb)  # same data position after resume


def kill_at(spec: RunSpec, point: str, log: Path, timeout: float = 300) -> None:
    """Run ``staysafe train`` in a subprocess and SIGKILL it while it pauses at a fault-injection point."""
    proc = paused_cli(["train", *spec_flags(spec)], point, log, timeout, pause=120)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("point", ["checkpoint@4", "eval@3"])
def test_kill_during_checkpoint_write_or_evaluation(tmp_path, point):
    spec = tiny_spec(tmp_path, checkpoint_every=2, eval_every=3, eval_harmful=2, eval_benign=2, max_new_tokens=2,
                     run_id="victim", steps=20)
    kill_at(spec, point, tmp_path / "log")
    run_dir = Path(spec.runs_dir) / "victim"
    run = load_run(run_dir)
    assert run.status["state"] == "interrupted"
    steps = run.steps["step"].tolist()
    if point.startswith("checkpoint"):
        # killed while writing checkpoint-4: steps 1..4 are readable; checkpoint-4 is incomplete and never resumed
        assert steps == [1, 2, 3, 4]
        assert (run_dir / "checkpoints" / "checkpoint-4").exists()
        assert latest_checkpoint(run_dir).name == "checkpoint-2"
    else:
        # killed inside the evaluation after step 3: steps 1..3 and the step-0 evaluation are readable
        assert steps == [1, 2, 3]
        assert run.evals["step"].tolist() == [0]
        assert set(run.generations["step"]) == {0}
    resumed = load_run(run_training(resume=run_dir, progress=False))
    assert resumed.steps["step"].tolist() == list(range(1, 21)) and resumed.status["state"] == "finished"


# ----------------------------------------------------------------------------------------------- judge outage


class FlakyJudgeServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible stub: rates 5 for 'harmful' text, fails (HTTP 500) on requests mentioning
    'item number 1'."""

    seen_auth: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen_auth.append(self.headers.get("Authorization"))
        text = json.dumps(body["messages"])
        if "item number 1" in text:  # items 1, 10..19: the backend is down for them
            self.send_response(500)
            self.end_headers()
            return
        reply = {"choices": [{"message": {"content": "2"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def flaky_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyJudgeServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_judge_down_for_some_examples_falls_back_flags_and_keeps_secrets(tmp_path, flaky_server, monkeypatch):
    secret = "sk-test-DO-NOT-LEAK-4242"
    monkeypatch.setenv("STAYSAFE_TEST_JUDGE_KEY", secret)
    monkeypatch.setenv("STAYSAFE_HOME", str(tmp_path / "home"))
    from staysafe.judges.endpoint import JudgeEndpoint

    spec = tiny_spec(tmp_path, method="adaptive", risk="judge", judge="openai", risk_fallback="last",
                     per_example_beta=False, steps=6)
    endpoint = JudgeEndpoint(flaky_server, "guard", "STAYSAFE_TEST_JUDGE_KEY")
    run = load_run(run_training(spec, progress=False, log=lambda *a: None, endpoint=endpoint))
    assert run.status["state"] == "finished"
    failed_ids = set(run.data.loc[run.data["risk_judge"].isna(), "example_id"])
    assert failed_ids == {"r1"} | {f"r{i}" for i in range(10, 20)}
    ex = run.examples.merge(run.data[["example_index", "example_id"]], on="example_index")
    assert ex.loc[ex["example_id"].isin(failed_ids), "fallback"].all()
    assert not ex.loc[~ex["example_id"].isin(failed_ids), "fallback"].any()
    assert run.steps["n_fallback"].sum() == ex["fallback"].sum() > 0
    assert run.config["risk_scoring"]["failed"] == len(failed_ids)
    assert f"Bearer {secret}" in FlakyJudgeServer.seen_auth
    for path in Path(run.path).rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


# ----------------------------------------------------------------------------------------------- concurrency


def test_two_launches_never_share_a_directory(tmp_path):
    spec = tiny_spec(tmp_path, steps=3, run_id="same")
    cmd = [sys.executable, "-m", "staysafe.cli", "train", *spec_flags(spec)]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    assert any("already exists" in err for _, err in results)
    run = load_run(Path(spec.runs_dir) / "same")
    assert run.steps["step"].tolist() == [1, 2, 3] and run.status["state"] == "finished"
    a, b = (run_training(tiny_spec(tmp_path, steps=1), progress=False) for _ in range(2))
    assert a != b


# ----------------------------------------------------------------------------------------------- bad input


def test_long_prompt_is_truncated_with_a_record_not_dropped(tmp_path):
    recs = make_records(8)
    recs[3]["messages"][0]["content"] = "an extremely long request " * 100
    spec = tiny_spec(tmp_path, steps=2, max_length=128)  # room for every record but the long one
    write_jsonl(Path(spec.data), recs)
    run = load_run(run_training(spec, progress=False))
    assert run.data.set_index("example_id").loc["r3", "truncated"]
    assert run.data["truncated"].sum() == 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["id", "prompt", "response", "messages", "label", "category", "x"]),
                       st.one_of(st.none(), st.text(max_size=20), st.integers(), st.floats(allow_nan=True),
                                 st.lists(st.dictionaries(st.sampled_from(["role", "content"]),
                                                          st.one_of(st.text(max_size=8),
                                                                    st.sampled_from(["user", "assistant", "system"]))),
                                          max_size=3)),
                       max_size=6))
def test_fuzz_record_normalisation_only_raises_data_errors(raw):
    try:
        rec = normalize_record(raw, "fuzz.jsonl:1", "fuzz-0")
    except DataError as err:
        assert str(err).startswith("fuzz.jsonl:1:")
        return
    assert rec["messages"][-1]["role"] == "assistant" and rec["label"] in (None, "harmful", "benign")


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([".jsonl", ".csv", ".parquet"]))
def test_fuzz_data_files_only_raise_data_errors(tmp_path_factory, content, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"d{suffix}"
    path.write_bytes(content)
    try:
        load_records(str(path))
    except DataError as err:
        assert "d" + suffix in str(err)


SPEC_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
                        st.text(max_size=8), st.lists(st.text(max_size=4), max_size=2))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from([f for f in RunSpec.__dataclass_fields__]), SPEC_VALUES, max_size=5))
def test_fuzz_run_options_only_raise_spec_errors(values):
    try:
        RunSpec(**values).validate()
    except SpecError as err:
        assert re.search(r"^(option )?\w+ = |beta_min|calibration|risk_ema|cannot be combined", str(err)), str(err)


def test_unknown_option_in_a_config_file_is_named():
    with pytest.raises(SpecError, match=r"unknown option\(s\) \['stepz'\]"):
        RunSpec.from_dict({"stepz": 3})


# ----------------------------------------------------------------------------------------------- security


def test_no_pickle_anywhere_in_the_code():
    offenders = []
    for path in list((REPO / "staysafe").rglob("*.py")) + list((REPO / "dashboard").rglob("*.py")):
        text = path.read_text()
        for pattern in (r"\bimport pickle\b", r"\bpickle\.", r"\bjoblib\b", r"allow_pickle\s*=\s*True",
                        r"torch\.load\((?![^)]*weights_only\s*=\s*True)", r"\bshell\s*=\s*True", r"os\.system\("):
            if re.search(pattern, text):
                offenders.append(f"{path.relative_to(REPO)}: {pattern}")
    assert not offenders, offenders


def test_dashboard_binds_to_localhost_by_default():
    import tomllib

    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"
