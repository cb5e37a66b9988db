"""Judge vs probe: score the same labelled examples with the activation probe and every judge, and summarise.

Writes ``compare.parquet`` (one row per example: label, category, text, ``probe`` and one column per judge) and
``summary.json`` (per source: AUROC, accuracy at the threshold, seconds per 100 examples; pairwise agreement and
Cohen's kappa). The dashboard's "Judge vs probe" page reads these.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from staysafe.judges import make_judge
from staysafe.models.loading import load_model
from staysafe.options import ALIGNED
from staysafe.probe import Probe, collect_activations, default_probe
from staysafe.records import DataError, load_records, prompt_text, response_text
from staysafe.runs.traces import read_json, read_table, write_json, write_parquet


def _source_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    from sklearn.metrics import roc_auc_score

    ok = ~np.isnan(p)
    out = {"n_scored": int(ok.sum()), "n_missing": int((~ok).sum())}
    if ok.sum() and len(set(y[ok])) == 2:
        out["auroc"] = float(roc_auc_score(y[ok], p[ok]))
        out["accuracy"] = float(((p[ok] >= threshold) == (y[ok] == 1)).mean())
    return out


def agreement(a: np.ndarray, b: np.ndarray, threshold: float) -> dict:
    """Share of examples where two sources make the same decision at the threshold, and Cohen's kappa."""
    ok = ~(np.isnan(a) | np.isnan(b))
    da, db = a[ok] >= threshold, b[ok] >= threshold
    if not ok.any():
        return {"agreement": math.nan, "kappa": math.nan, "n": 0}
    po = float((da == db).mean())
    pe = float(da.mean() * db.mean() + (1 - da.mean()) * (1 - db.mean()))
    return {"agreement": po, "kappa": (po - pe) / (1 - pe) if pe < 1 else math.nan, "n": int(ok.sum())}


def compare_risk(model: str = ALIGNED, data=("eval-harmful", "eval-benign"),
                 judges=("embedding", "local-lm"), out_dir: Path = Path("compare"), probe_path: str | None = None,
                 threshold: float = 0.5) -> dict:
    records = [r for name in data for r in load_records(name, need_response=False)]
    labels = np.array([1 if r["label"] == "harmful" else 0 if r["label"] == "benign" else -1 for r in records])
    if (labels < 0).any():
        raise DataError("compare-risk needs every example labelled 'harmful' or 'benign'")
    m, tok = load_model(model)
    probe = Probe.load(probe_path, hidden_size=m.config.hidden_size) if probe_path else default_probe(m, tok, model)
    prompts = [prompt_text(r) for r in records]
    responses = [response_text(r) for r in records]

    table = pd.DataFrame({"example_id": [r["id"] for r in records], "label": [r["label"] for r in records],
                          "category": [r["category"] for r in records], "prompt": prompts, "response": responses})
    cost, sources = {}, {}
    t0 = time.perf_counter()
    acts = collect_activations(m, tok, records, layers=probe.layers, position=probe.position, progress=False)
    table["probe"] = probe.predict_proba(probe.features(acts))
    cost["probe"] = (time.perf_counter() - t0) / len(records) * 100
    sources["probe"] = table["probe"].to_numpy(dtype=float)
    del m
    for name in judges:
        judge = make_judge(name)
        t0 = time.perf_counter()
        scores = judge.score(prompts, responses)  # uncached on purpose: this measures the backend's cost
        cost[judge.name] = (time.perf_counter() - t0) / len(records) * 100
        table[judge.name] = scores
        sources[judge.name] = np.array(scores, dtype=float)

    summary = {"model": model, "data": list(data), "n": len(records), "threshold": threshold,
               "sources": {s: {**_source_metrics(labels, p, threshold), "seconds_per_100": cost[s]}
                           for s, p in sources.items()},
               "agreement": {f"{a} vs {b}": agreement(sources[a], sources[b], threshold)
                             for i, a in enumerate(sources) for b in list(sources)[i + 1:]},
               "probe": {"layers": probe.layers, "sweep": probe.metrics.get("sweep", [])}}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_parquet(out_dir / "compare.parquet", table)
    write_json(out_dir / "summary.json", summary)
    return summary


def load_compare(directory: Path) -> tuple[pd.DataFrame, dict]:
    """A compare directory's per-example table and summary (TraceError naming the file when damaged)."""
    directory = Path(directory)
    return read_table(directory / "compare.parquet"), read_json(directory / "summary.json")
