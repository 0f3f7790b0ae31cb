"""How well single units detect a concept: Le et al.'s score, a held-out score, AUROC.

For every unit of a layer, from its reduced activations (N, C) on a labeled concept set
(label 1 = the concept, 0 = not), split once into a selection half and a test half:

- `le`: the score of Le et al. (2012): the best accuracy over 20 thresholds evenly spaced
  between the unit's min and max, "fires above the threshold = concept", all picked on
  the test half itself, as the paper did. Biased upward (PITFALLS "Evals"); reported for
  comparability only.
- `heldout`: threshold (the same 20-point grid, on the selection half's range) and sign
  chosen on the selection half, accuracy on the test half.
- `auroc`: on the test half, in the direction in which the unit's AUROC on the selection
  half is above 0.5; 0.5 is chance whatever the class balance. `auroc_raw`: the "fires for the concept" direction.

The layer's best unit is chosen on the selection half too (`best_heldout`, `best_auroc`:
the test-half score of the unit best on the selection half), so that picking one unit
out of thousands does not inflate the headline; `le_best` is the maximum over units on
the test half, the paper's number. `chance` is the majority share of the test half.
Everything is computed the same way for the random-weights network (`compare`), and a
trained figure counts as above another only by more than two standard errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_THRESHOLDS = 20


def _grid(values: np.ndarray) -> np.ndarray:
    """(N_THRESHOLDS, C) thresholds evenly spaced between each column's min and max."""
    lo, hi = values.min(0), values.max(0)
    steps = np.linspace(0.0, 1.0, N_THRESHOLDS)[:, None]
    return lo[None] + steps * (hi - lo)[None]


def threshold_accuracy(
    values: np.ndarray, labels: np.ndarray, thresholds: np.ndarray
) -> np.ndarray:
    """(T, C) accuracy of "value >= threshold means concept" for each threshold row."""
    positive = labels.astype(bool)[:, None]
    out = np.empty(thresholds.shape, dtype=np.float64)
    for t, row in enumerate(thresholds):
        out[t] = ((values >= row[None]) == positive).mean(0)
    return out


