"""What the classifier probes share: their inputs as tensors, and how a test set is scored.

The linear probes (`linear`), kNN (`knn`) and fine-tuning (`finetune`) each fit a
classifier their own way, then report the same figures on the test rows: top-1, and
top-5 only when there are more than five classes (below that it is always 1). Written
once here so that every probe's top-1 means the same, ties included.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def as_rows(
    a: np.ndarray | Tensor, device: torch.device, dtype: torch.dtype = torch.float32
) -> Tensor:
    """A (N, D) feature array as a `dtype` tensor on `device`."""
    return torch.as_tensor(a).to(device, dtype)


def as_labels(a: np.ndarray | Tensor, device: torch.device) -> Tensor:
    """(N,) class labels as an int64 tensor on `device`."""
    return torch.as_tensor(a).long().to(device)


def topk_accuracy(logits: Tensor, labels: Tensor, k: int = 1) -> float:
    """Share of rows whose label is among the k highest scores. For k = 1 the first
    highest score wins a tie (argmax), as scikit-learn's `predict` does."""
    if k == 1:
        return float((logits.argmax(-1) == labels).float().mean())
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return float((top == labels.unsqueeze(-1)).any(-1).float().mean())


def accuracies(scores: Tensor, labels: Tensor, num_classes: int) -> tuple[float, float | None]:
    """(top-1, top-5) of class scores (N, num_classes) against `labels`; top-5 is None
    with five classes or fewer."""
    labels = labels.to(scores.device)
    top5 = topk_accuracy(scores, labels, 5) if num_classes > 5 else None
    return topk_accuracy(scores, labels, 1), top5
