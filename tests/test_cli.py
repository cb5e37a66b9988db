"""The staysafe command end to end on the tiny model; bad input is refused before any run directory exists."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_RUN, run_cli
from staysafe import list_runs, load_run
from staysafe.cli import main


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--scenario", "evil"],
            "option scenario = 'evil' is invalid: expected one of harmful, mixed, benign, identity-shift",
        ),
        (["--method", "dpo"], "option method = 'dpo' is invalid"),
        (["--beta", "1.5", "--method", "constant-kl"], "beta = 1.5 is invalid: expected a number in [0, 1]"),
        (["--beta-min", "0.9", "--beta-max", "0.1"], "beta_min = 0.9 is greater than beta_max = 0.1"),
        (["--steps", "0"], "option steps = 0 is invalid"),
        (["--lr", "-0.001"], "option lr = -0.001 is invalid"),
        (["--risk", "vibes"], "option risk = 'vibes' is invalid"),
        (["--data", "missing.jsonl"], "data file missing.jsonl does not exist"),
        (["--model", "no/such/model/dir"], "model path 'no/such/model/dir' does not exist"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_no_run(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)  # in-process (an uncaught exception fails the test); subprocess runs are below
    assert main(["train", *TINY_RUN, "--runs-dir", str(tmp_path / "runs"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or list_runs(tmp_path / "runs").empty


def test_malformed_data_line_is_named(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": oops}\n')
    res = run_cli("train", *TINY_RUN, "--runs-dir", str(tmp_path / "runs"), "--data", str(tmp_path / "d.jsonl"))
    assert res.returncode == 2 and "d.jsonl:2: not valid JSON" in res.stderr


def test_train_writes_all_trace_files_and_evaluations(tmp_path):
    res = run_cli("train", *TINY_RUN, "--runs-dir", str(tmp_path / "runs"), "--scenario", "harmful",
                  "--n-harmful", "16", "--steps", "5", "--eval-every", "2", "--method", "adaptive")
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list_runs(tmp_path / "runs")
    assert runs["state"].tolist() == ["finished"]
    run = load_run(runs["path"].iloc[0])
    for name in ("config.json", "status.json", "steps.parquet", "examples.parquet", "evals.parquet",
                 "generations.parquet", "data.parquet"):
        assert (run.path / name).exists(), name
    assert run.steps["step"].tolist() == [1, 2, 3, 4, 5]
    assert run.evals["step"].tolist() == [0, 2, 4, 5]  # step 0, every 2, and the last
    assert len(run.generations) == 4 * 8 and set(run.generations["kind"]) == {"harmful", "benign"}
    assert len(run.examples) == 5 * 4 and set(run.examples["example_index"]) <= set(run.data["example_index"])
    assert run.steps["beta"].tolist() == pytest.approx([0.9] * 5)  # all-harmful scenario, oracle risk -> beta_max
    config = json.loads((run.path / "config.json").read_text())
    assert config["seed"] == 0 and config["versions"]["torch"] and config["method"] == "adaptive"


def test_runs_and_models_commands(tmp_path):
    res = run_cli("runs", "--runs-dir", str(tmp_path / "none"))
    assert res.returncode == 0 and "no runs" in res.stdout
    res = run_cli("models")
    assert res.returncode == 0
    for name in ("smollm2-135m-instruct", "smollm2-135m-aligned", "tiny"):
        assert name in res.stdout


def test_experiment_set_passes_typed_options_to_every_run(tmp_path):
    res = run_cli("experiment", "--model", "tiny", "--methods", "sft,adaptive-label", "--steps", "2", "--id", "e",
                  "--out-dir", str(tmp_path / "exp"), "--runs-dir", str(tmp_path / "runs"),
                  "--set", "per_example_beta=true", "--set", "batch_size=2", "--set", "eval_every=0",
                  "--set", "eval_harmful=2", "--set", "eval_benign=2", "--set", "max_new_tokens=2",
                  "--set", "eval_judges=", "--set", "record_judge=false", "--set", "save_model=false",
                  "--set", "max_length=64")
    assert res.returncode == 0, res.stderr[-3000:]
    runs = [load_run(p) for p in list_runs(tmp_path / "runs")["path"]]
    assert len(runs) == 2
    for run in runs:
        assert run.config["per_example_beta"] is True and run.config["batch_size"] == 2
        assert run.config["eval_judges"] == [] and run.config["record_judge"] is False
        assert len(run.steps) == 2 and len(run.examples) == 4


@pytest.mark.parametrize("item,message", [("per_example_beta=maybe", "per_example_beta expects true or false"),
                                          ("steps=x", "argument --steps: invalid int value: 'x'"),
                                          ("stepz=3", "expected OPTION=VALUE with OPTION a train option"),
                                          ("lr", "expected OPTION=VALUE"),
                                          ("beta_max=2", "beta_max = 2.0 is invalid"),
                                          ("eval_harmful=0", "needs at least 1 held-out harmful prompt")])
def test_experiment_set_rejects_bad_options(tmp_path, capsys, item, message):
    assert main(["experiment", "--model", "tiny", "--steps", "2", "--out-dir", str(tmp_path / "exp"),
                 "--runs-dir", str(tmp_path / "runs"), "--set", item]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_preset_sets_train_defaults_that_flags_override(tmp_path):
    """``--preset live`` gives its options as defaults; a flag given explicitly wins (checked in config.json)."""
    import json

    from staysafe.presets import PRESETS

    out = run_cli("train", "--preset", "live", *TINY_RUN, "--steps", "2", "--runs-dir", str(tmp_path),
                  "--run-id", "p")
    assert out.returncode == 0, out.stderr
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["steps"] == 2  # explicit
    assert config["lr"] == PRESETS["live"].options["lr"] and config["eval_every"] == 0  # from the preset
    bad = run_cli("train", "--preset", "nope")
    assert bad.returncode == 2 and "invalid choice: 'nope'" in bad.stderr


def test_user_errors_are_named_and_print_no_traceback(tmp_path):
    """Every user error the library raises derives from StaySafeError, which the CLI prints as one line (exit 2);
    its built-in base (ValueError, FileExistsError, KeyError, ...) is kept for callers that catch that."""
    from staysafe.errors import StaySafeError
    from staysafe.judges import make_judge
    from staysafe.models.loading import resolve_precision
    from staysafe.risk import Calibration, ColumnRisk, RiskBatch

    for call, base in ((lambda: make_judge("gpt"), ValueError), (lambda: resolve_precision("fp8"), ValueError),
                       (lambda: Calibration("nope"), ValueError),
                       (lambda: ColumnRisk("judge")(RiskBatch(inputs={})), KeyError)):
        with pytest.raises(StaySafeError) as err:
            call()
        assert isinstance(err.value, base)
    common = [*TINY_RUN, "--steps", "1", "--n-harmful", "4", "--runs-dir", str(tmp_path), "--run-id", "dup"]
    assert run_cli("train", *common).returncode == 0
    again = run_cli("train", *common)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
