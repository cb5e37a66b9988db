"""Sweeps, resumable experiments and the safety-utility frontier, with real tiny-model runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO
from staysafe.eval.frontier import axes, frontier_points, judges, on_frontier
from staysafe.experiment import ExperimentSpec, resume_experiment, run_experiment
from staysafe.runs.traces import TraceError, load_run, write_json

TINY = dict(lora_r=0, batch_size=4, max_length=64, steps=2, eval_every=0, eval_harmful=2, eval_benign=2,
            max_new_tokens=2, eval_judges=[], record_judge=False, save_model=False, n_harmful=12, risk="label")


def spec(tmp_path, **kw):
    return ExperimentSpec(**{"scenario": "harmful", "model": "tiny", "out_dir": str(tmp_path / "exp"),
                             "runs_dir": str(tmp_path / "runs"), "experiment_id": "e", "overrides": dict(TINY), **kw})


def test_a_sweep_varies_an_option_only_for_the_methods_that_read_it(tmp_path):
    out = run_experiment(spec(tmp_path, methods=["sft", "constant-kl"], sweep={"beta": [0.1, 0.9]}),
                         log=lambda *a: None)
    results = pd.read_parquet(out / "results.parquet")
    assert sorted(results["run_id"]) == ["e-constant-kl-beta0.1-s0", "e-constant-kl-beta0.9-s0", "e-sft-s0"]
    kl = results[results["method"] == "constant-kl"].set_index("sweep_beta")
    assert kl.loc[0.1, "beta"] == 0.1 and kl.loc[0.9, "beta"] == 0.9  # swept, not matched to an adaptive beta
    assert load_run(tmp_path / "runs" / "e-constant-kl-beta0.9-s0").config["beta"] == 0.9
    points = frontier_points(results)
    assert len(points) == 3 and (points["method"] == "constant-kl").sum() == 2
    assert "constant-kl beta=0.1" in points["label"].tolist()
    table = (out / "results.md").read_text()  # one row per swept value, and each judge's kappa under its ASR
    assert "| constant-kl beta=0.1 | 1 |" in table and "| constant-kl beta=0.9 | 1 |" in table
    from staysafe.eval.validation import measured_agreement

    kw = measured_agreement()["keyword"]
    lo, hi = kw["kappa_interval"]
    assert f"| judge agreement (labelled test split) |  | κ {kw['kappa']:.2f} [{lo:.2f}, {hi:.2f}] |" in table
    html = (out / "frontier.html").read_text()
    assert "constant-kl" in html and "benign NLL" in html
    # ASR by another recorded judge on request (the default response judge first when recorded)
    two = results.assign(final_asr_embedding_response=1 - results["final_asr_keyword"])
    assert judges(results) == ["keyword"] and judges(two) == ["embedding_response", "keyword"]
    assert axes(two)[2] == "final_asr_embedding_response" and axes(two, "keyword")[2] == "final_asr_keyword"
    by_keyword = frontier_points(two, "keyword").set_index("label")["y"]
    assert by_keyword["sft"] == results.set_index("method").loc["sft", "final_asr_keyword"]
    with pytest.raises(KeyError, match="no ASR by the local-lm judge"):
        axes(two, "local-lm")


def test_a_sweep_reaches_the_methods_by_the_training_method_they_run():
    """adaptive-probe / -judge / -label train with method adaptive: a sweep of beta_max varies them (it once ran
    them once, at the default); sft and constant-kl do not read it."""
    from staysafe.experiment import sweep_points

    s = ExperimentSpec(methods=["adaptive-probe", "adaptive-token-wise", "sft"], sweep={"beta_max": [0.5, 0.9]})
    s.validate()
    assert sweep_points(s, "adaptive-probe") == sweep_points(s, "adaptive-token-wise") == [
        {"beta_max": 0.5}, {"beta_max": 0.9}]
    assert sweep_points(s, "sft") == [{}]


def test_a_bad_sweep_value_is_refused_before_any_run(tmp_path, monkeypatch):
    from staysafe.errors import StaySafeError
    from staysafe.options import SpecError

    monkeypatch.setenv("STAYSAFE_HOME", str(tmp_path / "home"))  # a home where the Vaccine reference is not built
    with pytest.raises(SpecError, match="vaccine set model themselves"):  # would have crashed at that run
        run_experiment(spec(tmp_path, methods=["sft", "vaccine"], sweep={"model": ["tiny"]}), log=lambda *a: None)
    with pytest.raises(StaySafeError, match="smollm2-135m-aligned-vaccine is not built"):  # said before any run
        run_experiment(spec(tmp_path, methods=["sft", "vaccine"]), log=lambda *a: None)

    with pytest.raises(SpecError, match="beta"):
        run_experiment(spec(tmp_path, methods=["constant-kl"], sweep={"beta": [0.5, 1.5]}), log=lambda *a: None)
    with pytest.raises(SpecError, match="--sweep no_such"):
        run_experiment(spec(tmp_path, methods=["sft"], sweep={"no_such": [1]}), log=lambda *a: None)
    assert not (tmp_path / "runs").exists()


def test_resume_keeps_finished_runs_and_runs_the_rest(tmp_path):
    out = run_experiment(spec(tmp_path, methods=["sft", "constant-kl"], seeds=2), log=lambda *a: None)
    runs = tmp_path / "runs"
    kept = (runs / "e-sft-s0" / "status.json").read_text()
    # as if the experiment had been killed: one run failed half-way, one never started, the experiment 'running'
    write_json(runs / "e-constant-kl-s1" / "status.json", {"state": "failed", "error": "killed"})
    import shutil

    shutil.rmtree(runs / "e-sft-s1")
    desc = json.loads((out / "experiment.json").read_text())
    write_json(out / "experiment.json", {**desc, "state": "running", "pid": 999999999})
    logs = []
    resume_experiment(tmp_path / "exp", "e", tmp_path / "runs", log=logs.append)
    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == 4 and json.loads((out / "experiment.json").read_text())["state"] == "finished"
    assert (runs / "e-sft-s0" / "status.json").read_text() == kept  # finished before: not run again
    assert load_run(runs / "e-sft-s1").status["state"] == "finished"
    assert load_run(runs / "e-constant-kl-s1").status["state"] == "finished"
    aside = [p.name for p in runs.iterdir() if p.name.startswith(".partial-e-constant-kl-s1")]
    assert len(aside) == 1  # the failed attempt is kept, out of the way
    assert any("finished before, kept" in line for line in logs)


def test_an_existing_experiment_is_not_overwritten_without_resume(tmp_path):
    from staysafe.options import SpecError

    run_experiment(spec(tmp_path, methods=["sft"]), log=lambda *a: None)
    with pytest.raises(SpecError, match="--resume e"):
        run_experiment(spec(tmp_path, methods=["sft"]), log=lambda *a: None)


def test_the_work_methods_share_is_done_once_with_the_same_results(tmp_path):
    """share_step0 evaluates the starting model once per experiment and copies it into every run, share_reference
    computes the reference's outputs on a batch once for the runs of a seed: the results and every trace are
    those of the unshared path to the last digit, the later runs of a seed computed no reference forward, and only
    the first run of a key spent the evaluation's time."""
    overrides = {**TINY, "eval_judges": ["embedding-response"], "eval_samples": 2, "steps": 3}
    methods = ["sft", "adaptive-probe", "constant-kl"]
    logs: list[str] = []
    shared = run_experiment(spec(tmp_path / "a", methods=methods, seeds=2, overrides=overrides), log=logs.append)
    alone = run_experiment(spec(tmp_path / "b", methods=methods, seeds=2, overrides=overrides, share_step0=False,
                                share_reference=False), log=lambda *a: None)
    a, b = (pd.read_parquet(p / "results.parquet").drop(columns="seconds_per_step") for p in (shared, alone))
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    for run_id in a["run_id"]:
        steps_a, steps_b = (load_run(tmp_path / x / "runs" / run_id).steps.drop(columns=["wall_time", "time"])
                            for x in "ab")
        pd.testing.assert_frame_equal(steps_a, steps_b, check_exact=True)
    reads = [line for line in logs if line.startswith("the reference's outputs")]
    assert reads == ["the reference's outputs: 3 batches computed, 0 shared with an earlier run",
                     "the reference's outputs: 0 batches computed, 3 shared with an earlier run"] * 2  # per seed
    assert len(list((shared / ".step0").iterdir())) == 2 and not (alone / ".step0").exists()  # one per seed
    first = {}
    for run_id in a["run_id"]:
        run = load_run(tmp_path / "a" / "runs" / run_id)
        step0 = run.evals[run.evals["step"] == 0].iloc[0]
        twin = load_run(tmp_path / "b" / "runs" / run_id)
        pd.testing.assert_frame_equal(run.generations[run.generations["step"] == 0].reset_index(drop=True),
                                      twin.generations[twin.generations["step"] == 0].reset_index(drop=True))
        first.setdefault(run.config["seed"], step0["wall_time"])
        if step0["wall_time"] != first[run.config["seed"]]:  # a copy: far quicker than the evaluation it copies
            assert step0["wall_time"] < first[run.config["seed"]] / 3


