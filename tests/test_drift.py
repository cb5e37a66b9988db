"""adaptive-drift, the closed-loop method, on real tiny-model runs: a policy that drifts from the reference's refusals
gets a higher beta than one that does not, on data whose risk is zero; the reading is recorded per step; a resumed
run keeps the controller's state."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conftest import make_records
from staysafe.runner import RunSpec, run_training
from staysafe.runs.traces import load_run

BASE = dict(model="tiny", scenario=None, batch_size=4, max_length=64, eval_every=0, eval_harmful=0, eval_benign=0,
            eval_judges=[], record_judge=False, save_model=False, risk="label")


def jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def refusing_tiny(tmp_path: Path) -> str:
    """A tiny model fine-tuned on the canary set's refusals: a reference whose refusals a drifting policy leaves."""
    from staysafe.data import load_records

    refusals = [{k: r[k] for k in ("id", "messages", "label", "category")} for r in load_records("refusals")[:64]]
    run = run_training(RunSpec(**{**BASE, "save_model": True}, method="sft", lora_r=0, lr=5e-3, steps=15,
                               data=jsonl(tmp_path / "refusals.jsonl", refusals), runs_dir=str(tmp_path / "align"),
                               run_id="refusing"), progress=False, log=lambda *a: None)
    from staysafe.models.loading import load_tokenizer

    load_tokenizer("tiny").save_pretrained(run / "final_model")  # SmolLM2's, as tiny uses
    return str(run / "final_model")


def test_a_drifting_policy_gets_a_higher_beta_than_a_still_one(tmp_path):
    reference = refusing_tiny(tmp_path)
    benign = jsonl(tmp_path / "benign.jsonl", make_records(40, harmful_every=0))  # data risk 0 on every batch
    runs = {}
    for name, lr in (("still", 1e-9), ("drifting", 3e-2)):  # LoRA: the reference is the adapter switched off
        spec = RunSpec(**{**BASE, "model": reference}, data=benign, method="adaptive-drift", lora_r=8, lr=lr, steps=8,
                       drift_every=2, drift_gain=2.0, beta_min=0.05, beta_max=0.9, runs_dir=str(tmp_path / "runs"),
                       run_id=name)
        runs[name] = load_run(run_training(spec, progress=False, log=lambda *a: None)).steps.set_index("step")
    still, drifting = runs["still"], runs["drifting"]
    assert (still["risk_label"] == 0).all() and (drifting["risk_label"] == 0).all()  # the data says nothing
    assert abs(still["drift"]).max() < 1e-3 and np.allclose(still["beta"], 0.05, atol=1e-3)
    assert drifting["drift"].max() > 0.1, drifting[["drift", "risk", "beta"]]
    assert drifting["beta"].max() > still["beta"].max() + 0.1
    # the loop closes: the raised beta pulls the policy back toward the reference's refusals
    top = drifting["drift"].idxmax()
    assert drifting["drift"].loc[top + 2] < drifting["drift"].loc[top], drifting[["drift", "beta"]]
    # beta follows the recorded reading: beta_min + (beta_max - beta_min) * clamp(gain * drift, 0, 1)
    expected = 0.05 + 0.85 * np.clip(2.0 * drifting["drift"], 0, 1)
    np.testing.assert_allclose(drifting["beta"], expected, atol=1e-4)
    # read every drift_every steps (the reading holds in between): steps 1-2 share one, 3-4 the next, ...
    assert drifting["drift"].iloc[0] == drifting["drift"].iloc[1] == 0.0  # step 1: the policy is the reference
    assert drifting["drift"].loc[3] == drifting["drift"].loc[4] != drifting["drift"].loc[5]
