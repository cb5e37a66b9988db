"""Activation space, Regularization explorer and Judge vs probe, as a presenter uses them: widgets that follow the
run shown (also in the browser), intervals and sample sizes beside the agreement figures, cheap re-colouring, and
tables whose key columns come first."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import test_dashboard
from test_dashboard import assert_clean, figure, open_page, point_env, texts


@pytest.fixture(scope="session")
def dash_data(tmp_path_factory):
    """test_dashboard's data, once per session: when its fixture already ran in this session, its data (whose running
    run's lock this process holds; a second hold would wait on itself), else built or reused the same way."""
    if test_dashboard._HELD:
        base = test_dashboard._HELD[0].path.parents[2]  # <base>/runs/running-run/.lock
        return {"base": base, **{n: base / n for n in ("runs", "experiments", "compare", "probes", "demo")}}
    return test_dashboard.dash_data.__wrapped__(tmp_path_factory)


@pytest.fixture
def env(monkeypatch, dash_data):
    point_env(monkeypatch, dash_data)
    return dash_data


def shown(widget, before: tuple) -> object:
    """What the browser shows for ``widget`` after a rerun, given (id, value) it showed before: Streamlit's browser
    keeps its own value of a widget it already has unless the server sends one (``set_value``)."""
    old_id, old_value = before
    return widget.value if widget.id != old_id or widget.proto.set_value else old_value


def state(widget) -> tuple:
    return widget.id, widget.value


def step_slider(at):
    """The Regularization explorer's step range (keyed per run and recorded steps), or None."""
    found = [s for s in at.get("select_slider") if (s.key or "").startswith("reg_steps_")]
    return found[0] if found else None


def json_columns(table) -> dict:
    return json.loads(table.proto.columns or "{}")


# ----------------------------------------------------------------------------------------------- runs to switch to


def _keep_steps(table, last: int) -> None:
    """Rewrite a run's ``<table>.parquet/`` with its rows of steps <= ``last`` only (one part)."""
    rows = pd.concat([pd.read_parquet(p) for p in sorted(table.glob("[0-9]*.parquet"))], ignore_index=True)
    shutil.rmtree(table)
    if last:
        table.mkdir()
        rows[rows["step"] <= last].to_parquet(table / "0001-00000000-00000000.parquet", index=False)


@pytest.fixture
def switch_runs(env, tmp_path, monkeypatch):
    """A runs root of copies of ``adaptive-probe``: ``full`` (6 steps), ``cancelled`` after 3 of 30 steps,
    ``one-step`` (only step 1 recorded), ``no-steps`` (cancelled before its first step) and ``all-harmful`` (every
    training example labelled harmful)."""
    root = tmp_path / "runs"
    source = env["runs"] / "adaptive-probe"
    skip = shutil.ignore_patterns("activations", "checkpoints", "generations.parquet", ".lock")
    for name, last in (("full", 6), ("cancelled", 3), ("one-step", 1), ("no-steps", 0), ("all-harmful", 6)):
        run = root / name
        shutil.copytree(source, run, ignore=skip)
        for table in ("examples", "steps"):
            _keep_steps(run / f"{table}.parquet", last)
        if last < 6:
            config = json.loads((run / "config.json").read_text())
            (run / "config.json").write_text(json.dumps({**config, "steps": 30}))
            status = json.loads((run / "status.json").read_text())
            (run / "status.json").write_text(json.dumps({**status, "state": "cancelled", "step": last}))
    data = pd.read_parquet(root / "all-harmful" / "data.parquet")
    data.assign(label="harmful").to_parquet(root / "all-harmful" / "data.parquet", index=False)
    monkeypatch.setenv("STAYSAFE_RUNS", str(root))
    return root


# ----------------------------------------------------------------------------------------------- activation space


def plotted_layer(at) -> int:
    title = figure(at)["layout"]["xaxis"]["title"]["text"]
    return int(re.search(r"layer (\d+)", title).group(1))


