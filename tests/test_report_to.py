"""Metrics where the ecosystem looks for them: a tiny run with ``--report-to tensorboard`` writes an event file whose
scalars, read back with tensorboard's own reader, equal the Parquet trace row by row (steps and evaluations)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY_RUN, make_records, run_cli
from staysafe.runs.traces import load_run

pytest.importorskip("tensorboard")


def read_scalars(run_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(run_dir.rglob("events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(files[0]), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_equal_the_parquet_trace(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_records(16, harmful_every=3)))
    res = run_cli("train", *TINY_RUN, "--data", str(data), "--steps", "4", "--eval-every", "2", "--method",
                  "adaptive", "--risk", "label", "--batch-risk", "mean", "--report-to", "tensorboard",
                  "--runs-dir", str(tmp_path / "runs"), "--run-id", "tb", "--threads", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    run = load_run(tmp_path / "runs" / "tb")
    assert run.config["report_to"] == "tensorboard"
    scalars = read_scalars(run.path)
    steps = run.steps.set_index("step")
    columns = ["loss", "nll", "kl", "beta", "risk", "n_fallback"] + [c for c in steps if c.startswith("risk_")]
    assert {"risk_label", "risk_probe"} <= set(columns)
    for col in columns:
        logged = scalars[f"train/{col}"]
        assert sorted(logged) == list(steps.index), col
        # event files hold float32: equal to the trace up to float32 rounding
        np.testing.assert_allclose([logged[s] for s in steps.index], steps[col].astype("float32"), rtol=1e-6,
                                   atol=0, err_msg=col)
    evals = run.evals.set_index("step")
    for col in ("asr_keyword", "over_refusal", "benign_nll"):
        logged = scalars[f"eval/{col}"]
        assert sorted(logged) == list(evals.index) == [0, 2, 4], col
        np.testing.assert_allclose([logged[s] for s in evals.index], evals[col].astype("float32"), rtol=1e-6,
                                   err_msg=col)
