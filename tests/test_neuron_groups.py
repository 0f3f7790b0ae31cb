"""Grouped units (evals.neurons.groups): channels that share the concept's frames but not
their false alarms, pooled, separate the concept better than any one of them."""

import numpy as np
import pytest

from evals.neurons.groups import fit_groups
from evals.neurons.selectivity import auroc


def detectors(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 12) unit values and (n,) labels: channels 0-3 fire for the concept (30% of
    frames), each also for its own 25% of false alarms; channels 4-11 are noise."""
    rng = np.random.default_rng(seed)
    concept = rng.random(n) < 0.3
    values = rng.normal(0.0, 0.3, (n, 12))
    values[:, :4] += concept[:, None] + (rng.random((n, 4)) < 0.25)
    return values, concept.astype(np.int64)


def test_a_group_of_correlated_detectors_beats_each_of_them():
    unlabeled, _ = detectors(4000, seed=0)
    groups = fit_groups(unlabeled, size=4)
    assert sorted(groups.members[0]) == [0, 1, 2, 3] and groups.members[0][0] == 0
    assert all(row[0] == c for c, row in enumerate(groups.members))  # each group starts at itself
    values, labels = detectors(2000, seed=1)
    single = auroc(values, labels)[:4]
    grouped = auroc(groups.values(values), labels)[:4]
    assert single.max() < 0.90  # one detector's false alarms cost it
    assert grouped.min() > single.max() + 0.05  # the shared response survives, the rest averages


def test_a_dead_channel_stays_finite_and_sizes_are_checked():
    values, _ = detectors(100, seed=2)
    values[:, 5] = 0.0
    groups = fit_groups(values, size=3)
    assert np.isfinite(groups.values(values)).all()
    with pytest.raises(ValueError, match="between 1 and 12"):
        fit_groups(values, size=13)
    with pytest.raises(ValueError, match="at least 2 frames"):
        fit_groups(values[:1], size=2)