def test_a_planted_shared_evaluation_is_never_read_through_a_link(tmp_path):
    """The shared step-0 folder is inside the experiment (a runs folder may be shared): an entry or the folder
    itself replaced by a link to planted rows is ignored (the run evaluates itself), a FIFO or rows of the wrong
    types too, and nothing is written through a link."""
    import os

    from staysafe.eval.evaluation import SharedStep0
    from staysafe.options import RunSpec

    shared = SharedStep0(tmp_path / "exp" / ".step0", RunSpec(model="tiny"))
    planted = tmp_path / "planted"
    planted.mkdir()
    pd.DataFrame([{"step": 0, "asr_keyword": 0.0}]).to_parquet(planted / "evals.parquet")
    pd.DataFrame([{"step": 0, "prompt_id": "p", "kind": "harmful", "response": "planted"}]).to_parquet(
        planted / "generations.parquet")
    shared.path.parent.mkdir(parents=True)
    os.symlink(planted, shared.path)
    assert shared.load() is None
    shared.save({"step": 0, "asr_keyword": 1.0}, [{"step": 0, "prompt_id": "q", "kind": "harmful"}], [])
    assert pd.read_parquet(planted / "evals.parquet")["asr_keyword"].tolist() == [0.0]  # not written through
    os.unlink(shared.path)
    os.rmdir(shared.path.parent)
    os.symlink(planted.parent, shared.path.parent)  # the whole .step0 folder a link
    assert shared.load() is None
    os.unlink(shared.path.parent)
    shared.path.mkdir(parents=True)
    os.mkfifo(shared.path / "evals.parquet")
    assert shared.load() is None  # named, never waited on
    os.unlink(shared.path / "evals.parquet")
    pd.DataFrame([{"step": "zero"}]).to_parquet(shared.path / "evals.parquet")
    pd.DataFrame([{"step": 0, "prompt_id": "p"}]).to_parquet(shared.path / "generations.parquet")
    assert shared.load() is None


