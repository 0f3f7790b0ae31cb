"""Grouped units: each channel pooled with the channels that fire with it on unlabeled data.

Coates, Karpathy and Ng (NIPS 2012) found object-selective features by grouping learned
features whose responses are correlated on unlabeled images and pooling each group. A
single winner-take-all channel fires for the concept and for some textures; channels that
also fire for the concept share its frames but not, in general, their false alarms, so the
mean of a channel's most correlated partners keeps the shared response and averages the
rest down. The groups are fitted on the unlabeled frames the network was trained on (never
on the labeled concept set), and the random-weights baseline gets the same treatment, so
a grouped unit is scored exactly like a single one: a fixed pooling layer on top of the
network. The single-channel headline stays the headline; the grouped units are reported
beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evals.neurons.selectivity import best_layer


@dataclass
class Groups:
    """Row c of `members` is channel c and its most correlated partners (size columns);
    `mean`/`std` standardize each channel's value as on the unlabeled frames."""

    members: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    def values(self, values: np.ndarray) -> np.ndarray:
        """(N, C) -> (N, C): each group's mean standardized member value."""
        z = (np.asarray(values, dtype=np.float64) - self.mean) / self.std
        return z[:, self.members].mean(2)


def fit_groups(values: np.ndarray, size: int) -> Groups:
    """Groups of `size` channels from (N, C) per-frame unit values (e.g. the max over
    space) on unlabeled frames, by the Pearson correlation of those values."""
    values = np.asarray(values, dtype=np.float64)
    n, channels = values.shape
    if not 1 <= size <= channels:
        raise ValueError(f"group size must be between 1 and {channels}, got {size}")
    if n < 2:
        raise ValueError(f"fitting groups needs at least 2 frames, got {n}")
    mean, std = values.mean(0), values.std(0)
    std = np.where(std > 0, std, 1.0)  # a dead channel stays at 0 and correlates with nothing
    z = (values - mean) / std
    correlation = (z.T @ z) / n
    np.fill_diagonal(correlation, np.inf)  # every group starts with its own channel
    members = np.argsort(-correlation, axis=1, kind="stable")[:, :size]
    return Groups(members=members, mean=mean, std=std)


def groups_summary(layers: dict) -> dict | None:
    """metrics["groups"]: per layer the best grouped unit (trained and random weights, each
    picked on the selection half) and its members; "best" is the best layer's, picked on
    the selection half as the single-unit headline is."""
    grouped = {name: layer["groups"] for name, layer in layers.items() if "groups" in layer}
    if not grouped:
        return None
    out = {}
    for name, g in grouped.items():
        trained, random = g["trained"], g["random"]
        unit = trained.best_unit
        out[name] = {
            "unit": int(unit),
            "members": [int(m) for m in g["trained_members"][unit]],
            "heldout": float(trained.heldout[unit]),
            "auroc": float(trained.auroc[unit]),  # the same unit's, as in the headline
            "select_accuracy": float(trained.select_accuracy[unit]),
            "random_heldout": random.best_heldout,
            "random_auroc": random.best_auroc,
            "size": int(g["trained_members"].shape[1]),
        }
    best = best_layer({name: g["trained"] for name, g in grouped.items()})
    return {"layers": out, "best": {"layer": best, **out[best]}}