def auroc(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(C,) area under the ROC curve of each column as a score for label 1 (ties count
    half), by the Mann-Whitney rank sum with average ranks; nan if a class is absent."""
    labels = labels.astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return np.full(values.shape[1], np.nan)
    out = np.empty(values.shape[1])
    n = len(labels)
    for c in range(values.shape[1]):
        order = np.argsort(values[:, c], kind="mergesort")
        sorted_values = values[order, c]
        starts = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
        group = np.cumsum(starts) - 1
        first = np.flatnonzero(starts)
        last = np.r_[first[1:], n]
        average_rank = (first + last + 1) / 2.0  # 1-based ranks first+1 .. last, averaged
        ranks = np.empty(n)
        ranks[order] = average_rank[group]
        out[c] = (ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return out


@dataclass
class LayerScores:
    """Per-unit scores of one layer (arrays of length C) and the layer's headline."""

    le: np.ndarray
    heldout: np.ndarray
    auroc: np.ndarray
    auroc_raw: np.ndarray
    select_accuracy: np.ndarray  # accuracy on the selection half at the chosen threshold
    select_auroc: np.ndarray  # AUROC on the selection half in the chosen direction
    threshold: np.ndarray
    sign: np.ndarray  # +1: concept when above the threshold, -1: when below
    chance: float
    n_select: int
    n_test: int
    best_unit: int  # best on the selection half (accuracy)
    best_auroc_unit: int  # best on the selection half (AUROC)

    @property
    def best_heldout(self) -> float:
        return float(self.heldout[self.best_unit])

    @property
    def best_auroc(self) -> float:
        return float(self.auroc[self.best_auroc_unit])

    @property
    def le_best(self) -> float:
        return float(np.max(self.le))

    def ranking(self) -> np.ndarray:
        """Units best first: by selection-half accuracy, then AUROC, then index."""
        return np.lexsort((np.arange(len(self.le)), -self.select_auroc, -self.select_accuracy))

    def headline(self) -> dict[str, float | int]:
        return {
            "best_unit": int(self.best_unit),
            "best_heldout": self.best_heldout,
            "best_auroc_unit": int(self.best_auroc_unit),
            "best_auroc": self.best_auroc,
            "le_best": self.le_best,
            "le_best_unit": int(np.argmax(self.le)),
            "chance": self.chance,
            "n_select": self.n_select,
            "n_test": self.n_test,
        }

    def per_unit(self) -> dict[str, list]:
        return {
            "le": self.le.tolist(),
            "heldout": self.heldout.tolist(),
            "auroc": self.auroc.tolist(),
            "auroc_raw": self.auroc_raw.tolist(),
            "threshold": self.threshold.tolist(),
            "sign": self.sign.astype(int).tolist(),
        }


def score_units(
    values: np.ndarray, labels: np.ndarray, select_idx: np.ndarray, test_idx: np.ndarray
) -> LayerScores:
    """Scores of every unit (columns of `values`, (N, C)) for binary `labels` (N,),
    thresholds and signs chosen on rows `select_idx`, measured on rows `test_idx`."""
    values = np.asarray(values, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if set(np.unique(labels)) - {0, 1}:
        raise ValueError("concept labels must be 0 (not the concept) or 1 (the concept)")
    sel_v, sel_y = values[select_idx], labels[select_idx]
    test_v, test_y = values[test_idx], labels[test_idx]
    # (a) Le et al.: on the test half alone, positive direction.
    le = threshold_accuracy(test_v, test_y, _grid(test_v)).max(0)
    # (b) held-out: threshold and sign from the selection half.
    grid = _grid(sel_v)
    sel_acc = threshold_accuracy(sel_v, sel_y, grid)  # (T, C); the other sign is 1 - acc
    both = np.concatenate([sel_acc, 1.0 - sel_acc])  # rows: T positive, then T negative
    choice = both.argmax(0)  # first best: lowest threshold, positive sign first
    units = np.arange(values.shape[1])
    sign = np.where(choice < N_THRESHOLDS, 1, -1)
    threshold = grid[choice % N_THRESHOLDS, units]
    above = test_v >= threshold[None]
    predicted = np.where(sign[None] > 0, above, ~above)
    heldout = (predicted == test_y.astype(bool)[:, None]).mean(0)
    raw_test = auroc(test_v, test_y)
    raw_sel = auroc(sel_v, sel_y)
    # the AUROC direction is chosen on the selection half by AUROC itself
    auroc_sign = np.where(raw_sel >= 0.5, 1, -1)
    signed_test_auroc = np.where(auroc_sign > 0, raw_test, 1.0 - raw_test)
    select_auroc = np.where(auroc_sign > 0, raw_sel, 1.0 - raw_sel)
    select_accuracy = both.max(0)
    order = np.lexsort((units, -select_auroc, -select_accuracy))
    auroc_order = np.lexsort((units, -select_accuracy, -np.nan_to_num(select_auroc)))
    return LayerScores(
        le=le,
        heldout=heldout,
        auroc=signed_test_auroc,
        auroc_raw=auroc(values, labels),
        select_accuracy=select_accuracy,
        select_auroc=select_auroc,
        threshold=threshold,
        sign=sign,
        chance=float(max(test_y.mean(), 1.0 - test_y.mean())),
        n_select=len(select_idx),
        n_test=len(test_idx),
        best_unit=int(order[0]),
        best_auroc_unit=int(auroc_order[0]),
    )


def best_layer(layers: dict[str, LayerScores]) -> str:
    """The layer whose best unit scores highest on the selection half (the earliest on a
    tie): how the headline picks its layer, so picking it does not see the test half."""
    names = list(layers)
    return max(
        names,
        key=lambda n: (layers[n].select_accuracy[layers[n].best_unit], -names.index(n)),
    )


def standard_error(p: float, n: int) -> float:
    return float(np.sqrt(max(p * (1.0 - p), 1e-12) / max(n, 1)))


def verdict(trained: float, random: float, chance: float, n: int) -> str:
    """Plain words for one figure against its baselines (accuracy-like, 2 standard errors)."""
    margin_chance = 2 * standard_error(chance, n)
    margin_random = 2 * standard_error(max(random, 0.5), n)
    if trained <= chance + margin_chance:
        return "not above chance"
    if trained <= random + margin_random:
        return "above chance, but not above random weights"
    return "above chance and above random weights"


def compare(trained: LayerScores, random: LayerScores | None) -> dict:
    """The layer's headline, trained beside random weights, with verdicts."""
    out = {"trained": trained.headline()}
    if random is None:
        out["verdict"] = {"heldout": "no random-weights baseline was computed"}
        return out
    out["random"] = random.headline()
    n = trained.n_test
    out["verdict"] = {
        "heldout": verdict(trained.best_heldout, random.best_heldout, trained.chance, n),
        # AUROC's chance is 0.5 whatever the balance; its standard error is at most
        # that of an accuracy on the smaller class, used here as a conservative margin.
        "auroc": verdict(trained.best_auroc, random.best_auroc, 0.5, n // 2),
    }
    out["gain_over_random"] = {
        "heldout": trained.best_heldout - random.best_heldout,
        "auroc": trained.best_auroc - random.best_auroc,
    }
    return out
