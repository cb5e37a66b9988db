"""compare-risk: the probe and the judges scored on the same labelled examples, summarised for the dashboard."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli
from staysafe.eval.compare import agreement, compare_risk


def test_agreement_and_kappa():
    a = np.array([0.9, 0.8, 0.1, 0.2, np.nan])
    b = np.array([0.7, 0.2, 0.3, 0.1, 0.9])
    out = agreement(a, b, 0.5)
    assert out["n"] == 4 and out["agreement"] == pytest.approx(0.75)
    assert out["kappa"] == pytest.approx(0.5)


def test_compare_risk_on_the_tiny_model(tmp_path):
    summary = compare_risk(model="tiny", data=["eval-harmful", "eval-benign"], judges=["keyword", "embedding"],
                           out_dir=tmp_path / "cmp")
    table = pd.read_parquet(tmp_path / "cmp" / "compare.parquet")
    assert len(table) == summary["n"] > 200
    assert {"example_id", "label", "category", "prompt", "probe", "keyword", "embedding"} <= set(table.columns)
    assert set(summary["sources"]) == {"probe", "keyword", "embedding"}
    for s in ("probe", "embedding"):
        assert 0.0 <= summary["sources"][s]["auroc"] <= 1.0 and summary["sources"][s]["seconds_per_100"] > 0
    assert summary["sources"]["embedding"]["auroc"] > 0.85  # MiniLM + head separates held-out requests
    # the keyword judge scores responses: the held-out harmful prompts carry none, so it flags those rows instead of
    # guessing, and scores the benign ones' reference answers
    assert summary["sources"]["keyword"]["n_missing"] == int((table["label"] == "harmful").sum()) > 100
    assert table.loc[table["label"] == "benign", "keyword"].notna().all()
    assert "probe vs embedding" in summary["agreement"]
    assert json.loads((tmp_path / "cmp" / "summary.json").read_text())["n"] == summary["n"]


def test_compare_risk_cli_rejects_unlabelled_data(tmp_path):
    (tmp_path / "u.jsonl").write_text('{"prompt": "hello"}\n')
    res = run_cli("compare-risk", "--model", "tiny", "--data", str(tmp_path / "u.jsonl"), "--judges", "keyword",
                  "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "needs every example labelled" in res.stderr