def test_an_experiment_is_summarised_again_from_its_runs(tmp_path):
    """summarise_again rebuilds results.parquet / results.md from the runs as they are now (the recorded demo got
    its intervals this way): same numbers, the columns added since, each row's method and seed kept."""
    from staysafe.experiment import summarise_again

    out = run_experiment(spec(tmp_path, methods=["sft", "constant-kl"]), log=lambda *a: None)
    full = pd.read_parquet(out / "results.parquet")
    old = full.drop(columns=[c for c in full if c.endswith(("_lo", "_hi"))])
    old.to_parquet(out / "results.parquet")
    (out / "results.md").write_text("stale")
    desc = json.loads((out / "experiment.json").read_text())
    (out / "experiment.json").write_text(json.dumps({**desc, "base": {**desc["base"], "beta_min": [[[]]]}}))
    with pytest.raises(TraceError, match="experiment.json: base beta_min"):  # a foreign description: named
        summarise_again(out, tmp_path / "runs")
    (out / "experiment.json").write_text(json.dumps(desc))
    again = summarise_again(out, tmp_path / "runs")
    pd.testing.assert_frame_equal(again[full.columns.tolist()], full, check_like=True)
    assert again.equals(pd.read_parquet(out / "results.parquet")) and "| sft | 1 |" in (out / "results.md").read_text()


