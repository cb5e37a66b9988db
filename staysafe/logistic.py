"""The one logistic-head fit of the project, shared by the activation probe, the embedding judge and the
dashboard's separability: class-balanced, L2-regularised logistic regression (scikit-learn's lbfgs), optionally on
standardised features. numpy in, numpy out; scikit-learn loads only when a head is fitted."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LogisticHead:
    """``p = sigmoid(((x - mean) / scale) @ coef + intercept)`` (mean 0 and scale 1 when not standardised)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        z = ((x - self.mean) / self.scale) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))


def fit_logistic(x: np.ndarray, y: np.ndarray, *, C: float, standardize: bool, max_iter: int = 3000,
                 seed: int | None = None) -> LogisticHead:
    """Fit a head on features ``x`` [N, D] and 0/1 labels ``y`` (1 = harmful). ``C``: inverse regularisation
    strength; ``standardize``: fit on features scaled to mean 0 / std 1 (constant features keep scale 1)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    clf = LogisticRegression(class_weight="balanced", C=C, max_iter=max_iter, random_state=seed)
    if not standardize:
        clf.fit(x, y)
        return LogisticHead(np.zeros(x.shape[1]), np.ones(x.shape[1]), clf.coef_[0], float(clf.intercept_[0]))
    scaler = StandardScaler().fit(x)
    clf.fit(scaler.transform(x), y)
    return LogisticHead(scaler.mean_, np.where(scaler.scale_ > 0, scaler.scale_, 1.0), clf.coef_[0],
                        float(clf.intercept_[0]))


def cross_validated_auroc(x: np.ndarray, y: np.ndarray, *, C: float = 0.1, folds: int = 5, seed: int = 0) -> float:
    """AUROC of out-of-fold predictions of standardised logistic heads (stratified folds): how linearly
    separable the two classes are. NaN with fewer than ``folds`` examples of a class."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    if len(set(y.tolist())) < 2 or np.bincount(y).min() < folds:
        return float("nan")
    p = np.zeros(len(y))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        p[test] = fit_logistic(x[train], y[train], C=C, standardize=True, max_iter=2000).predict_proba(x[test])
    return float(roc_auc_score(y, p))
