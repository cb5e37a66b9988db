"""The Launch page guides a new user: only the chosen method's options, a time estimate before queueing, the live
preset first, a warning on the test model, cancelled jobs kept in the list."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_dashboard import assert_clean, open_page, point_env, texts

WIDGETS = ("selectbox", "multiselect", "number_input", "checkbox", "text_input")


@pytest.fixture
def roots(monkeypatch, tmp_path) -> dict:
    """Empty data roots for the dashboard (every root set by environment)."""
    roots = {n: tmp_path / n for n in ("runs", "experiments", "compare", "probes", "demo")}
    point_env(monkeypatch, roots)
    return roots


def timed_run(root: Path, run_id: str, model: str, step_seconds: float, eval_seconds: float) -> None:
    """A finished run of ``model`` whose 4 steps took ``step_seconds`` each and its 3 evaluations ``eval_seconds``."""
    from staysafe.runs.traces import RunWriter

    writer = RunWriter.create(root, {"model": model, "method": "sft", "steps": 4}, run_id=run_id)
    writer.append("steps", [{"step": s, "wall_time": step_seconds} for s in range(1, 5)])
    writer.append("evals", [{"step": s, "wall_time": eval_seconds} for s in (0, 2, 4)])
    writer.set_status("finished", step=4)


def option_keys(at) -> set[str]:
    """The options that have a widget on the run form (keys ``launch_<option>``)."""
    return {w.key.removeprefix("launch_") for kind in WIDGETS for w in getattr(at, kind)
            if (w.key or "").startswith("launch_")}


def estimates(at) -> list[str]:
    return [c.value for c in at.caption if "Estimated time" in c.value]


def test_run_form_shows_only_the_options_the_chosen_method_reads(roots):
    from staysafe.methods import METHODS, method_options

    at = open_page("launch")
    read_by = method_options()
    for method in METHODS:
        at.selectbox(key="launch_method").set_value(method).run()
        assert_clean(at)
        shown = option_keys(at)
        for option, readers in read_by.items():
            assert (option in shown) == (method in readers), (method, option)
        if method == "sft":
            assert not {o for o in shown if o.startswith(("beta", "lisa_", "safelora_", "risk"))}, shown
            assert "sft reads none of these options" in texts(at)
        if method == "lisa":
            assert {"lisa_align_steps", "lisa_user_steps", "lisa_rho"} <= shown
            assert "token_betas" not in shown and "beta_min" not in shown


def test_time_estimate_from_hand_made_numbers():
    from widgets import README_EVAL_SECONDS, README_STEP_SECONDS, duration, evaluations, time_estimate

    assert evaluations(40, 10) == 5  # steps 0, 10, 20, 30, 40
    assert evaluations(10, 3) == 5  # 0, 3, 6, 9 and the last step
    assert evaluations(12, 0) == 2
    seconds, per_step, measured = time_estimate([1.0, 2.0, 100.0, float("nan")], [10.0, 20.0, 30.0], 40, 5)
    assert (seconds, per_step, measured) == (40 * 2.0 + 5 * 20.0, 2.0, True)  # medians: an outlier step is ignored
    assert time_estimate([3.0], [], 10, 2) == (30.0, 3.0, True)  # no evaluation recorded: nothing added for them
    assert time_estimate([], [5.0], 10, 2) == (10 * README_STEP_SECONDS + 2 * README_EVAL_SECONDS,
                                               README_STEP_SECONDS, False)
    assert [duration(s) for s in (0.2, 40, 180, 7200)] == ["1 s", "40 s", "3 min", "2.0 h"]


def test_estimate_is_measured_here_or_marked_as_the_readme_figure(roots):
    timed_run(roots["runs"], "tiny-a", "tiny", 0.5, 2.0)
    timed_run(roots["runs"], "tiny-b", "tiny", 0.5, 2.0)
    timed_run(roots["runs"], "other-model", "smollm2-135m-instruct", 60.0, 60.0)
    at = open_page("launch")
    assert_clean(at)
    run_caption, exp_caption = estimates(at)  # smollm2-135m-aligned: no run of it measured here
    assert "not measured on this machine" in run_caption and "README" in run_caption
    assert "40 steps and 5 evaluation(s)" in run_caption
    assert "2 runs ×" in exp_caption and "12 steps" in exp_caption  # the live preset: sft and adaptive-probe
    at.selectbox(key="launch_model").set_value("tiny")
    at.selectbox(key="exp_model").set_value("tiny")
    at.run()
    run_caption, exp_caption = estimates(at)
    assert "about 30 s" in run_caption  # 40 steps × 0.5 s + 5 evaluations × 2 s
    assert "measured on this machine (2 finished run(s)" in run_caption and "not measured" not in run_caption
    assert "2 runs × 10 s = about 20 s" in exp_caption  # 12 × 0.5 s + 2 × 2 s per run


def test_experiment_form_lists_the_live_preset_first_and_the_cli_keeps_its_order(roots):
    from dataclasses import fields

    from staysafe.options import ExperimentSpec
    from staysafe.presets import PRESETS

    at = open_page("launch")
    preset = at.selectbox(key="exp_preset")
    assert list(preset.options)[0] == "live" and preset.value == "live"
    assert set(preset.options) == {*PRESETS, "(none)"}
    assert next(f for f in fields(ExperimentSpec) if f.name == "preset").metadata["choices"] == tuple(PRESETS)


@pytest.mark.parametrize("key", ["launch_model", "exp_model"])
def test_choosing_the_tiny_model_warns_before_anything_is_queued(roots, key):
    at = open_page("launch")
    assert not [w for w in at.warning if "tiny" in w.value]
    at.selectbox(key=key).set_value("tiny").run()
    assert_clean(at)
    assert [w.value for w in at.warning if "`tiny` is a test model" in w.value and "100%" in w.value]


def test_jobs_cancelled_on_the_page_stay_listed_as_cancelled(roots, tmp_path, monkeypatch):
    """A run and an experiment queued through the forms (the queue paused), cancelled with their Cancel buttons."""
    from staysafe.queue import Queue, command

    runs = tmp_path / "cancel-runs"
    monkeypatch.setenv("STAYSAFE_RUNS", str(runs))
    monkeypatch.setenv("STAYSAFE_EXPERIMENTS", str(tmp_path / "cancel-exps"))
    q = Queue(runs)
    q.pause()  # nothing may start
    at = open_page("launch")
    at.selectbox(key="launch_model").set_value("tiny").run()
    [b for b in at.button if b.label == "Validate and queue"][0].click().run()
    [b for b in at.button if b.label == "Validate and queue the experiment"][0].click().run()
    assert_clean(at)
    jobs = q.jobs()
    assert [j["kind"] for j in jobs] == ["train", "experiment"] and {j["state"] for j in jobs} == {"queued"}
    argv = command(jobs[1], runs, tmp_path / "cancel-exps")
    assert argv[argv.index("--preset") + 1] == "live"  # no method chosen: the preset's
    for job in jobs:
        [b for b in at.button if b.key == f"cancel_{job['id']}"][0].click().run()
        assert_clean(at)
    deadline = time.time() + 60
    while True:
        listed = at.dataframe[0].value if len(at.dataframe) else None
        if listed is not None and sorted(listed["state"]) == ["cancelled", "cancelled"]:
            break
        assert time.time() < deadline, (q.jobs(), listed)
        at.run()
    assert set(listed["job"]) == {j["id"] for j in jobs} and q.worker_pid() is None
    assert "Nothing is running or waiting" in texts(at)