def test_frontier_bars_say_what_they_are_and_the_reference_is_a_point():
    """Several seeds: ± std; one seed: the run's interval over prompts where recorded, else "no interval" in
    words (never a zero spread); the starting model is its own point with its interval."""
    from staysafe.eval.frontier import frontier_figure, reference_point

    results = pd.DataFrame({
        "method": ["sft", "sft", "constant-kl"], "seed": [0, 1, 0], "run_id": ["a", "b", "c"],
        "benign_nll": [2.0, 2.2, 1.9], "final_asr_keyword": [0.8, 0.6, 0.1],
        "final_asr_keyword_lo": [0.7, 0.5, 0.02], "final_asr_keyword_hi": [0.9, 0.7, 0.2],
        "reference_benign_nll": [2.1, 2.1, 2.1], "reference_asr_keyword": [0.1, 0.1, 0.1],
        "reference_asr_keyword_lo": [0.0, 0.0, 0.0], "reference_asr_keyword_hi": [0.3, 0.3, 0.3]})
    points = frontier_points(results).set_index("method")
    assert points.at["sft", "spread"] == "± std over 2 seeds"
    assert points.at["sft", "y_lo"] == pytest.approx(0.7 - 0.1414, abs=1e-3)
    assert points.at["constant-kl", "spread"] == "95% interval over prompts (one seed)"
    assert (points.at["constant-kl", "y_lo"], points.at["constant-kl", "y_hi"]) == (0.02, 0.2)
    bare = results.drop(columns=[c for c in results if c.endswith(("_lo", "_hi"))])
    assert frontier_points(bare).set_index("method").at["constant-kl", "spread"] == "one seed: no interval"
    ref = reference_point(results)
    assert (ref["x"], ref["y"], ref["y_lo"], ref["y_hi"]) == pytest.approx((2.1, 0.1, 0.0, 0.3))
    fig = frontier_figure(results)
    assert fig.data[0].name == "reference (step 0)" and fig.data[0].error_y.array[0] == pytest.approx(20)


def test_pareto_front_of_points():
    points = pd.DataFrame({"x": [0.9, 0.8, 0.5, 0.7], "y": [0.5, 0.2, 0.1, 0.3]})
    assert on_frontier(points, higher_x_is_better=True).tolist() == [True, True, True, False]
    assert on_frontier(points, higher_x_is_better=False).tolist() == [False, False, True, False]


def test_asr_saved_at_equal_task_accuracy_is_read_off_constant_kls_curve_per_seed():
    """Constant-kl's sweep (sft its beta = 0 end) is a curve per seed; a method is compared with it at its own task
    accuracy, linearly between the curve's points, never extrapolated; frontier membership is per seed."""
    from staysafe.eval.frontier import curve_asr_at, frontier_by_seed, mean_interval, paired_with_curve

    rows = [("sft", 0, None, 1.0, 0.9), ("constant-kl", 0, 0.1, 0.9, 0.5), ("constant-kl", 0, 0.9, 0.5, 0.1),
            ("adaptive-probe", 0, None, 0.7, 0.1), ("adaptive-probe", 0, None, 0.4, 0.0),  # the second: outside
            ("sft", 1, None, 1.0, 0.8), ("constant-kl", 1, 0.1, 0.8, 0.4), ("constant-kl", 1, 0.9, 0.8, 0.2),
            ("adaptive-probe", 1, None, 0.9, 0.2)]
    results = pd.DataFrame([{"method": m, "seed": s, "sweep_beta": b, "final_task_accuracy": x,
                             "final_asr_keyword": y, "run_id": f"r{i}"} for i, (m, s, b, x, y) in enumerate(rows)])
    assert curve_asr_at(results, 0, 0.7) == pytest.approx(0.3)  # halfway between (0.5, 0.1) and (0.9, 0.5)
    assert curve_asr_at(results, 1, 0.8) == pytest.approx(0.3)  # two points at one accuracy: their mean ASR
    assert curve_asr_at(results, 1, 0.9) == pytest.approx(0.55)
    assert math.isnan(curve_asr_at(results, 0, 0.4)) and math.isnan(curve_asr_at(results, 0, 1.01))
    paired = paired_with_curve(results)
    assert paired["saved"].tolist()[0] == pytest.approx(0.2) and math.isnan(paired["saved"].tolist()[1])
    assert paired["saved"].tolist()[2] == pytest.approx(0.35)
    mean, lo, hi, n = mean_interval(paired["saved"])
    assert n == 2 and mean == pytest.approx(0.275) and lo < mean < hi
    flags = frontier_by_seed(results).set_index("run_id")["on_frontier"]
    assert flags.to_dict() == {"r0": True, "r1": True, "r2": False, "r3": True, "r4": True,
                               "r5": True, "r6": False, "r7": False, "r8": True}


