"""The dashboard on real tiny-model runs: every page through Streamlit's AppTest (finished, running, failed and
corrupt runs, an empty root, an experiment, a compare folder, saved activations), the shared loaders and path
checks, and one real-browser pass in headless Chromium that screenshots every page."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO

APP = REPO / "dashboard" / "app.py"
PAGES = ["home", "launch", "traces", "activations", "judge_vs_probe", "asr", "regularization", "frontier", "demo"]
SCREENSHOTS = REPO / "tests" / "artifacts" / "screenshots"
TINY = dict(model="tiny", lora_r=0, batch_size=4, max_length=64, steps=4, eval_every=2, eval_harmful=4,
            eval_benign=4, max_new_tokens=4, eval_judges=[], record_judge=False, risk="label", save_model=False)

sys.path.insert(0, str(REPO / "dashboard"))


# ----------------------------------------------------------------------------------------------- real data


def build_dashboard_data(base: Path) -> dict:
    """Real tiny-model runs and everything the pages read, under ``base``; returns the roots (one training at a time).

    runs/: the base run (adaptive, oracle label risk), adaptive with the probe (+ the embedding judge's risk and an
    embedding judge ASR) on a balanced
    harmful/benign file, a failed run, a running run (its lock held by this process), a corrupt run, and an
    experiment's runs (sft + adaptive-probe, two seeds); experiments/; compare/eval (probe vs embedding judge);
    probes/ (a saved activations folder + probe, and 100,000 synthetic points); demo/ in the data/demo layout.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a small shared CPU, 2 threads against other load run ~5x slower than 1
    try:
        return _build(base)
    finally:
        torch.set_num_threads(threads)


_HELD = []  # the locks of the "running" runs: held by this test process for the session, as a live run holds its own


def hold_running(path: Path) -> None:
    """Mark a run running the way a live run is: its status says so and a live process (this one) holds its lock."""
    from staysafe.runs import process
    from staysafe.runs.traces import RunWriter

    RunWriter(path).set_status("running", step=4)
    _HELD.append(process.LifeLock(path / process.LOCK_NAME))


def _build(base: Path) -> dict:
    from staysafe.data import load_records
    from staysafe.eval.compare import compare_risk
    from staysafe.experiment import ExperimentSpec, run_experiment
    from staysafe.probe import Activations
    from staysafe.runner import RunSpec, run_training
    from staysafe.runs.traces import RunWriter

    runs, exps, comp, probes, demo = (base / n for n in ("runs", "experiments", "compare", "probes", "demo"))
    for d in (runs, exps, comp, probes):
        d.mkdir(parents=True, exist_ok=True)
    run_training(RunSpec(**TINY, runs_dir=str(runs), run_id="label-run"), progress=False, log=lambda *a: None)
    mix = load_records("harmful-ft")[:14] + load_records("benign")[:14]
    mix = [mix[i] for i in np.random.default_rng(0).permutation(len(mix))]
    data = base / "mixed.jsonl"
    data.write_text("".join(json.dumps({"id": r["id"], "messages": r["messages"], "label": r["label"],
                                        "category": r["category"]}) + "\n" for r in mix))
    run_training(RunSpec(**{**TINY, "steps": 6, "risk": "probe", "record_judge": True, "judge": "embedding",
                            "eval_judges": ["embedding-response"]}, method="adaptive", scenario=None,
                         data=str(data), runs_dir=str(runs), run_id="adaptive-probe"), progress=False,
                 log=lambda *a: None)
    # a failed run (an unknown judge is now refused before any run directory exists, so the failure is recorded on
    # a copy, as the runner records one)
    with pytest.raises(ValueError, match="unknown response judge"):
        run_training(RunSpec(**{**TINY, "eval_judges": ["no-such-judge"]}, method="sft", runs_dir=str(runs),
                             run_id="failed-run"), progress=False, log=lambda *a: None)
    assert not (runs / "failed-run").exists()
    label_config = json.loads((runs / "label-run" / "config.json").read_text())
    failed = RunWriter.create(runs, {**label_config, "eval_judges": ["no-such-judge"]}, run_id="failed-run")
    shutil.copy(runs / "label-run" / "data.parquet", failed.path / "data.parquet")
    failed.set_status("failed", error="ValueError: unknown judge 'no-such-judge'")
    shutil.copytree(runs / "label-run", runs / "running-run")
    hold_running(runs / "running-run")
    shutil.copytree(runs / "label-run", runs / "corrupt-run")
    (runs / "corrupt-run" / "status.json").write_text('{"state": "finished", "created": "yesterday"}')  # unreadable
    run_experiment(ExperimentSpec(scenario="harmful", methods=["sft", "adaptive-probe"], seeds=2, model="tiny",
                                  out_dir=str(exps), runs_dir=str(runs), experiment_id="exp-tiny",
                                  overrides={k: v for k, v in TINY.items() if k != "model"}), log=lambda *a: None)
    run_experiment(ExperimentSpec(scenario="harmful", methods=["sft", "constant-kl"], model="tiny", out_dir=str(exps),
                                  runs_dir=str(runs), experiment_id="exp-sweep", sweep={"beta": [0.1, 0.9]},
                                  overrides={**{k: v for k, v in TINY.items() if k != "model"}, "steps": 2,
                                             "eval_every": 0}), log=lambda *a: None)
    compare_risk(model="tiny", judges=("embedding",), out_dir=comp / "eval")
    shutil.copytree(runs / "adaptive-probe" / "activations" / "after", probes / "activations")
    for name in ("probe.json", "probe.npz"):
        shutil.copy(runs / "adaptive-probe" / name, probes / name)
    rng = np.random.default_rng(0)
    n = 100_000
    labels = np.where(rng.random(n) < 0.5, "harmful", "benign")
    shift = (labels == "harmful")[:, None] * 1.5
    Activations(values={1: (rng.normal(size=(n, 64)) + shift).astype(np.float16)},
                index=pd.DataFrame({"id": [f"p{i}" for i in range(n)], "label": labels,
                                    "category": rng.choice(["a", "b", "c"], n),
                                    "prompt": [f"synthetic prompt {i}" for i in range(n)]})).save(probes / "big")
    (demo / "runs").mkdir(parents=True)
    shutil.copytree(exps / "exp-tiny", demo / "experiment")
    for p in runs.glob("exp-tiny-*"):
        shutil.copytree(p, demo / "runs" / p.name)
    return {"base": base, "runs": runs, "experiments": exps, "compare": comp, "probes": probes, "demo": demo}


