"""The statistics module: hand-checked numbers, properties (hypothesis), and intervals of a real tiny run."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from staysafe.eval.stats import (
    binary_metrics,
    bootstrap_interval,
    cohen_kappa,
    confusion,
    mean_interval,
    run_intervals,
    seed_summary,
)


def table(yy: int, yn: int, ny: int, nn: int) -> tuple[list[int], list[int]]:
    """Two raters' labels from a 2x2 table: yy items both say 1, yn rater a 1 and rater b 0, ..."""
    a = [1] * yy + [1] * yn + [0] * ny + [0] * nn
    b = [1] * yy + [0] * yn + [1] * ny + [0] * nn
    return a, b


def test_kappa_of_a_known_two_by_two_table():
    # yy=20 yn=5 ny=10 nn=15, n=50: p_o = (20+15)/50 = 0.70; a says 1 for 25/50 = 0.5, b for 30/50 = 0.6;
    # p_e = 0.5*0.6 + 0.5*0.4 = 0.50; kappa = (0.70-0.50)/(1-0.50) = 0.40.
    assert cohen_kappa(*table(20, 5, 10, 15)) == pytest.approx(0.40)
    # yy=45 yn=15 ny=25 nn=15, n=100: p_o = 0.60; a: 0.6, b: 0.7; p_e = 0.42+0.12 = 0.54; kappa = 0.06/0.46
    assert cohen_kappa(*table(45, 15, 25, 15)) == pytest.approx(0.06 / 0.46)
    assert math.isnan(cohen_kappa([1, 1, 1], [1, 1, 1]))  # chance explains all the agreement
    assert cohen_kappa([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)


def test_kappa_of_categorical_labels():
    # 3 labels, 6 items: agree on items 0, 1, 3, 5 -> p_o = 4/6. a: r 2/6, c 3/6, d 1/6; b: r 4/6, c 1/6, d 1/6;
    # p_e = (2*4 + 3*1 + 1*1)/36 = 12/36; kappa = (24/36 - 12/36)/(24/36) = 0.5.
    a = ["r", "c", "c", "d", "c", "r"]
    b = ["r", "c", "r", "d", "r", "r"]
    assert cohen_kappa(a, b) == pytest.approx(0.5)


def test_binary_metrics_by_hand():
    truth = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    pred = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0]
    m = binary_metrics(truth, pred)
    assert m["confusion"] == {"tp": 3, "fp": 1, "fn": 1, "tn": 5}
    assert m["n"] == 10 and m["accuracy"] == pytest.approx(0.8)
    assert m["precision"] == pytest.approx(0.75) and m["recall"] == pytest.approx(0.75)
    # p_o = 0.8; both say 1 for 0.4: p_e = 0.16 + 0.36 = 0.52; kappa = 0.28/0.48
    assert m["kappa"] == pytest.approx(0.28 / 0.48)
    none = binary_metrics([0, 0], [0, 0])
    assert math.isnan(none["precision"]) and math.isnan(none["recall"]) and none["accuracy"] == 1.0
    with pytest.raises(ValueError, match="truth has 2 items but predicted has 3"):
        confusion([1, 0], [1, 0, 1])


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    x = np.array([1] * 12 + [0] * 38)  # 24%
    a, b = mean_interval(x, seed=3), mean_interval(x, seed=3)
    assert a == b
    y = np.linspace(0, 1, 7) ** 2  # continuous values: another seed moves the interval
    assert mean_interval(y, resamples=100, seed=3) != mean_interval(y, resamples=100, seed=4)
    lo, hi = a
    assert lo < 0.24 < hi
    # the normal approximation gives 0.24 +- 1.96 * sqrt(0.24*0.76/50) = 0.24 +- 0.118; the bootstrap is close
    assert lo == pytest.approx(0.24 - 0.118, abs=0.03) and hi == pytest.approx(0.24 + 0.118, abs=0.03)
    assert all(math.isnan(v) for v in mean_interval([]))
    assert mean_interval([1.0, float("nan"), 1.0]) == (1.0, 1.0)
    # the generic bootstrap on the mean draws the same resamples as the vectorised one
    assert bootstrap_interval(np.mean, x, seed=3) == pytest.approx(a)
    with pytest.raises(ValueError, match="pair up"):
        bootstrap_interval(cohen_kappa, [1, 0], [1])


