"""Weighted k-nearest-neighbour classification on cached features (DINO's kNN eval).

Cosine similarity (features L2-normalized), the k most similar training rows vote for
their label with weight exp(similarity / T); defaults k=20, T=0.07 as DINO. Memory stays
bounded on large banks (DINO #161, solo-learn #186): queries go in chunks, and each
chunk walks the bank in chunks too, keeping a running top-k, so no (queries x bank)
matrix is ever whole.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from evals.features.extractor import resolve_device
from evals.probes.classify import accuracies, as_labels, as_rows

K, TEMPERATURE = 20, 0.07


def _unit_rows(x: np.ndarray | Tensor, device: torch.device) -> Tensor:
    return torch.nn.functional.normalize(as_rows(x, device), dim=1)


def knn_scores(
    train_x: np.ndarray | Tensor,
    train_y: np.ndarray | Tensor,
    test_x: np.ndarray | Tensor,
    num_classes: int,
    *,
    k: int = K,
    temperature: float = TEMPERATURE,
    query_chunk: int = 1024,
    bank_chunk: int = 65536,
    device: str | torch.device | None = None,
) -> Tensor:
    """(N_test, num_classes) class votes normalized to sum 1 per row (CPU, float32).

    Weights are exp((s - s_max) / T) with s_max the row's best similarity: the same
    normalized votes as exp(s / T), without overflow at small T. k is capped at the
    bank's size. Among equal similarities the earlier bank row wins, whatever the chunks.
    """
    dev = resolve_device(device)
    bank = _unit_rows(train_x, dev)
    labels = as_labels(train_y, dev)
    queries = _unit_rows(test_x, dev)
    k = min(k, len(bank))
    out = []
    for q0 in range(0, len(queries), query_chunk):
        q = queries[q0 : q0 + query_chunk]
        best_sim = torch.full((len(q), 0), -float("inf"), device=dev)
        best_idx = torch.zeros((len(q), 0), dtype=torch.long, device=dev)
        for b0 in range(0, len(bank), bank_chunk):
            sim = q @ bank[b0 : b0 + bank_chunk].T
            top = sim.topk(min(k, sim.shape[1]), dim=1)
            # Running top-k over (kept so far | this chunk); kept rows come first, so a
            # stable sort keeps the earlier bank row on ties.
            cand_sim = torch.cat([best_sim, top.values], dim=1)
            cand_idx = torch.cat([best_idx, top.indices + b0], dim=1)
            order = torch.sort(cand_sim, dim=1, descending=True, stable=True).indices[:, :k]
            best_sim, best_idx = cand_sim.gather(1, order), cand_idx.gather(1, order)
        weights = torch.exp((best_sim - best_sim[:, :1]) / temperature)
        votes = torch.zeros(len(q), num_classes, device=dev)
        votes.scatter_add_(1, labels[best_idx], weights)
        out.append((votes / votes.sum(1, keepdim=True)).cpu())
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def knn_eval(
    train_x: np.ndarray | Tensor,
    train_y: np.ndarray | Tensor,
    test_x: np.ndarray | Tensor,
    test_y: np.ndarray | Tensor,
    num_classes: int,
    *,
    k: int = K,
    temperature: float = TEMPERATURE,
    device: str | torch.device | None = None,
) -> dict:
    """{"top1", "top5" (None when <= 5 classes), "k", "temperature"} on the test rows."""
    scores = knn_scores(
        train_x, train_y, test_x, num_classes, k=k, temperature=temperature, device=device
    )
    top1, top5 = accuracies(scores, as_labels(test_y, scores.device), num_classes)
    return {"top1": top1, "top5": top5, "k": min(k, len(train_y)), "temperature": temperature}