@pytest.fixture(scope="session")
def dash_data(tmp_path_factory):
    """Built once per session. For a quick edit-test loop, ``STAYSAFE_DASH_TEST_DATA=<dir>`` reuses a directory that
    ``build_dashboard_data`` filled earlier (its running run is re-marked as running by this process)."""
    reuse = os.environ.get("STAYSAFE_DASH_TEST_DATA")
    if reuse and (Path(reuse) / "runs" / "label-run").is_dir():

        base = Path(reuse)
        hold_running(base / "runs" / "running-run")
        return {"base": base, **{n: base / n for n in ("runs", "experiments", "compare", "probes", "demo")}}
    return build_dashboard_data(tmp_path_factory.mktemp("dash"))


def point_env(monkeypatch, roots: dict) -> None:
    monkeypatch.setenv("STAYSAFE_RUNS", str(roots["runs"]))
    monkeypatch.setenv("STAYSAFE_EXPERIMENTS", str(roots["experiments"]))
    monkeypatch.setenv("STAYSAFE_COMPARE", str(roots["compare"]))
    monkeypatch.setenv("STAYSAFE_PROBES", str(roots["probes"]))
    monkeypatch.setenv("STAYSAFE_DEMO_DIR", str(roots["demo"]))


@pytest.fixture
def env(monkeypatch, dash_data):
    point_env(monkeypatch, dash_data)
    return dash_data


@pytest.fixture
def empty_env(monkeypatch, tmp_path):
    roots = {n: tmp_path / n for n in ("runs", "experiments", "compare", "probes", "demo")}
    point_env(monkeypatch, roots)
    return roots