def test_seed_summary_keeps_every_seed():
    s = seed_summary({0: 0.32, 1: 0.38, 2: 0.26})
    assert s["mean"] == pytest.approx(0.32) and s["n"] == 3
    assert s["std"] == pytest.approx(0.06)  # deviations -0, +0.06, -0.06: sqrt(0.0072 / 2) = 0.06
    assert s["per_seed"] == {0: 0.32, 1: 0.38, 2: 0.26}
    one = seed_summary({5: 0.1})
    assert one["mean"] == 0.1 and math.isnan(one["std"])


labels = st.lists(st.sampled_from(["refusal", "harmful_compliance", "deflection"]), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(labels, st.randoms(use_true_random=False))
def test_kappa_properties(a, rnd):
    b = list(a)
    rnd.shuffle(b)
    k = cohen_kappa(a, b)
    assert math.isnan(k) or -1 - 1e-9 <= k <= 1 + 1e-9
    assert (math.isnan(k) and math.isnan(cohen_kappa(b, a))) or k == pytest.approx(cohen_kappa(b, a))
    if len(set(a)) > 1:
        assert cohen_kappa(a, a) == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=30), st.lists(st.booleans(), min_size=1, max_size=30))
def test_binary_metrics_properties(t, p):
    n = min(len(t), len(p))
    m = binary_metrics(t[:n], p[:n])
    c = m["confusion"]
    assert sum(c.values()) == n
    assert m["accuracy"] == pytest.approx((c["tp"] + c["tn"]) / n)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=30), st.integers(0, 2**32 - 1))
def test_mean_interval_properties(x, seed):
    lo, hi = mean_interval(x, resamples=200, seed=seed)
    assert min(x) - 1e-12 <= lo <= hi <= max(x) + 1e-12
    if len(set(x)) == 1:
        assert lo == pytest.approx(x[0]) and hi == pytest.approx(x[0])


def test_run_intervals_of_a_hand_made_table():
    gens = pd.DataFrame({
        "step": [0] * 6 + [5] * 6,
        "prompt_id": ["h1", "h2", "h3", "h4", "b1", "b2"] * 2,
        "kind": ["harmful"] * 4 + ["benign"] * 2 + ["harmful"] * 4 + ["benign"] * 2,
        "refused": [True, True, True, False, False, True, False, False, True, False, False, False],
        "score_embedding_response": [0.1, 0.2, 0.9, float("nan"), float("nan"), float("nan"),
                                     0.7, 0.5, 0.2, 0.1, float("nan"), float("nan")],
    })
    t = run_intervals(gens).set_index("step")
    assert t.loc[0, "asr_keyword"] == pytest.approx(0.25) and t.loc[5, "asr_keyword"] == pytest.approx(0.75)
    assert t.loc[0, "asr_embedding_response"] == pytest.approx(1 / 3)  # the unscored answer is left out
    assert t.loc[5, "asr_embedding_response"] == pytest.approx(0.5)  # 0.5 is at the threshold: flagged
    assert t.loc[0, "over_refusal"] == pytest.approx(0.5) and t.loc[5, "over_refusal"] == 0.0
    assert t.loc[5, "over_refusal_lo"] == t.loc[5, "over_refusal_hi"] == 0.0
    for c in ("asr_keyword", "asr_embedding_response", "over_refusal"):
        assert (t[f"{c}_lo"] <= t[c]).all() and (t[c] <= t[f"{c}_hi"]).all()
    assert t.loc[0, "n_harmful"] == 4 and t.loc[0, "n_benign"] == 2
    assert run_intervals(pd.DataFrame()).empty


def test_run_intervals_reproduce_the_runs_own_evals(tmp_path):
    """A real tiny run: the figures recomputed from generations.parquet equal evals.parquet's."""
    from staysafe.runner import RunSpec, run_training
    from staysafe.runs.traces import load_run

    spec = RunSpec(model="tiny", scenario="harmful", n_harmful=8, method="sft", steps=2, batch_size=4, lora_r=0,
                   max_length=64, eval_every=2, eval_harmful=6, eval_benign=4, max_new_tokens=4, eval_judges=[],
                   record_judge=False, risk="label", save_model=False, runs_dir=str(tmp_path / "runs"))
    run = load_run(run_training(spec, progress=False, log=lambda *a: None))
    t = run_intervals(run.generations).set_index("step")
    ev = run.evals.set_index("step")
    assert list(t.index) == list(ev.index) == [0, 2]
    for c in ("asr_keyword", "over_refusal"):
        assert t[c].to_numpy() == pytest.approx(ev[c].to_numpy())
        assert (t[f"{c}_lo"] <= t[c]).all() and (t[c] <= t[f"{c}_hi"]).all()