def test_activations_layer_box_shows_the_plotted_layer_after_a_run_switch(env):
    at = open_page("activations", lambda at: at.selectbox(key="act_run").set_value("adaptive-probe"))
    assert_clean(at)
    box = at.selectbox(key="act_layer")
    assert box.value == 2 == plotted_layer(at)  # the probe's layer by default
    box.set_value(0)
    at.run()
    assert at.selectbox(key="act_layer").value == 0 == plotted_layer(at)
    assert "Layer 0: PCA fitted on" in texts(at)
    before = state(at.selectbox(key="act_layer"))
    at.selectbox(key="act_run").set_value("exp-tiny-sft-s0")  # no probe: the middle layer by default
    at.run()
    assert_clean(at)
    box = at.selectbox(key="act_layer")
    assert shown(box, before) == box.value == plotted_layer(at) != 0
    assert str(box.value) in box.options
    # colouring by probe score is no option without a probe: the colour box is back on label, in the browser too
    assert at.selectbox(key="act_color").value == "label" and "probe score" not in at.selectbox(key="act_color").options


def test_activations_pca_by_default_and_recolouring_does_not_reproject(env, monkeypatch):
    import loaders

    calls = []
    project = loaders.project_points
    monkeypatch.setattr(loaders, "project_points", lambda *a, **k: calls.append(a[1]) or project(*a, **k))
    at = open_page("activations", lambda at: at.selectbox(key="act_run").set_value("adaptive-probe"))
    assert at.selectbox(key="act_method").value == "PCA"
    at.number_input(key="act_fit_n").set_value(321)  # a sample size no other test uses: one fresh projection
    at.run()
    assert calls[-1:] == ["PCA"]
    done = len(calls)
    for colour in ("category", "probe score", "label"):
        at.selectbox(key="act_color").set_value(colour)
        at.run()
        assert_clean(at)
    assert len(calls) == done  # colouring only redraws the cached projection


# ----------------------------------------------------------------------------------------------- regularization


def test_regularization_step_range_comes_from_the_steps_recorded(switch_runs):
    at = open_page("regularization", lambda at: at.selectbox(key="reg_run").set_value("full"))
    assert_clean(at)
    steps = step_slider(at)
    assert steps.options == [str(s) for s in range(1, 7)] and steps.value == (1, 6)
    steps.set_value((2, 5))
    at.multiselect(key="reg_labels").set_value(["harmful"])
    at.run()
    assert set(at.dataframe[0].value["label"]) == {"harmful"}
    before = {k: state(w) for k, w in (("steps", step_slider(at)),
                                       ("labels", at.multiselect(key="reg_labels")))}
    at.selectbox(key="reg_run").set_value("cancelled")
    at.run()
    assert_clean(at)
    assert any("cancelled after 3/30 steps" in w.value for w in at.warning)  # the status line reads the steps
    steps, labels = step_slider(at), at.multiselect(key="reg_labels")
    assert steps.options == ["1", "2", "3"]
    assert shown(steps, before["steps"]) == steps.value == (1, 3)  # browser and table agree: all of this run
    assert shown(labels, before["labels"]) == labels.value == ["benign", "harmful"]
    agg = at.dataframe[0].value
    assert agg["times_seen"].sum() == 3 * 4  # 3 steps of 4 examples
    at.selectbox(key="reg_run").set_value("one-step")
    at.run()
    assert_clean(at)
    assert step_slider(at) is None
    assert "Only step 1 is recorded so far" in texts(at)
    at.selectbox(key="reg_run").set_value("no-steps")
    at.run()
    assert_clean(at)
    assert "cancelled after 0/30 steps" in texts(at) and "no training step with examples yet" in texts(at)


def test_regularization_tables_lead_with_readable_columns(env):
    at = open_page("regularization", lambda at: at.selectbox(key="reg_run").set_value("adaptive-probe"))
    assert_clean(at)
    per_example, per_step = at.dataframe[0], at.dataframe[1]
    order = list(per_example.proto.column_order)
    assert order[:5] == ["example_id", "label", "mean_beta", "max_beta", "mean_risk"]
    assert "example_index" not in order and order[-1] == "prompt"
    assert json_columns(per_example)["prompt"]["width"] == "medium"
    columns = list(per_step.value.columns)
    assert columns[:4] == ["step", "example_id", "label", "beta"] and "example_index" not in columns
    assert json_columns(per_step)["beta"]["label"] == "β"
    choice = [s for s in at.selectbox if s.key and s.key.startswith("reg_example_")][0]
    assert choice.key.startswith("reg_example_adaptive-probe_")  # one per run: an index means another example there
    assert not choice.options[0].startswith("#") and choice.index == 0  # the example's id, not its internal index
    assert any(f"History of {choice.options[choice.index]} (" in json.dumps(figure(at, i)["layout"].get("title"))
               for i in range(len(at.get("plotly_chart"))))