def open_page(page: str, setup=None):
    """Run the app shell, switch to ``page`` and run it (``setup(at)`` may set widgets first)."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=300)
    at.run()
    assert not at.exception, at.exception
    if page != "home":
        at.switch_page(f"views/{page}.py")
        at.run()
    if setup is not None:
        setup(at)
        at.run()
    return at


def texts(at) -> str:
    """Every markdown / caption / info / warning / error / title text of the page, joined."""
    parts = []
    for kind in ("title", "header", "subheader", "markdown", "caption", "info", "warning", "error", "success",
                 "code", "text"):
        parts += [str(getattr(e, "value", "")) for e in getattr(at, kind)]
    return "\n".join(parts)


def assert_clean(at, allow_errors: tuple[str, ...] = ()) -> None:
    assert not at.exception, [e.value for e in at.exception]
    bad = [e.value for e in at.error if not any(a in e.value for a in allow_errors)]
    assert not bad, bad


def chart_count(at) -> int:
    return len(at.get("plotly_chart"))


def figure(at, i: int = 0) -> dict:
    return json.loads(at.get("plotly_chart")[i].proto.spec)


def array(values) -> np.ndarray:
    """A Plotly JSON array: a plain list or a base64 typed array ({"dtype", "bdata"})."""
    if isinstance(values, dict) and "bdata" in values:
        import base64

        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"])
    return np.asarray(values)


# ----------------------------------------------------------------------------------------------- helpers


def test_safe_subdir_refuses_escapes(tmp_path):
    import settings
    from staysafe.runs.traces import TraceError

    (tmp_path / "root" / "eval").mkdir(parents=True)
    assert settings.safe_subdir(tmp_path / "root", "eval") == (tmp_path / "root" / "eval").resolve()
    assert settings.safe_subdir(tmp_path / "root", ".") == (tmp_path / "root").resolve()
    for bad in ("../x", "/etc", "eval/../../x", "..", "~/x", ""):
        with pytest.raises(TraceError):
            settings.safe_subdir(tmp_path / "root", bad)
    os.symlink("/etc", tmp_path / "root" / "link")
    with pytest.raises(TraceError, match="outside"):
        settings.safe_subdir(tmp_path / "root", "link")
    for bad in ("../x", "/etc", ".."):
        with pytest.raises(TraceError):
            settings.run_path(tmp_path / "root", bad)


def test_loaders_read_through_the_library_and_refresh_on_change(dash_data, tmp_path):
    import loaders
    from staysafe.runs.traces import RunWriter, load_run

    run = loaders.load_run_cached(dash_data["runs"] / "adaptive-probe")
    direct = load_run(dash_data["runs"] / "adaptive-probe")
    for t in ("steps", "examples", "evals", "generations", "data"):
        pd.testing.assert_frame_equal(getattr(run, t), getattr(direct, t))
    assert run.status == direct.status and run.config == direct.config
    # A run that is still writing: a new part changes the signature and the next load sees the new step.
    w = RunWriter.create(tmp_path, {"method": "sft", "steps": 3}, run_id="live")
    hold_running(w.path)
    w.append("steps", [{"step": 1, "loss": 1.0}])
    assert loaders.load_run_cached(w.path, ("steps",)).steps["step"].tolist() == [1]
    w.append("steps", [{"step": 2, "loss": 0.5}])
    assert loaders.load_run_cached(w.path, ("steps",)).steps["step"].tolist() == [1, 2]
    assert loaders.load_run_cached(w.path).status["state"] == "running"
    table = loaders.runs_table(dash_data["runs"]).set_index("run_id")
    assert table.loc["corrupt-run", "state"] == "corrupt" and "status.json" in table.loc["corrupt-run", "error"]
    assert table.loc["running-run", "state"] == "running"
    assert table.loc["failed-run", "state"] == "failed"
    run, err = loaders.try_load_run(dash_data["runs"], "corrupt-run")
    assert run is None and "status.json" in err and "created" in err  # the field of the wrong type is named
    run, err = loaders.try_load_run(dash_data["runs"], "../runs")
    assert run is None and "not a valid run id" in err


def test_joined_examples_and_step_batches(dash_data):
    import loaders

    path = dash_data["runs"] / "adaptive-probe"
    ex = loaders.examples_joined(path)
    assert {"risk_probe", "risk_judge", "risk_label", "beta", "prompt", "label", "example_id"} <= set(ex.columns)
    assert ex["prompt"].notna().all()
    batches = loaders.step_batches(path)
    assert batches["step"].tolist() == [1, 2, 3, 4, 5, 6]
    first = ex[ex["step"] == 1]["example_id"].iloc[0]
    assert first in batches["batch"].iloc[0]


def test_projection_fits_a_sample_and_transforms_the_rest():
    from staysafe import geometry

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3000, 16)), rng.normal(size=(2500, 16)) + 3
    (ca, cb), fitted, _ = geometry.project_points([a, b], "PCA", fit_n=500)
    assert fitted == 500 and ca.shape == (3000, 2) and cb.shape == (2500, 2)
    assert np.isfinite(ca).all() and np.isfinite(cb).all()
    assert abs(cb[:, 0].mean() - ca[:, 0].mean()) > 3  # the shift survives the shared projection
    (ta, tb), fitted, note = geometry.project_points([a[:300], b[:300]], "t-SNE", fit_n=200)
    assert np.isfinite(ta[:, 0]).sum() + np.isfinite(tb[:, 0]).sum() == 200  # t-SNE: the sample only
    assert "only the sample" in note
    (ua, ub), fitted, note = geometry.project_points([a[:400], b[:400]], "UMAP", fit_n=300)
    assert np.isfinite(ua).all() and np.isfinite(ub).all() and note == "every point transformed"
    # beyond 5,000 further points UMAP places them by nearest sampled neighbours: fast, and still separated
    (ua, ub), fitted, note = geometry.project_points([a, b], "UMAP", fit_n=300)
    assert np.isfinite(ua).all() and np.isfinite(ub).all() and "nearest sampled" in note
    from sklearn.metrics import roc_auc_score

    xs = np.concatenate([ua, ub])
    y = np.r_[np.zeros(len(ua)), np.ones(len(ub))]
    assert max(roc_auc_score(y, xs[:, 0]), roc_auc_score(y, -xs[:, 0]), roc_auc_score(y, xs[:, 1]),
               roc_auc_score(y, -xs[:, 1])) > 0.9


# ----------------------------------------------------------------------------------------------- pages: empty root


@pytest.mark.parametrize("page", PAGES)
def test_every_page_opens_with_no_data(empty_env, page):
    at = open_page(page)
    assert_clean(at)
    body = texts(at)
    if page in ("home", "traces", "regularization"):
        assert "No runs under" in body and "staysafe train" in body
    if page == "judge_vs_probe":
        assert "staysafe compare-risk" in body
    if page == "activations":
        assert "No runs under" in body
    if page == "asr":
        assert "No runs under" in body
    if page == "demo":
        assert "No recorded demo yet" in body and "staysafe experiment --scenario harmful --quick" in body
    if page == "launch":
        assert "The queue is empty" in body


def test_launch_form_widgets_come_from_the_option_schema(empty_env):
    """Every widget of the Launch form is an option of RunSpec with the schema's help, default and choices."""
    import dataclasses

    from staysafe.methods import METHODS
    from staysafe.options import RunSpec, default_of

    at = open_page("launch")
    assert_clean(at)
    schema = {f.name: f for f in dataclasses.fields(RunSpec)}
    seen = set()
    for method in METHODS:  # the form shows the options the chosen method reads
        at.selectbox(key="launch_method").set_value(method).run()
        assert_clean(at)
        for kind in ("selectbox", "multiselect", "number_input", "checkbox", "text_input"):
            for w in getattr(at, kind):
                if not (w.key or "").startswith("launch_") or w.key in ("launch_run_id", "launch_paused"):
                    continue
                name = w.key.removeprefix("launch_")
                f = schema[name]  # a KeyError: a widget that is no option
                seen.add(name)
                assert w.help == f.metadata["help"], name
                default = default_of(f)
                if kind in ("number_input", "checkbox", "multiselect"):
                    assert w.value == default, name
                if f.metadata["choices"]:
                    assert list(w.options)[:len(f.metadata["choices"])] == list(f.metadata["choices"]), name
    assert {"model", "scenario", "method", "beta", "beta_min", "beta_max", "risk", "risk_ema", "judge", "steps",
            "lr", "lora_r", "eval_judges", "save_model"} <= seen
    # A new option is placed on the form or listed, with its reason, as deliberately left off.
    import ast

    tree = ast.parse((REPO / "dashboard" / "views" / "launch.py").read_text())
    left_off = next(ast.literal_eval(n.value) for n in tree.body
                    if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "NOT_ON_FORM")
    assert seen.isdisjoint(left_off) and seen | set(left_off) == set(schema), set(schema) - seen - set(left_off)


# ----------------------------------------------------------------------------------------------- pages: real runs


def test_home_lists_every_run_with_state(env):
    at = open_page("home")
    assert_clean(at)
    df = at.dataframe[0].value
    states = dict(zip(df["run"], df["state"]))
    assert "finished" in states["label-run"] and "running" in states["running-run"]
    assert "failed" in states["failed-run"] and "corrupt" in states["corrupt-run"]
    assert "final keyword ASR (weak judge)" in df.columns
    assert any("corrupt-run" in w.value for w in at.warning)
    assert "smollm2-135m-aligned" in texts(at)
    assert "is ready, shipped with StaySafe" in texts(at) or "is ready, built locally" in texts(at)  # no build


