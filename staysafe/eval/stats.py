"""The statistics behind every reported figure: agreement of a judge with labels, and the uncertainty of a rate.

- agreement: :func:`confusion`, :func:`binary_metrics` (accuracy, precision and recall of "positive", e.g.
  "attack succeeded"), :func:`cohen_kappa` (chance-corrected agreement of two label sequences);
- within one run: :func:`bootstrap_interval` / :func:`mean_interval`, the percentile bootstrap over items
  (prompts): resample the n items with replacement ``resamples`` times (default 2000) with a seeded generator, take
  the statistic on each resample and report the 2.5th and 97.5th percentiles. Resamples on which the statistic is
  undefined (NaN, e.g. kappa when a resample holds one class only) are left out. One seed gives one interval; the
  same seed and item count draw the same resamples, so intervals of different columns are comparable;
- across seeds: :func:`seed_summary`, mean ± sample std (ddof 1) plus every per-seed value, because three seeds
  are too few for an interval and the reader should see them all;
- :func:`run_intervals`: the per-step ASR and over-refusal of a run's ``generations.parquet`` with intervals.
Pure numpy / pandas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd

from staysafe.judges.base import FLAG_THRESHOLD
from staysafe.runs import trace_names

RESAMPLES = 2000
LEVEL = 0.95


# ----------------------------------------------------------------------------------------------- agreement


def _bools(values, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr.astype(bool)


def confusion(truth, predicted) -> dict:
    """Counts of a binary decision against the truth: ``{"tp", "fp", "fn", "tn"}`` (positive = True)."""
    t, p = _bools(truth, "truth"), _bools(predicted, "predicted")
    if len(t) != len(p):
        raise ValueError(f"truth has {len(t)} items but predicted has {len(p)}")
    return {"tp": int((t & p).sum()), "fp": int((~t & p).sum()), "fn": int((t & ~p).sum()),
            "tn": int((~t & ~p).sum())}


def cohen_kappa(a, b) -> float:
    """Cohen's kappa of two label sequences (any hashable labels): (p_o - p_e) / (1 - p_e).

    p_o is the share of items on which they agree, p_e the agreement expected by chance from each side's label
    shares. NaN when p_e = 1 (both sides give every item the same single label: agreement says nothing).
    """
    a, b = np.asarray(a), np.asarray(b)
    if len(a) != len(b):
        raise ValueError(f"the two label sequences differ in length ({len(a)} vs {len(b)})")
    if len(a) == 0:
        return math.nan
    labels = np.union1d(a, b)
    po = float(np.mean(a == b))
    pe = float(sum(np.mean(a == k) * np.mean(b == k) for k in labels))
    return math.nan if pe >= 1.0 else (po - pe) / (1.0 - pe)


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def binary_metrics(truth, predicted) -> dict:
    """Accuracy, precision and recall of the positive class, Cohen's kappa and the confusion counts.

    Precision is NaN when nothing is predicted positive, recall when nothing is truly positive.
    """
    c = confusion(truth, predicted)
    n = sum(c.values())
    return {"n": n, "accuracy": _ratio(c["tp"] + c["tn"], n), "precision": _ratio(c["tp"], c["tp"] + c["fp"]),
            "recall": _ratio(c["tp"], c["tp"] + c["fn"]),
            "kappa": cohen_kappa(_bools(truth, "truth"), _bools(predicted, "predicted")), "confusion": c}


# ----------------------------------------------------------------------------------------------- bootstrap


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def bootstrap_interval(statistic: Callable[..., float], *arrays, resamples: int = RESAMPLES, level: float = LEVEL,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*arrays)``; the arrays are items resampled together (paired).

    ``(nan, nan)`` when there are no items or the statistic is undefined on every resample.
    """
    arrays = [np.asarray(a) for a in arrays]
    if not arrays:
        raise ValueError("bootstrap_interval needs at least one array of items")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"the arrays must pair up item by item; lengths {[len(a) for a in arrays]}")
    if n == 0:
        return math.nan, math.nan
    stats = np.array([statistic(*(a[idx] for a in arrays)) for idx in _indices(n, resamples, seed)], dtype=float)
    return _percentiles(stats, level)


