"""The geometry of saved activations, for the dashboard and notebooks: 2-d projections of many points and how
linearly separable harmful and benign prompts are at a layer."""

from __future__ import annotations

import numpy as np

from staysafe.logistic import cross_validated_auroc

PROJECTIONS = ("PCA", "UMAP", "t-SNE")
MAX_FIT = 5000


UMAP_EXACT_MAX = 5000  # UMAP's own transform runs optimisation epochs (~2 s per 1,000 points on 2 CPU cores)


def project_points(arrays: list[np.ndarray], method: str, fit_n: int = 2000, seed: int = 0
                   ) -> tuple[list[np.ndarray], int, str]:
    """Project several point sets with ONE 2-d projection fitted on a sample of their union.

    PCA and UMAP are fitted on at most ``fit_n`` (<= 5,000) points and then place every point, so 100,000 points
    stay cheap. UMAP's own ``transform`` is used for up to 5,000 further points; beyond that each point is placed at
    the distance-weighted mean of its 10 nearest sampled neighbours (UMAP's transform initialisation, without its
    slow refinement epochs). t-SNE cannot place new points, so only the sample gets coordinates (others are NaN).
    Returns the coordinates per set, the number of points fitted on, and a note saying how the rest was placed.
    """
    sizes = [len(a) for a in arrays]
    union = np.concatenate([a.astype(np.float32) for a in arrays], axis=0)
    n = len(union)
    fit_n = int(min(max(10, fit_n), MAX_FIT, n))
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=fit_n, replace=False)) if fit_n < n else np.arange(n)
    rest = np.setdiff1d(np.arange(n), sample)
    mean = union[sample].mean(0)
    std = union[sample].std(0)
    std[std == 0] = 1.0
    z = (union - mean) / std
    note = "every point transformed"
    if method == "PCA":
        from sklearn.decomposition import PCA

        coords = PCA(n_components=2, random_state=seed).fit(z[sample]).transform(z)
    elif method == "UMAP":
        import umap
        from sklearn.decomposition import PCA

        k = int(min(50, z.shape[1], len(sample) - 1))
        pca = PCA(n_components=k, random_state=seed).fit(z[sample])
        zs = pca.transform(z[sample])
        reducer = umap.UMAP(n_components=2, n_neighbors=int(min(15, len(sample) - 1)), random_state=seed,
                            n_jobs=1).fit(zs)
        coords = np.full((n, 2), np.nan, dtype=np.float32)
        coords[sample] = reducer.embedding_
        if len(rest) and len(rest) <= UMAP_EXACT_MAX:
            coords[rest] = reducer.transform(pca.transform(z[rest]))
        elif len(rest):
            from sklearn.neighbors import NearestNeighbors

            nn = NearestNeighbors(n_neighbors=int(min(10, len(sample)))).fit(zs)
            for start in range(0, len(rest), 20000):
                chunk = rest[start:start + 20000]
                dist, idx = nn.kneighbors(pca.transform(z[chunk]))
                w = 1.0 / (dist + 1e-6)
                coords[chunk] = (reducer.embedding_[idx] * w[..., None]).sum(1) / w.sum(1, keepdims=True)
            note = (f"the other {len(rest):,} points placed at the weighted mean of their 10 nearest sampled "
                    "neighbours (UMAP's own transform is used up to 5,000 points)")
    elif method == "t-SNE":
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE

        k = int(min(50, z.shape[1], len(sample) - 1))
        x = PCA(n_components=k, random_state=seed).fit_transform(z[sample])
        coords = np.full((n, 2), np.nan, dtype=np.float32)
        coords[sample] = TSNE(n_components=2, perplexity=float(min(30, max(2, (len(sample) - 1) / 3))),
                              random_state=seed, init="pca").fit_transform(x)
        note = "t-SNE cannot place new points, so only the sample is shown" if len(rest) else note
    else:
        raise ValueError(f"unknown projection {method!r}: choose one of {', '.join(PROJECTIONS)}")
    out, start = [], 0
    for size in sizes:
        out.append(np.asarray(coords[start:start + size], dtype=np.float32))
        start += size
    return out, fit_n, note


def separability_auroc(x: np.ndarray, labels: np.ndarray, max_n: int = 2000, seed: int = 0) -> float:
    """Cross-validated AUROC of a fresh linear probe on activations ``x`` with ``labels`` (harmful / benign;
    others are ignored), on at most ``max_n`` points: is the intent linearly separable? NaN with < 5 per class."""
    keep = np.isin(labels, ["harmful", "benign"])
    x, y = x.astype(np.float32)[keep], (labels[keep] == "harmful").astype(int)
    if len(y) > max_n:
        idx = np.random.default_rng(seed).choice(len(y), max_n, replace=False)
        x, y = x[idx], y[idx]
    return cross_validated_auroc(x, y, C=0.1, folds=5, seed=seed)