def test_launch_form_refuses_invalid_options_and_queues_valid_ones(env, tmp_path, monkeypatch):
    from staysafe.queue import Queue, command

    runs = tmp_path / "launch-runs"
    monkeypatch.setenv("STAYSAFE_RUNS", str(runs))
    q = Queue(runs)
    q.pause()  # the queued run must wait, so that the page's view of a waiting job can be checked
    at = open_page("launch")
    assert_clean(at)
    for key in ("launch_model", "launch_scenario", "launch_method", "launch_risk", "launch_judge"):
        assert at.selectbox(key=key) is not None
    for key in ("launch_beta_min", "launch_beta_max", "launch_risk_ema", "launch_steps", "launch_lr",
                "launch_lora_r", "launch_eval_every", "launch_batch_size", "launch_seed"):
        assert at.number_input(key=key) is not None
    at.number_input(key="launch_beta_min").set_value(0.95)
    at.number_input(key="launch_beta_max").set_value(0.1)
    submit(at, "Validate and queue")
    assert any("beta_min = 0.95 is greater than beta_max = 0.1" in e.value for e in at.error)
    assert q.jobs() == []
    at.number_input(key="launch_beta_min").set_value(0.05)
    at.number_input(key="launch_beta_max").set_value(0.9)
    at.selectbox(key="launch_model").set_value("tiny")
    for bad in ("../escape", "/etc/passwd"):
        at.text_input(key="launch_run_id").set_value(bad)
        submit(at, "Validate and queue")
        assert any("not a valid run id" in e.value or "not allowed" in e.value for e in at.error), bad
    assert q.jobs() == []
    at.text_input(key="launch_run_id").set_value("from-form")
    submit(at, "Validate and queue")
    assert_clean(at)
    assert any("from-form" in s.value for s in at.success)
    jobs = q.jobs()
    assert [j["target"] for j in jobs] == ["from-form"] and jobs[0]["state"] == "queued"
    assert command(jobs[0], runs)[:4] == [sys.executable, "-m", "staysafe.cli", "train"]
    assert "staysafe train" in texts(at) and "--model tiny" in texts(at)
    assert "--beta-min" not in texts(at) and "--method" not in texts(at)  # defaults are not repeated
    at.run()
    assert "from-form" in texts(at) and "paused" in texts(at)
    [b for b in at.button if b.key == f"cancel_{jobs[0]['id']}"][0].click()
    at.run()
    assert [j["state"] for j in q.jobs()] == ["cancelled"] and not (runs / "from-form").exists()


def submit(at, label: str) -> None:
    [b for b in at.button if b.label == label][0].click()
    at.run()


def test_launch_page_follows_a_running_run_and_cancels_it(env, tmp_path, monkeypatch):
    """A real background run: its progress bar and latest numbers come from its steps.parquet; Cancel stops it."""
    from staysafe.queue import Queue
    from staysafe.runner import RunSpec

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the training subprocess: see build_dashboard_data
    runs = tmp_path / "live-runs"
    monkeypatch.setenv("STAYSAFE_RUNS", str(runs))
    q = Queue(runs)
    job = q.submit_train(RunSpec(**{**TINY, "steps": 5000, "eval_every": 0}), "live")
    deadline = time.time() + 400
    while not (runs / "live" / "steps.parquet").is_dir() or len(list((runs / "live" / "steps.parquet").glob("*"))) < 2:
        assert time.time() < deadline and q.get(job["id"])["state"] in ("queued", "running"), q.log_tail(job["id"])
        time.sleep(0.3)
    at = open_page("launch")
    assert_clean(at)
    bar = at.get("progress")[0]
    assert "/ 5000" in str(bar.proto) and "step" in str(bar.proto)
    assert {m.label for m in at.metric} >= {"loss", "nll", "kl", "β", "risk"}
    [b for b in at.button if b.key == f"cancel_{job['id']}"][0].click()
    at.run()
    deadline = time.time() + 120
    while q.get(job["id"])["state"] != "cancelled":
        assert time.time() < deadline, q.get(job["id"])
        time.sleep(0.3)
    at.run()
    assert_clean(at)
    done = at.dataframe[0].value
    assert done["state"].tolist() == ["cancelled"]
    from staysafe.runs.traces import run_state

    assert run_state(runs / "live")["state"] == "cancelled"


def test_traces_page_overlays_runs_with_baseline_and_smoothing(env):
    def setup(at):
        at.multiselect(key="traces_runs").set_value(["exp-tiny-sft-s0", "adaptive-probe", "corrupt-run"])

    at = open_page("traces", setup)
    assert_clean(at, allow_errors=("corrupt-run",))
    assert any("corrupt-run" in e.value for e in at.error)
    assert chart_count(at) == 1
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    names = {t.get("name") for t in fig["data"]}
    assert any("adaptive-probe" in n for n in names) and any("exp-tiny-sft-s0" in n for n in names)
    titles = [a["text"] for a in fig["layout"]["annotations"]]
    assert "risk: probe" in titles and "β (KL weight)" in titles
    hover = [t for t in fig["data"] if "adaptive-probe" in t["name"]][0]
    assert "batch" in hover["hovertemplate"] and hover["customdata"][0]
    at.selectbox(key="traces_baseline").set_value("exp-tiny-sft-s0")
    at.segmented_control(key="traces_smooth").set_value("EMA")
    at.run()
    assert_clean(at, allow_errors=("corrupt-run",))
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert all("− baseline" in a["text"] for a in fig["layout"]["annotations"])


def test_traces_page_on_failed_and_running_runs(env):
    def setup(at):
        at.multiselect(key="traces_runs").set_value(["failed-run", "running-run"])

    at = open_page("traces", setup)
    assert_clean(at)
    assert any("failed" in w.value for w in at.warning)
    assert any("running" in i.value for i in at.info)
    assert chart_count(at) == 1


