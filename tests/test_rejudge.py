"""staysafe rejudge on real tiny-model runs: a run judged afterwards records what a run judged live records; the
old columns stay; a re-judge killed at any point leaves a readable run; a running run is refused; an experiment's
results are rebuilt from its re-judged runs."""

from __future__ import annotations

import os
import signal

import numpy as np
import pandas as pd
import pytest

from conftest import paused_cli
from staysafe.cli import main
from staysafe.runner import RunSpec, run_training
from staysafe.runs.traces import load_run

TINY = dict(model="tiny", lora_r=0, batch_size=4, max_length=64, steps=2, eval_every=2, eval_harmful=4,
            eval_benign=2, max_new_tokens=4, record_judge=False, save_model=False, risk="label", method="sft")
JUDGE = "embedding-response"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny run twice: judged live by the embedding-response judge, and with keyword ASR only."""
    root = tmp_path_factory.mktemp("rejudge") / "runs"
    for run_id, judges in (("live", [JUDGE]), ("plain", [])):
        run_training(RunSpec(**TINY, eval_judges=judges, eval_samples=2, runs_dir=str(root), run_id=run_id),
                     progress=False, log=lambda *a: None)
    return root


def copy_of(runs, tmp_path, name="plain"):
    import shutil

    shutil.copytree(runs / name, tmp_path / name)
    return tmp_path / name


def test_a_rejudged_run_records_what_a_live_judge_recorded(runs, tmp_path):
    plain = copy_of(runs, tmp_path)
    before = load_run(plain)
    assert main(["rejudge", str(plain), "--judges", JUDGE]) == 0
    after, live = load_run(plain), load_run(runs / "live")
    columns = ["asr_embedding_response", "failed_embedding_response", "asr_sampled_embedding_response",
               "asr_at_k_embedding_response"]
    pd.testing.assert_frame_equal(after.evals[["step", *columns]], live.evals[["step", *columns]],
                                  check_dtype=False)
    for col in before.evals.columns:  # the old columns stay as they were
        pd.testing.assert_series_equal(after.evals[col], before.evals[col], check_dtype=False)
    np.testing.assert_allclose(after.generations["score_embedding_response"],
                               live.generations["score_embedding_response"], equal_nan=True)
    assert after.samples["score_embedding_response"].notna().sum() == (after.samples["kind"] == "harmful").sum()


@pytest.mark.parametrize("point", ["rejudge@swap", "rejudge@evals"])
def test_a_rejudge_killed_at_any_point_leaves_a_readable_run(runs, tmp_path, point):
    plain = copy_of(runs, tmp_path)
    before = load_run(plain)
    proc = paused_cli(["rejudge", str(plain), "--judges", JUDGE], point, tmp_path / "log", pause=120)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = load_run(plain)
    assert not killed.damaged
    pd.testing.assert_frame_equal(killed.evals, before.evals)  # no figure changed
    if point == "rejudge@swap":
        pd.testing.assert_frame_equal(killed.generations, before.generations)
    else:  # generations swapped in whole, evals not yet: only an extra score column
        assert list(killed.generations.columns) == [*before.generations.columns, "score_embedding_response"]
    assert main(["rejudge", str(plain), "--judges", JUDGE]) == 0  # and it can be done again
    assert "asr_embedding_response" in load_run(plain).evals


def test_a_running_run_and_a_foreign_folder_are_refused(runs, tmp_path, capsys):
    from staysafe.runs import process

    plain = copy_of(runs, tmp_path)
    lock = process.LifeLock(plain / process.LOCK_NAME)
    try:
        assert main(["rejudge", str(plain), "--judges", JUDGE]) != 0
        assert "is running" in capsys.readouterr().err
    finally:
        lock.release()
    assert main(["rejudge", str(tmp_path), "--judges", JUDGE]) != 0
    assert "neither a run directory" in capsys.readouterr().err
    assert main(["rejudge", str(plain), "--judges", "embedding"]) != 0  # a request judge cannot judge answers
    assert "asr_embedding" not in load_run(plain).evals


def test_an_experiment_is_rebuilt_from_its_rejudged_runs(tmp_path):
    from staysafe.experiment import ExperimentSpec, run_experiment

    overrides = {k: v for k, v in TINY.items() if k not in ("model", "method")}
    out = run_experiment(ExperimentSpec(scenario="harmful", methods=["sft", "constant-kl"], model="tiny",
                                        out_dir=str(tmp_path / "exp"), runs_dir=str(tmp_path / "runs"),
                                        experiment_id="e", overrides={**overrides, "eval_judges": []}),
                         log=lambda *a: None)
    assert "final_asr_embedding_response" not in pd.read_parquet(out / "results.parquet")
    assert main(["rejudge", str(out), "--judges", JUDGE, "--runs-dir", str(tmp_path / "runs")]) == 0
    results = pd.read_parquet(out / "results.parquet")
    for col in ("final_asr_embedding_response", "final_asr_embedding_response_lo", "reference_asr_embedding_response"):
        assert results[col].notna().all(), col
    assert "embedding_response" in (out / "results.md").read_text()
    run = load_run(tmp_path / "runs" / "e-sft-s0")
    assert results.set_index("method").at["sft", "final_asr_embedding_response"] == \
        run.evals.sort_values("step")["asr_embedding_response"].iloc[-1]
