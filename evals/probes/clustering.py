"""Deep clustering: k-means in latent space, scored by NMI and ARI against the labels.

k-means is Lloyd's algorithm from greedy k-means++ seeds (as scikit-learn: 2 + log k
candidate centres per pick, the one lowering the potential most), several restarts,
the lowest inertia kept. NMI uses the arithmetic mean of the entropies and ARI the pair
counts, as scikit-learn's defaults do, so the figures compare with published ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from evals.features.extractor import resolve_device


@dataclass
class KMeansResult:
    labels: np.ndarray  # (N,) int64 cluster of each row
    centers: np.ndarray  # (k, D)
    inertia: float  # sum of squared distances to the assigned centre
    iterations: int


def _sq_distances(x: Tensor, x_sq: Tensor, centers: Tensor, chunk: int = 16384) -> Tensor:
    """(N, k) squared Euclidean distances, computed in row chunks, clamped at 0."""
    c_sq = (centers * centers).sum(1)
    parts = [
        (x_sq[i : i + chunk, None] - 2.0 * x[i : i + chunk] @ centers.T + c_sq).clamp_min_(0)
        for i in range(0, len(x), chunk)
    ]
    return torch.cat(parts)


def _kmeans_pp(x: Tensor, x_sq: Tensor, k: int, generator: torch.Generator) -> Tensor:
    n = len(x)
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [x[first]]
    closest = _sq_distances(x, x_sq, x[first : first + 1])[:, 0]
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0:  # fewer distinct points than k: any row will do
            pick = torch.randint(n, (trials,), generator=generator)
        else:
            probs = (closest / total).cpu()
            pick = torch.multinomial(probs, trials, replacement=True, generator=generator)
        pick = pick.to(x.device)
        cand = _sq_distances(x, x_sq, x[pick])  # (N, trials)
        potentials = torch.minimum(closest[:, None], cand).sum(0)
        best = int(potentials.argmin())
        closest = torch.minimum(closest, cand[:, best])
        centers.append(x[pick[best]])
    return torch.stack(centers)


def kmeans(
    x: np.ndarray | Tensor,
    k: int,
    *,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> KMeansResult:
    """k-means of the rows of x (float64 on CPU, float32 on CUDA).

    Stops when the squared centre shift is at most `tol` times the data's mean per-
    dimension variance (scikit-learn's relative tolerance). An emptied cluster restarts
    at the row farthest from its centre."""
    dev = resolve_device(device)
    dtype = torch.float64 if dev.type == "cpu" else torch.float32
    data = torch.as_tensor(x).to(dev, dtype)
    n = len(data)
    if not 1 <= k <= n:
        raise ValueError(f"k-means: k={k} must be within [1, {n}]")
    x_sq = (data * data).sum(1)
    threshold = tol * float(data.var(0, unbiased=False).mean())
    generator = torch.Generator().manual_seed(seed)
    best: KMeansResult | None = None
    for _ in range(n_init):
        centers = _kmeans_pp(data, x_sq, k, generator)
        iterations = 0
        for iterations in range(1, max_iter + 1):  # noqa: B007 (reported)
            dist = _sq_distances(data, x_sq, centers)
            assign = dist.argmin(1)
            sums = torch.zeros_like(centers).index_add_(0, assign, data)
            counts = torch.bincount(assign, minlength=k).to(dtype)
            new = sums / counts.clamp_min(1)[:, None]
            empty = (counts == 0).nonzero().flatten()
            if len(empty):
                far = dist.gather(1, assign[:, None])[:, 0].topk(len(empty)).indices
                new[empty] = data[far]
            shift = float(((new - centers) ** 2).sum())
            centers = new
            if shift <= threshold:
                break
        dist = _sq_distances(data, x_sq, centers)
        inertia, assign = dist.min(1)
        result = KMeansResult(
            assign.cpu().numpy().astype(np.int64),
            centers.cpu().numpy(),
            float(inertia.sum()),
            iterations,
        )
        if best is None or result.inertia < best.inertia:
            best = result
    assert best is not None
    return best


def _contingency(labels_true: np.ndarray, labels_pred: np.ndarray) -> np.ndarray:
    a = np.asarray(labels_true)
    b = np.asarray(labels_pred)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"labelings of shapes {a.shape} and {b.shape}: need two equal 1-d")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1 if len(a) else 0, bi.max() + 1 if len(b) else 0), np.int64)
    np.add.at(table, (ai, bi), 1)
    return table


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def normalized_mutual_info(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """MI / mean(H(true), H(pred)) in nats; 1.0 when both labelings are a single cluster."""
    table = _contingency(labels_true, labels_pred)
    if table.shape[0] == table.shape[1] == 1 or table.size == 0:
        return 1.0
    n = table.sum()
    rows, cols = table.sum(1), table.sum(0)
    nz = np.nonzero(table)
    p = table[nz] / n
    mi = float((p * (np.log(table[nz] * n) - np.log(rows[nz[0]] * cols[nz[1]]))).sum())
    mi = max(mi, 0.0)
    normalizer = 0.5 * (_entropy(rows) + _entropy(cols))
    if normalizer <= 0:
        return 0.0 if mi <= 0 else 1.0
    return float(mi / max(normalizer, np.finfo(np.float64).eps))


def adjusted_rand_index(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Hubert and Arabie's ARI from the pair confusion counts (1.0 for identical
    partitions, about 0 for independent ones)."""
    table = _contingency(labels_true, labels_pred)
    n = int(table.sum())
    sum_squares = int((table.astype(np.int64) ** 2).sum())
    rows = table.sum(1).astype(np.int64)
    cols = table.sum(0).astype(np.int64)
    tp = sum_squares - n
    fp = int((table @ cols).sum()) - sum_squares
    fn = int((table.T @ rows).sum()) - sum_squares
    tn = n * n - fp - fn - sum_squares
    if fn == 0 and fp == 0:
        return 1.0
    return float(2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)))


def cluster_eval(
    x: np.ndarray | Tensor,
    labels: np.ndarray,
    *,
    k: int | None = None,
    n_init: int = 10,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict:
    """k-means (k = number of classes present by default) of standardized rows, scored
    against `labels`: {"nmi", "ari", "k", "inertia", "n"}. Standardized per dimension with
    the rows' own statistics, so no dimension dominates by scale alone."""
    from evals.probes.linear import standardize

    labels = np.asarray(labels)
    k = int(len(np.unique(labels))) if k is None else k
    t = torch.as_tensor(x).double()
    (z,) = standardize(t, t)
    result = kmeans(z, k, n_init=n_init, seed=seed, device=device)
    return {
        "nmi": normalized_mutual_info(labels, result.labels),
        "ari": adjusted_rand_index(labels, result.labels),
        "k": k,
        "inertia": result.inertia,
        "n": len(labels),
    }