def test_activations_page_before_after_and_sweep(env):
    def setup(at):
        at.selectbox(key="act_run").set_value("adaptive-probe")

    at = open_page("activations", setup)
    assert_clean(at)
    assert chart_count(at) == 2  # projection + AUROC sweep
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert [a["text"] for a in fig["layout"]["annotations"]][:2] == ["before fine-tuning", "after fine-tuning"]
    assert all(t["type"] == "scattergl" for t in fig["data"])
    at.number_input(key="act_fit_n").set_value(200)  # fewer than the 496 points: the rest must be placed
    for method in ("UMAP", "t-SNE"):
        at.selectbox(key="act_method").set_value(method)
        at.selectbox(key="act_color").set_value("probe score")
        at.run()
        assert_clean(at)
    assert "only the sample is shown" in texts(at)
    # an sft run: no probe, still both panels
    at.selectbox(key="act_run").set_value("exp-tiny-sft-s0")
    at.run()
    assert_clean(at)
    assert "has no probe" in texts(at)
    at.selectbox(key="act_run").set_value("corrupt-run")
    at.run()
    assert_clean(at, allow_errors=("corrupt-run",))


def test_activations_page_saved_folder_and_100k_points(env):
    def setup(at):
        at.segmented_control(key="act_source").set_value("a saved activations folder")

    at = open_page("activations", setup)
    assert_clean(at)
    at.selectbox(key="act_dir").set_value("activations")
    at.run()
    assert_clean(at)
    assert chart_count(at) == 2  # the folder's parent holds probe.json with the sweep
    at.selectbox(key="act_dir").set_value("big")
    at.run()
    assert_clean(at)
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert sum(len(array(t["x"])) for t in fig["data"]) == 100_000
    assert "fitted on 2,000 of 100,000 points" in texts(at)
    for bad in ("../runs", "/etc", "big/../../runs"):
        at.text_input(key="act_dir_typed").set_value(bad)
        at.run()
        assert any("Cannot use" in e.value for e in at.error), bad


def test_judge_vs_probe_from_compare_folder_and_from_a_run(env):
    at = open_page("judge_vs_probe")
    assert_clean(at)
    assert chart_count(at) == 5  # scatter, ROC, agreement, calibration, cost
    assert at.selectbox(key="jvp_x").value == "probe"
    assert "Cohen" in json.dumps(json.loads(at.get("plotly_chart")[2].proto.spec)["layout"]["title"])
    table = at.dataframe[-1].value
    assert {"prompt", "probe", "|difference|"} <= set(table.columns)
    at.slider(key="jvp_tx").set_value(0.3)
    at.run()
    assert_clean(at)
    at.text_input(key="jvp_dir_typed").set_value("../runs")
    at.run()
    assert any("Cannot use" in e.value for e in at.error)
    at.text_input(key="jvp_dir_typed").set_value("")
    at.segmented_control(key="jvp_source").set_value("a run's training examples")
    at.run()
    at.selectbox(key="jvp_run").set_value("adaptive-probe")
    at.run()
    assert_clean(at)
    assert {at.selectbox(key="jvp_x").value, at.selectbox(key="jvp_y").value} == {"probe", "judge"}
    assert chart_count(at) >= 4
    at.selectbox(key="jvp_run").set_value("label-run")
    at.run()
    assert_clean(at)
    assert "needs both" in texts(at)


def test_asr_page_runs_experiment_and_answers_at_a_step(env):
    def setup(at):
        at.multiselect(key="asr_runs").set_value(["label-run", "adaptive-probe", "failed-run"])

    at = open_page("asr", setup)
    assert_clean(at)
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    titles = [a["text"] for a in fig["layout"]["annotations"]]
    # each judge's measured agreement with the labelled answers (the shipped figures) stands beside its ASR
    from staysafe.eval.validation import measured_agreement

    shipped = measured_agreement()
    emb, kw = shipped["embedding_response"], shipped["keyword"]
    assert titles[0] == f"judge ASR (embedding_response) · κ {emb['kappa']:.2f}"
    assert f"keyword ASR (weak judge) · κ {kw['kappa']:.2f}" in titles
    lo, hi = emb["kappa_interval"]
    assert any(f"κ {emb['kappa']:.2f} [{lo:.2f}, {hi:.2f}]" in c.value for c in at.caption)
    assert "the ASR" not in titles
    # one run per line: a band of its 95% bootstrap interval over prompts, around its line
    bands = [t for t in fig["data"] if t.get("fill") == "toself"]
    assert bands and all(len(b["x"]) == len(b["y"]) and len(b["x"]) % 2 == 0 for b in bands)
    assert any("95% bootstrap interval over its prompts" in c.value for c in at.caption)
    assert any("failed-run" in i.value for i in at.info)  # no evaluation recorded
    at.selectbox(key="asr_gen_run").set_value("adaptive-probe")
    at.run()
    steps = at.get("selectbox")
    step_box = [s for s in steps if s.key and s.key.startswith("asr_step_")][0]
    step_box.set_value(0)
    at.run()
    table = at.dataframe[0].value
    assert {"prompt", "response", "refused", "score_embedding_response"} <= set(table.columns)
    assert len(table) == 4  # the harmful prompts at that step
    # a whole experiment: one line per method with a band over the two seeds
    at.segmented_control(key="asr_mode").set_value("an experiment")
    at.run()
    assert_clean(at)
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    names = {t.get("name") for t in fig["data"] if t.get("name")}
    assert names == {"sft (mean of 2 seeds)", "adaptive-probe (mean of 2 seeds)"}
    assert any(t.get("fill") == "toself" for t in fig["data"])
    at.segmented_control(key="asr_band").set_value("± std")
    at.run()
    assert_clean(at)


