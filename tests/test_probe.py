"""The activation probe: fitting, saving, refusing foreign models, and free reading inside training."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_records
from staysafe.data import SafetyCollator, tokenize_dataset
from staysafe.probe import Activations, Probe, ProbeError, ProbeRisk, collect_activations, fit_probe
from staysafe.risk import Calibration, RiskBatch


def planted(n=400, dim=32, seed=0, layers=(0, 1, 2)):
    """Synthetic activations: only layer 1 carries a linear 'harmful' direction."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    direction = rng.normal(size=dim)
    values = {l: rng.normal(size=(n, dim)).astype(np.float16) for l in layers}
    values[1] = (values[1] + np.outer(2 * y - 1, direction) * 0.8).astype(np.float16)
    index = pd.DataFrame({"id": [f"x{i}" for i in range(n)], "label": np.where(y == 1, "harmful", "benign"),
                          "category": None, "prompt": ""})
    return Activations(values=values, index=index), direction


def test_fit_recovers_a_planted_direction():
    acts, direction = planted()
    held, _ = planted(seed=1)
    held.values[1] = held.values[1]  # same generator, new samples; direction differs per seed so rebuild below
    rng = np.random.default_rng(1)
    y = (held.index["label"] == "harmful").to_numpy().astype(int)
    held.values[1] = (rng.normal(size=held.values[1].shape) + np.outer(2 * y - 1, direction) * 0.8).astype(np.float16)
    probe = fit_probe(acts, held_out=held)
    assert probe.layers == [1]
    sweep = {r["layer"]: r for r in probe.metrics["sweep"]}
    assert sweep[1]["val_auroc"] > 0.95 and sweep[0]["val_auroc"] < 0.7
    assert probe.metrics["test"]["auroc"] > 0.95
    w = probe.coef / probe.scale
    cos = abs(w @ direction) / np.linalg.norm(w) / np.linalg.norm(direction)
    assert cos > 0.8, cos


def test_fixed_and_concatenated_layers():
    acts, _ = planted()
    assert fit_probe(acts, layer=2).layers == [2]
    both = fit_probe(acts, layer=[1, 2])
    assert both.layers == [1, 2] and both.coef.shape == (64,)
    with pytest.raises(ValueError, match="not collected"):
        fit_probe(acts, layer=7)


def test_save_reload_gives_identical_scores(tmp_path):
    acts, _ = planted()
    probe = fit_probe(acts)
    path = probe.save(tmp_path / "p" / "probe")
    again = Probe.load(path)
    x = probe.features(acts)
    assert np.array_equal(probe.predict_proba(x), again.predict_proba(x))
    assert again.metrics["sweep"] == probe.metrics["sweep"]
    assert (tmp_path / "p" / "probe.npz").is_file() and path.suffix == ".json"


def test_hidden_size_mismatch_and_damage_are_clear(tmp_path):
    acts, _ = planted()
    path = fit_probe(acts, model="some-model").save(tmp_path / "probe")
    with pytest.raises(ProbeError, match="hidden size 32 .*some-model.*this model has hidden size 576"):
        Probe.load(path, hidden_size=576)
    (tmp_path / "probe.npz").write_bytes(b"not an npz")
    with pytest.raises(ProbeError, match="missing or damaged"):
        Probe.load(path)
    (tmp_path / "x.json").write_text('{"format": "other"}')
    with pytest.raises(ProbeError, match="not a StaySafe probe"):
        Probe.load(tmp_path / "x.json")


def test_activations_round_trip_as_float16(tmp_path, tiny):
    model, tok = tiny
    acts = collect_activations(model, tok, make_records(5), layers=[0, 2], batch_size=2, progress=False)
    acts.save(tmp_path / "a")
    back = Activations.load(tmp_path / "a")
    assert back.layers == [0, 2] and back.values[2].dtype == np.float16 and back.values[2].shape == (5, 64)
    assert np.array_equal(back.values[2], acts.values[2])
    assert back.index["id"].tolist() == [f"r{i}" for i in range(5)]


def test_batching_does_not_change_activations(tiny):
    model, tok = tiny
    recs = make_records(6)
    a = collect_activations(model, tok, recs, layers=[1], batch_size=1, progress=False)
    b = collect_activations(model, tok, recs, layers=[1], batch_size=6, progress=False)
    assert np.allclose(a.values[1].astype(np.float32), b.values[1].astype(np.float32), atol=2e-3)


@pytest.mark.parametrize("position", ["last_prompt_token", "mean"])
def test_in_training_probe_score_equals_prompt_only_score(tiny, position):
    """Hidden states of prompt+answer at the last prompt token equal a prompt-only forward (causal mask)."""
    from staysafe.data import load_records, prompt_messages, render_prompt
    from staysafe.probe import read_position

    model, tok = tiny
    recs = load_records("refusals")[:12] + load_records("align-benign")[:12]
    batch = SafetyCollator(tok.pad_token_id)([dict(r) for r in tokenize_dataset(tok, recs, 128)])
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True).hidden_states
        for i, rec in enumerate(recs):  # one prompt-only forward each, no padding at all
            ids = tok(render_prompt(tok, prompt_messages(rec)), add_special_tokens=False, return_tensors="pt")
            alone = model(**ids, output_hidden_states=True).hidden_states
            for layer in (1, 2):
                a = read_position(alone[layer], torch.tensor([ids["input_ids"].shape[1] - 1]), position)
                b = read_position(hidden[layer][i:i + 1], batch["prompt_end"][i:i + 1], position)
                assert torch.allclose(a, b, atol=1e-5), (i, layer)
    acts = collect_activations(model, tok, recs, layers=[1, 2], position=position, progress=False)
    probe = fit_probe(acts, layer=[1, 2], val_fraction=0.5)
    prompt_only = probe.predict_proba(probe.features(acts))
    in_training = ProbeRisk(probe)(RiskBatch(batch, hidden)).numpy()
    assert np.allclose(in_training, prompt_only, atol=5e-3), np.abs(in_training - prompt_only).max()


def test_calibrations():
    p = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, float("nan")])
    assert Calibration("identity")(p)[:5].tolist() == p[:5].tolist()
    assert Calibration("step", threshold=0.5)(p)[:5].tolist() == [0, 0, 1, 1, 1]
    assert Calibration("step")(p)[5].isnan()
    s = Calibration("sigmoid", threshold=0.5, temperature=0.1)(p)
    assert s[2] == pytest.approx(0.5) and s[0] < 0.01 and s[4] > 0.99
    # the paper's schedule on a 1-5 rating: clamp((r - 2) / 3, 0.1, 0.9), rating = 1 + 4p
    assert Calibration("clamp")(p)[:5].tolist() == pytest.approx([0.1, 0.1, 1 / 3, 2 / 3, 0.9])
    with pytest.raises(ValueError, match="calibration must be one of"):
        Calibration("cubic")