# ----------------------------------------------------------------------------------------------- judge vs probe


def test_judge_vs_probe_intervals_and_sample_sizes(env):
    from sklearn.metrics import roc_auc_score

    at = open_page("judge_vs_probe")
    assert_clean(at)
    title = figure(at, 2)["layout"]["title"]["text"]
    m = re.search(r"Agreement (\d+)% \[(\d+)%, (\d+)%\] · n = 248<br>Cohen's κ (-?[\d.]+) \[(-?[\d.]+), (-?[\d.]+)\]",
                  title)
    assert m, title
    agree, lo, hi, kappa, klo, khi = map(float, m.groups())
    assert lo <= agree <= hi and klo <= kappa <= khi and hi - lo < 20
    roc = figure(at, 1)
    assert "n = 248" in roc["layout"]["title"]["text"]
    compare = pd.read_parquet(env["compare"] / "eval" / "compare.parquet")
    names = [t["name"] for t in roc["data"] if t["name"] != "chance"]
    assert [n.split(":")[0] for n in names] == ["activation probe", "embedding judge"]
    for name, column in zip(names, ("probe", "embedding")):
        auc, lo, hi = map(float, re.search(r"AUROC ([\d.]+) \[([\d.]+), ([\d.]+)\]", name).groups())
        assert auc == pytest.approx(roc_auc_score(compare["label"] == "harmful", compare[column]), abs=0.005)
        assert lo <= auc <= hi
    harmful = int((compare["label"] == "harmful").sum())
    assert any("95% bootstrap interval" in c.value and f"({harmful} harmful, {248 - harmful} benign)" in c.value
               for c in at.caption)
    # the disagreement table: the id and both scores first, long texts medium wide, readable headers
    table = at.dataframe[-1]
    assert list(table.value.columns)[:4] == ["id", "probe", "embedding", "|difference|"]
    columns = json_columns(table)
    assert columns["prompt"]["width"] == "medium" and columns["probe"]["label"] == "activation probe"


def test_judge_vs_probe_one_class_says_auroc_cannot_be_computed(switch_runs):
    def setup(at):
        at.segmented_control(key="jvp_source").set_value("a run's training examples")

    at = open_page("judge_vs_probe", setup)
    at.selectbox(key="jvp_run").set_value("full")
    at.run()
    assert_clean(at)
    assert any("AUROC" in t.get("name", "") for t in figure(at, 1)["data"])
    at.slider(key="jvp_tx").set_value(0.8)
    at.run()
    before = state(at.slider(key="jvp_tx"))
    at.selectbox(key="jvp_run").set_value("all-harmful")
    at.run()
    assert_clean(at)
    assert re.search(r"ROC and AUROC cannot be computed here: all \d+ labelled examples are harmful", texts(at))
    titles = [json.dumps(figure(at, i)["layout"].get("title")) for i in range(len(at.get("plotly_chart")))]
    assert not any("ROC" in t or "Calibration" in t for t in titles)
    assert any("Agreement" in t and "n = " in t for t in titles)  # agreement needs no labels: still shown
    slider = at.slider(key="jvp_tx")
    assert shown(slider, before) == slider.value == 0.5  # another run: threshold back to the default, visibly


# ----------------------------------------------------------------------------------------------- statistics


def test_auroc_matches_sklearn_with_ties_and_is_nan_for_one_class():
    from sklearn.metrics import roc_auc_score

    from staysafe.eval import stats

    rng = np.random.default_rng(0)
    for n in (2, 9, 200):
        truth = np.arange(n) % 2 == 0
        scores = np.round(rng.random(n), 1) + 0.2 * truth  # rounded: many ties
        assert stats.auroc(truth, scores) == pytest.approx(roc_auc_score(truth, scores))
    assert np.isnan(stats.auroc([True, True], [0.2, 0.9]))
    lo, hi = stats.bootstrap_interval(stats.auroc, truth, scores, resamples=300)
    assert lo <= stats.auroc(truth, scores) <= hi