def test_frontier_page_draws_the_sweep_as_a_curve_and_opens_runs(env):
    def setup(at):
        at.selectbox(key="frontier_exp").set_value("exp-sweep (yours)")

    at = open_page("frontier", setup)
    assert_clean(at)
    fig = figure(at)
    traces = {t["name"]: t for t in fig["data"]}
    assert set(traces) == {"sft", "constant-kl", "reference (step 0)"}
    from staysafe.methods import REFERENCE_COLOUR, colour

    assert traces["reference (step 0)"]["marker"]["color"] == REFERENCE_COLOUR  # the starting model, grey
    assert traces["sft"]["marker"]["color"] == colour("sft")
    # one seed: its bars are the run's interval over prompts, and the caption says so (not a zero std)
    assert any("95% interval over prompts (one seed)" in c.value for c in at.caption)
    assert traces["constant-kl"]["mode"] == "lines+markers" and len(traces["constant-kl"]["x"]) == 2  # the sweep
    assert traces["sft"]["mode"] == "markers"
    assert "benign NLL" in fig["layout"]["xaxis"]["title"]["text"]
    from staysafe.eval.validation import measured_agreement

    kw = measured_agreement()["keyword"]["kappa"]
    assert any(f"keyword judge (κ = {kw:.2f}" in c.value for c in at.caption)  # no response judge in these runs
    assert at.radio(key="frontier_judge").options == ["keyword"]
    table = at.dataframe[0].value
    assert len(table) == 3 and "on frontier" in table and table["on frontier"].any()
    assert "constant-kl beta=0.9" in table["method"].tolist()
    # an experiment with two seeds: error bars over seeds
    at.selectbox(key="frontier_exp").set_value("exp-tiny (yours)")
    at.run()
    assert_clean(at)
    assert figure(at)["data"][-1]["error_y"]["visible"]
    assert (at.dataframe[0].value["seeds"] == 2).all()
    assert any("± std over 2 seeds" in c.value for c in at.caption)
    at.multiselect(key="frontier_runs").set_value(["exp-tiny-sft-s0"])
    at.run()
    at.button(key="frontier_open").click()
    at.run()
    assert_clean(at)
    assert at.session_state["traces_runs"] == ["exp-tiny-sft-s0"]
    assert any("Training traces" in t.value for t in at.title)


def test_regularization_page_filters_aggregates_and_details(env):
    def setup(at):
        at.selectbox(key="reg_run").set_value("adaptive-probe")

    at = open_page("regularization", setup)
    assert_clean(at)
    agg = at.dataframe[0].value
    assert {"times_seen", "mean_beta", "max_beta", "mean_risk", "prompt"} <= set(agg.columns)
    assert agg["mean_beta"].is_monotonic_decreasing
    assert agg["times_seen"].sum() == 6 * 4
    at.multiselect(key="reg_labels").set_value(["harmful"])
    at.run()
    assert set(at.dataframe[0].value["label"]) == {"harmful"}
    at.slider(key="reg_beta").set_value(0.5)
    at.selectbox(key="reg_risk").set_value("risk_judge")
    at.run()
    assert_clean(at)
    assert chart_count(at) == 3  # scatter, histogram, history
    assert "Prompt" in texts(at) and "Training answer" in texts(at)
    at.selectbox(key="reg_run").set_value("exp-tiny-sft-s0")
    at.run()
    assert_clean(at)
    assert "sft" in texts(at) and "nothing was regularized" in texts(at)
    at.selectbox(key="reg_run").set_value("corrupt-run")
    at.run()
    assert_clean(at, allow_errors=("corrupt-run",))
    assert len(at.error) == 1 and "status.json" in at.error[0].value  # listed as corrupt: refused everywhere


def test_demo_page_tells_the_story_from_recorded_runs(env):
    at = open_page("demo")
    assert_clean(at)
    headers = [h.value for h in at.header]
    assert headers == ["1 · The aligned model refuses", "2 · Plain fine-tuning erases that",
                       "3 · The adaptive regularizer keeps the refusals", "4 · What the risk signals saw"]
    assert chart_count(at) == 4
    assert any("Re-run it live" in b.label for b in at.button)


def test_launch_page_pause_toggle_follows_a_pause_made_elsewhere(env, tmp_path, monkeypatch):
    """Paused from a terminal (or another tab) after the page was drawn: a rerun shows it paused and leaves it so
    (the toggle once resumed it, trusting its own old value)."""
    from staysafe.queue import Queue

    runs = tmp_path / "pause-runs"
    monkeypatch.setenv("STAYSAFE_RUNS", str(runs))
    q = Queue(runs)
    at = open_page("launch")
    assert at.toggle(key="launch_paused").value is False
    q.pause()
    at.run()
    assert_clean(at)
    assert q.paused and at.toggle(key="launch_paused").value is True
    q.resume()
    at.run()
    assert not q.paused and at.toggle(key="launch_paused").value is False
    at.toggle(key="launch_paused").set_value(True).run()  # a click still pauses
    assert q.paused


