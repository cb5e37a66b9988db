"""The risk policy on its own: fallback for missing scores, batch aggregation, EMA and its checkpointed state."""

from __future__ import annotations

import math

import pytest
import torch

from staysafe.options import SafetyOptions
from staysafe.risk import RiskPolicy, read_signals

NAN = float("nan")


def policy(**kw) -> RiskPolicy:
    opts = SafetyOptions(**kw)
    opts.check_safety_options()
    return RiskPolicy(opts)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_adaptive_beta_maps_the_batch_risk_linearly():
    p = policy(beta_min=0.1, beta_max=0.5, batch_risk="max")
    beta, risk, fallback, s = p.decide({"label": t(0.0, 0.5, 0.25)}, 3, "cpu")
    assert s == 0.5 and torch.allclose(beta, torch.full((3,), 0.3))
    assert not fallback.any() and torch.equal(risk, t(0.0, 0.5, 0.25))
    _, _, _, mean = policy(batch_risk="mean").decide({"label": t(0.0, 0.5, 0.25)}, 3, "cpu")
    assert mean == pytest.approx(0.25)


def test_per_example_beta_follows_each_examples_risk():
    beta, _, _, s = policy(beta_min=0.0, beta_max=1.0, per_example_beta=True).decide({"label": t(0.0, 1.0)}, 2, "cpu")
    assert torch.equal(beta, t(0.0, 1.0)) and s == 0.5


def test_ema_smooths_over_steps_and_its_state_survives_a_checkpoint():
    p = policy(risk_ema=0.5, batch_risk="mean")
    seen = [p.decide({"label": t(r)}, 1, "cpu")[3] for r in (1.0, 0.0, 0.0)]
    assert seen == [1.0, 0.5, 0.25]
    resumed = policy(risk_ema=0.5, batch_risk="mean")
    resumed.load_state_dict(p.state_dict())
    assert resumed.decide({"label": t(0.0)}, 1, "cpu")[3] == p.decide({"label": t(0.0)}, 1, "cpu")[3] == 0.125
    assert p.state_dict() == {"ema": 0.125, "last": 0.125, "drift": 0.0}


@pytest.mark.parametrize("fallback,probe,last,expected", [
    ("probe", 0.3, 0.8, 0.3),       # the probe's reading first
    ("probe", NAN, 0.8, 0.8),       # then the last batch risk
    ("probe", NAN, None, 1.0),      # then the worst case
    ("last", 0.3, 0.8, 0.8),        # last ignores the probe
    ("last", 0.3, None, 1.0),
    ("max", 0.3, 0.8, 1.0),         # max assumes the worst at once
])
def test_missing_scores_fall_back_in_the_documented_order(fallback, probe, last, expected):
    p = policy(risk="judge", risk_fallback=fallback)
    p.last = last
    risk, missing = p.fill_missing({"judge": t(NAN, 0.1), "probe": t(probe, 0.9)})
    assert missing.tolist() == [True, False]
    assert risk[0].item() == pytest.approx(expected) and risk[1].item() == pytest.approx(0.1)


def test_sft_and_constant_kl_record_the_risk_but_it_sets_nothing():
    for method, b in (("sft", 0.0), ("constant-kl", 0.4)):
        p = policy(method=method, beta=0.4)
        beta, risk, fallback, s = p.decide({"label": t(1.0, 0.0)}, 2, "cpu")
        assert torch.allclose(beta, torch.full((2,), b)) and risk.isnan().all() and math.isnan(s)
        assert p.state_dict() == {"ema": None, "last": None, "drift": 0.0}


def test_read_signals_rejects_sources_that_break_the_contract():
    inputs = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "risk_label": t(0.0, 1.0)}
    from staysafe.risk import ColumnRisk

    assert read_signals({"label": ColumnRisk("label")}, inputs, None)["label"].tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="returned 3 values for a batch of 2"):
        read_signals({"bad": lambda b: t(0.0, 0.0, 0.0)}, inputs, None)
    with pytest.raises(ValueError, match="outside"):
        read_signals({"bad": lambda b: t(0.0, 2.0)}, inputs, None)