def mean_interval(values, *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (of a rate, for 0/1 values); NaN values are left out first."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return math.nan, math.nan
    return _percentiles(x[_indices(x.size, resamples, seed)].mean(axis=1), level)


# ----------------------------------------------------------------------------------------------- seeds


def seed_summary(values: Mapping) -> dict:
    """``{"mean", "std", "n", "per_seed"}`` of one figure over seeds (``{seed: value}``); std is the sample std
    (ddof 1), NaN for a single seed. NaN values are listed in ``per_seed`` but left out of mean, std and n."""
    per_seed = {int(k) if isinstance(k, (int, np.integer)) else k: float(v) for k, v in dict(values).items()}
    finite = np.array([v for v in per_seed.values() if not math.isnan(v)])
    return {"mean": float(finite.mean()) if finite.size else math.nan,
            "std": float(finite.std(ddof=1)) if finite.size > 1 else math.nan,
            "n": int(finite.size), "per_seed": per_seed}


# ----------------------------------------------------------------------------------------------- run tables


def run_intervals(generations: pd.DataFrame, *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0,
                  threshold: float = FLAG_THRESHOLD) -> pd.DataFrame:
    """One row per evaluated step of a run's ``generations.parquet``: the figures of ``evals.parquet`` recomputed
    from the answers, each with a bootstrap interval over prompts (``<figure>_lo``, ``<figure>_hi``).

    Figures: ``asr_keyword`` (harmful prompts answered without a refusal marker), ``asr_<judge>`` for every
    ``score_<judge>`` column (harmful prompts scored >= ``threshold``; unscored answers left out, as in the
    evaluation), ``over_refusal`` (benign prompts answered with a refusal marker) and, with a user task,
    ``task_accuracy``; plus ``n_harmful``, ``n_benign`` (and ``n_task``).
    """
    if generations.empty:
        return pd.DataFrame(columns=["step"])
    missing = {"step", "kind", "refused"} - set(generations.columns)
    if missing:
        raise ValueError(f"generations table lacks column(s) {sorted(missing)}")
    judges = sorted(c[len("score_"):] for c in generations.columns if c.startswith("score_"))  # trace_names.score()
    rows = []
    for step, g in generations.groupby("step", sort=True):
        harmful, benign = g[g["kind"] == "harmful"], g[g["kind"] == "benign"]
        figures = {"asr_keyword": (~harmful["refused"].astype(bool)).astype(float).to_numpy()}
        for j in judges:
            scores = harmful[trace_names.score(j)].astype(float).to_numpy()
            figures[trace_names.asr(j)] = np.where(np.isnan(scores), np.nan, (scores >= threshold).astype(float))
        figures["over_refusal"] = benign["refused"].astype(bool).astype(float).to_numpy()
        task = g[g["kind"] == "task"]
        row = {"step": int(step), "n_harmful": len(harmful), "n_benign": len(benign)}
        if len(task) and "correct" in task:
            figures["task_accuracy"] = task["correct"].astype(bool).astype(float).to_numpy()
            row["n_task"] = len(task)
        for name, values in figures.items():
            finite = values[~np.isnan(values)]
            row[name] = float(finite.mean()) if finite.size else math.nan
            row[f"{name}_lo"], row[f"{name}_hi"] = mean_interval(values, resamples=resamples, level=level, seed=seed)
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------- ranking


def auroc(truth, scores) -> float:
    """Area under the ROC curve of ``scores`` against ``truth`` (positive = True): the chance that a random positive
    scores above a random negative, ties counting half (as ``sklearn.metrics.roc_auc_score``). NaN when one class
    is missing; fast enough to bootstrap (``bootstrap_interval(auroc, truth, scores)``)."""
    t, s = _bools(truth, "truth"), np.asarray(scores, dtype=float)
    if len(t) != len(s):
        raise ValueError(f"truth has {len(t)} items but scores has {len(s)}")
    positives, negatives = s[t], np.sort(s[~t])
    if positives.size == 0 or negatives.size == 0:
        return math.nan
    below = np.searchsorted(negatives, positives, side="left")  # negatives strictly below each positive
    not_above = np.searchsorted(negatives, positives, side="right")  # ... plus the ties
    return float((below + not_above).sum() / (2 * positives.size * negatives.size))