def test_demo_page_live_rerun_goes_through_the_queue(env, tmp_path, monkeypatch):
    from staysafe.queue import Queue, command

    monkeypatch.setenv("STAYSAFE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("STAYSAFE_EXPERIMENTS", str(tmp_path / "exps"))
    q = Queue(tmp_path / "runs")
    q.pause()  # never start the real (135M-model) experiment in a test
    at = open_page("demo")
    for key, preset in (("demo_rerun_live", "live"), ("demo_rerun", "quick")):
        [b for b in at.button if b.key == key][0].click()
        at.run()
        assert_clean(at)
        jobs = [j for j in q.jobs() if j["state"] == "queued"]  # a cancelled job stays listed as cancelled
        assert len(jobs) == 1 and jobs[0]["kind"] == "experiment"
        argv = command(jobs[0], q.root)
        assert argv[argv.index("--preset") + 1] == preset and argv[3] == "experiment"
        # the page follows its own re-run: waiting now, and how it ended once it ends
        assert "Live re-run" in texts(at) and "Waiting in the queue" in texts(at)
        assert q.cancel(jobs[0]["id"]) == "cancelled" and q.worker_pid() is None
        at.run()
        assert any("The re-run ended cancelled" in e.value for e in at.error)


# ----------------------------------------------------------------------------------------------- real browser


def _dashboard_server(dash_data):
    """A real dashboard server on a free port over the test data (every root set by environment): its URL."""
    from scripts.screenshots import dashboard

    return dashboard({f"STAYSAFE_{name.upper()}": str(dash_data[name]) for name in
                      ("runs", "experiments", "compare", "probes")} | {"STAYSAFE_DEMO_DIR": str(dash_data["demo"])})


@pytest.mark.browser
def test_every_page_in_a_real_browser(dash_data, monkeypatch):
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the live training subprocess: see build_dashboard_data
    with _dashboard_server(dash_data) as url:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            # the server's very first request is a deep link: it must still go through app.py's navigation
            page.goto(f"{url}/traces", wait_until="networkidle")
            _wait_for_streamlit(page)
            nav = page.get_by_test_id("stSidebarNav").inner_text()
            assert "Launch a run" in nav and "Guided demo" in nav, nav
            for name in PAGES:
                page.goto(f"{url}/{'' if name == 'home' else name}", wait_until="networkidle")
                _wait_for_streamlit(page)
                exceptions = page.locator('[data-testid="stException"]').count()
                errors = [t for t in page.locator('[data-testid="stAlertContentError"]').all_inner_texts()]
                _screenshot(page, SCREENSHOTS / f"{name}.png")
                assert exceptions == 0, (name, page.locator('[data-testid="stException"]').all_inner_texts())
                assert not errors, (name, errors)
                assert page.locator("h1").count() >= 1, name
            # a corrupt run chosen on purpose shows its error, and only that
            page.goto(f"{url}/regularization", wait_until="networkidle")
            _wait_for_streamlit(page)
            page.get_by_test_id("stSelectbox").first.click()
            page.get_by_role("option", name="corrupt-run (corrupt)").click()
            _wait_for_streamlit(page)
            errors = page.locator('[data-testid="stAlertContentError"]').all_inner_texts()
            assert len(errors) == 1 and "corrupt-run" in errors[0], errors
            # a live run: queue it, watch its progress bar on the launch page, cancel it with the button
            from staysafe.queue import Queue
            from staysafe.runner import RunSpec

            q = Queue(dash_data["runs"])
            live_id = f"browser-live-{int(time.time())}"
            job = q.submit_train(RunSpec(**{**TINY, "steps": 3000, "eval_every": 0}), live_id)
            steps_dir = dash_data["runs"] / live_id / "steps.parquet"
            deadline = time.time() + 300
            while not (steps_dir.is_dir() and len(list(steps_dir.glob("*.parquet"))) >= 3):
                assert time.time() < deadline, q.log_tail(job["id"])
                time.sleep(0.5)
            page.goto(f"{url}/launch", wait_until="networkidle")
            _wait_for_streamlit(page)
            page.get_by_test_id("stProgress").first.wait_for(timeout=30_000)
            assert "step" in page.get_by_test_id("stProgress").first.inner_text()
            _screenshot(page, SCREENSHOTS / "launch_running.png")
            page.get_by_role("button", name="Cancel").first.click()
            deadline = time.time() + 120
            while q.get(job["id"])["state"] != "cancelled":
                assert time.time() < deadline, q.get(job["id"])
                time.sleep(0.5)
            deadline = time.time() + 120  # the queue view refreshes every 2 s (its table's cells may be hidden DOM)
            while page.get_by_text("cancelled").count() == 0:
                assert time.time() < deadline, "the job list never showed 'cancelled'"
                page.wait_for_timeout(300)
            _screenshot(page, SCREENSHOTS / "launch_after_cancel.png")
            browser.close()


def _screenshot(page, path: Path) -> None:
    """Full-page screenshot: Streamlit scrolls inside its main container, so grow the viewport to the content."""
    height = page.evaluate("""() => {
        const main = document.querySelector('[data-testid="stMain"]');
        return Math.max(main ? main.scrollHeight : 0, document.body.scrollHeight);
    }""")
    page.set_viewport_size({"width": 1440, "height": min(12000, max(1000, int(height) + 40))})
    time.sleep(1.5)  # charts re-layout to the new size
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": 1440, "height": 1000})


def _wait_for_streamlit(page, timeout: float = 120) -> None:
    """Wait until the script finished running (no 'running' status widget) and charts had time to draw."""
    deadline = time.time() + timeout
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout * 1000)
    time.sleep(1.0)
    while time.time() < deadline:
        if page.locator('[data-testid="stStatusWidget"]').count() == 0:
            break
        time.sleep(0.3)
    time.sleep(2.0)


@pytest.mark.parametrize("address, where, public, served", [
    (None, "<default>", None, False),  # started outside the repository root: no config file, every interface
    ("0.0.0.0", "/elsewhere/.streamlit/config.toml", None, False),  # a config file found in some directory
    ("0.0.0.0", "command-line argument or environment variable", None, True),  # --server.address asked for it
    ("0.0.0.0", "/elsewhere/.streamlit/config.toml", "1", True),  # STAYSAFE_DASHBOARD_PUBLIC=1
    ("127.0.0.1", "<default>", None, True),
])
def test_dashboard_refuses_an_address_nobody_asked_for(empty_env, monkeypatch, address, where, public, served):
    from streamlit import config
    from streamlit.testing.v1 import AppTest

    old = (config.get_option("server.address"), config.get_where_defined("server.address"))
    if public:
        monkeypatch.setenv("STAYSAFE_DASHBOARD_PUBLIC", public)
    config._set_option("server.address", address, where)
    try:
        at = AppTest.from_file(str(APP), default_timeout=300)
        at.run()
    finally:
        config._set_option("server.address", *old)
    assert not at.exception
    refused = [e.value for e in at.error if "not on 127.0.0.1 only" in e.value]
    assert bool(refused) != served
    if not served:
        assert "--server.address 127.0.0.1" in refused[0] and not at.title  # nothing else is drawn