def test_sampled_measures_are_not_listed_as_judges(tmp_path):
    """With --eval-samples the evaluations hold asr_at_k_<judge> and asr_sampled_<judge>: the results table, the
    frontier and the dashboard list only the real judges (once they read 'at_k_keyword' as a judge)."""
    from staysafe.eval.frontier import judges
    from staysafe.experiment import markdown_table
    from staysafe.runs import trace_names

    out = run_experiment(spec(tmp_path, methods=["sft", "constant-kl"],
                              overrides={**TINY, "eval_samples": 2, "eval_judges": ["embedding-response"]}),
                         log=lambda *a: None)
    results = pd.read_parquet(out / "results.parquet")
    evals = load_run(tmp_path / "runs" / "e-sft-s0").evals
    assert {"asr_at_k_keyword", "asr_sampled_keyword"} <= set(evals.columns)
    assert trace_names.judges(evals.columns) == ["embedding_response", "keyword"]
    assert judges(results) == ["embedding_response", "keyword"]  # the default judge first
    assert "final_asr_at_k_keyword" in results and "at_k" not in markdown_table(results).split("\n")[0]


def test_an_experiment_goes_through_the_run_lifecycle_when_cancelled(tmp_path):
    """SIGTERM during one of its runs: that run and the experiment both end 'cancelled' (the experiment's own
    description says so, with the runs so far), through the same lifecycle as a run."""
    import signal

    from conftest import paused_cli

    sets = [f"--set={k}={','.join(v) if isinstance(v, list) else v}" for k, v in TINY.items()]
    proc = paused_cli(["experiment", "--model", "tiny", "--methods", "sft,constant-kl", "--id", "e", "--out-dir",
                       str(tmp_path / "exp"), "--runs-dir", str(tmp_path / "runs"), *sets], "step@1", tmp_path / "log")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    desc = json.loads((tmp_path / "exp" / "e" / "experiment.json").read_text())
    assert desc["state"] == "cancelled" and "SIGTERM" in desc["error"]
    assert load_run(tmp_path / "runs" / "e-sft-s0").status["state"] == "cancelled"


@pytest.mark.parametrize("name", ["frontier-headlines-mixed10", "frontier-headlines-benign",
                                  "frontier-headlines-mixed5", "frontier-harmful"])
def test_the_readmes_frontier_tables_are_what_the_report_prints_from_the_shipped_results(name):
    """Every row of the two tables benchmarks/frontier_report.py prints from a shipped frontier (the summary and the
    ASR saved at equal utility: task accuracy, or benign NLL on harmful) is in the README as printed: re-judging or
    re-running a frontier without updating the README fails here."""
    folder = REPO / "benchmarks" / "results" / name
    printed = subprocess.run([sys.executable, str(REPO / "benchmarks" / "frontier_report.py"), str(folder),
                              "--judge", "reader", "--judge", "keyword"], capture_output=True, text=True,
                             check=True, cwd=REPO).stdout
    rows = [row for row in printed.splitlines() if row.startswith("|")]  # the summary and the paired table
    readme = (REPO / "README.md").read_text()
    assert len(rows) >= 20 and [row for row in rows if row not in readme] == []