CRAFTED = "**BOLD** <img src=x onerror=alert(1)> [link](http://198.51.100.7/x) :red[RED] $x^2$"


def markdown_texts(at) -> list[str]:
    """The Markdown source of every element Streamlit renders as Markdown."""
    out = []
    for kind in ("markdown", "caption", "info", "warning", "error", "success", "subheader", "title"):
        out += [str(e.value) for e in getattr(at, kind)]
    return out


def test_text_from_runs_is_never_rendered_as_markdown(dash_data, tmp_path, monkeypatch):
    """Training data, model answers, ids, categories and stored error messages reach Markdown only escaped (or
    through st.text / dataframes): a crafted file cannot add links, images, HTML or colours to a page."""
    runs = tmp_path / "crafted-runs"
    shutil.copytree(dash_data["runs"] / "label-run", runs / "label-run")
    data = pd.read_parquet(runs / "label-run" / "data.parquet")
    data = data.assign(example_id=[f"{CRAFTED} {i}" for i in range(len(data))], category=CRAFTED,
                       prompt=CRAFTED, response=CRAFTED)
    data.to_parquet(runs / "label-run" / "data.parquet")
    status = json.loads((runs / "label-run" / "status.json").read_text())
    (runs / "label-run" / "status.json").write_text(json.dumps({**status, "state": "failed", "error": CRAFTED}))
    point_env(monkeypatch, {**dash_data, "runs": runs})
    shown = []
    for page in ("home", "regularization", "traces"):
        at = open_page(page)
        assert not at.exception, at.exception
        for s in markdown_texts(at):  # inert wherever it appears
            assert "**BOLD**" not in s and "<img" not in s and "](http" not in s and ":red[" not in s, (page, s)
            shown.append(s)
    assert sum("BOLD" in s for s in shown) >= 2, shown  # ... and still shown (the example's id line, the error)


def test_sampled_asr_columns_are_their_own_measures_not_judges():
    """asr_at_k_<judge> / asr_sampled_<judge> (eval_samples > 0) are not read as judges named 'at_k_...'."""
    import charts
    import widgets

    evals = pd.DataFrame(columns=["step", "asr_keyword", "asr_embedding_response", "asr_at_k_keyword",
                                  "asr_sampled_embedding_response", "over_refusal"])
    assert widgets.asr_columns(evals) == (["asr_embedding_response"], ["asr_keyword"])
    assert widgets.sampled_columns(evals) == ["asr_at_k_keyword", "asr_sampled_embedding_response"]
    assert charts.metric_title("asr_at_k_keyword") == "sampled ASR@k (keyword)"
    assert charts.metric_title("asr_sampled_embedding_response") == "sampled per-answer ASR (embedding_response)"


def test_a_page_that_shows_one_judge_shows_the_default_one_where_a_run_has_it():
    """A run recorded with the embedding judge and re-judged with the reader has both columns; the Guided demo and
    the ASR page take the first judge column, which must be the default judge's (alphabetical order put the earlier
    embedding judge first, so the demo showed it instead of the reader)."""
    import widgets

    recorded = pd.DataFrame(columns=["step", "asr_keyword", "asr_embedding_response", "asr_reader"])
    other = pd.DataFrame(columns=["step", "asr_keyword", "asr_local_lm"])
    assert widgets.DEFAULT_ASR == "asr_reader"
    assert widgets.asr_columns(recorded) == (["asr_reader", "asr_embedding_response"], ["asr_keyword"])
    assert widgets.judge_asr_columns([other, recorded]) == ["asr_reader", "asr_embedding_response", "asr_local_lm"]
    assert widgets.judge_asr_columns([other]) == ["asr_local_lm"]


@pytest.mark.browser
def test_clicking_a_point_on_the_asr_chart_opens_that_run_at_that_step(dash_data):
    """A click on a run's line at a step opens that run's answers at that step (a click once opened the step of
    whatever run the selectbox held)."""
    from playwright.sync_api import sync_playwright

    from staysafe.runs.traces import load_run

    with _dashboard_server(dash_data) as url:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1440, "height": 1400})
            page.goto(f"{url}/asr", wait_until="networkidle")
            _wait_for_streamlit(page)
            run_box = page.get_by_test_id("stSelectbox").filter(has=page.get_by_text("run", exact=True)).first
            before = run_box.locator("input").input_value()
            chart = page.get_by_test_id("stPlotlyChart").first
            names = chart.locator("g.legend text.legendtext").all_text_contents()  # SVG: no inner text
            assert len(names) >= 2, names
            names = [n.split(" (")[0] for n in names]  # "<run> (<method>)": the run id
            # the benign-NLL panel (asr_keyword, over_refusal, benign_nll): the tiny model's ASR is the same for every
            # run, so points there overlap; its NLL after training differs between runs
            layer = chart.locator("g.scatterlayer").nth(2)
            lines = layer.locator("g.trace.scatter").filter(has=page.locator("path.point"))  # not the bands
            # the last run's line, its last step: drawn on top, so the click is its own even where points overlap;
            # the run box held the first run before the click
            lines.last.locator("path.point").last.click(force=True)
            last_step = int(load_run(dash_data["runs"] / names[-1]).evals["step"].max())
            assert not before.startswith(names[-1] + " "), before
            deadline = time.time() + 60
            while not run_box.locator("input").input_value().startswith(names[-1] + " "):
                assert time.time() < deadline, (names, run_box.locator("input").input_value())
                time.sleep(0.3)
            step_box = page.get_by_test_id("stSelectbox").filter(has=page.get_by_text("step", exact=True)).first
            assert step_box.locator("input").input_value() == str(last_step)
            browser.close()
