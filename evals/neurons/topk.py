"""Streaming per-unit statistics: exact top-K inputs, a quantile sketch, mean, activity.

The neuron analysis reads every input of a dataset once and keeps, per unit, state of
size O(K + buckets), never O(inputs): the K most activating inputs (value, key, argmax
location), a log-bucket quantile sketch, the sum, min, max and the count of inputs on
which the unit is active (> 0). Partial states of disjoint parts of the data merge
exactly (`UnitStats.merge`), so Ray tasks can each reduce one part.

Exactness needs a total order: entries are ranked by value (descending), then by key
(ascending). Keys are mapped to integer ids that sort as the keys do (`KeyIndex`), so
the tie-break is a vectorized integer comparison and the answer never depends on how
the data was split or batched (PITFALLS "Evals": merge with a final top-k, ties by key).

The sketch's buckets are fixed for every unit and every part (boundaries gamma**i, as in
DDSketch): merging is adding counts, and any quantile comes back within a relative error
of (gamma - 1) / 2 of an exact one, for |values| in [SKETCH_MIN, SKETCH_MIN * gamma**B].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

SKETCH_GAMMA = 1.04
SKETCH_MIN = 1e-4  # |v| below this counts in the zero bucket
SKETCH_BUCKETS = 600  # per sign: up to 1e-4 * 1.04**600, about 1.7e6
PAD_ID = 2**32 - 1  # id of an empty slot; real ids (dataset positions) are below it


class KeyIndex:
    """Sample keys <-> integer ids whose order is the keys' order (so ties break by key)."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = sorted(keys)
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("sample keys are not unique")
        self._ids = {key: i for i, key in enumerate(self.keys)}

    def ids(self, keys: Sequence[str]) -> np.ndarray:
        return np.fromiter((self._ids[k] for k in keys), dtype=np.int64, count=len(keys))

    def key(self, sample_id: int) -> str:
        return self.keys[int(sample_id)]

    def __len__(self) -> int:
        return len(self.keys)


def order_keys(values: Tensor, ids: Tensor) -> Tensor:
    """int64 keys that sort as (value descending, id ascending) sorts, with no ties.

    The float32 value becomes an order-preserving int32 (IEEE bits, negatives flipped),
    shifted into the high half; the low half is 2**32 - 1 - id. Every (value, key) pair
    is then one distinct integer and `torch.topk` on it is exact and deterministic,
    several times cheaper than two stable sorts.
    """
    bits = (values.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return (bits << 32) | (PAD_ID - ids)


def _ordered_topk(
    order: Tensor, values: Tensor, ids: Tensor, locs: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per row the k entries with the largest `order` keys, best first."""
    order, index = torch.topk(order, k, dim=1, sorted=True)
    loc_index = index.unsqueeze(2).expand(*index.shape, 2)
    return order, values.gather(1, index), ids.gather(1, index), locs.gather(1, loc_index)


def sketch_buckets(values: Tensor) -> Tensor:
    """Bucket index in [0, 2 * SKETCH_BUCKETS] (int32): negatives below the zero bucket
    (SKETCH_BUCKETS), positives above it; bucket i > 0 of a sign covers
    (SKETCH_MIN * gamma**(i-1), SKETCH_MIN * gamma**i]; |v| <= SKETCH_MIN is bucket 0.

    Few passes over the batch (log, then in place): the sketch is most of what the
    streaming pass adds to a small model's forward.
    """
    index = values.abs().log_()
    index.mul_(1.0 / math.log(SKETCH_GAMMA)).sub_(math.log(SKETCH_MIN) / math.log(SKETCH_GAMMA))
    index.ceil_().clamp_(0, SKETCH_BUCKETS)  # log(0) = -inf lands in the zero bucket
    index.mul_(values.sign()).add_(SKETCH_BUCKETS)
    return index.to(torch.int32)


def bucket_values() -> np.ndarray:
    """A representative value of every sketch bucket (the geometric middle of its range)."""
    i = np.arange(1, SKETCH_BUCKETS + 1, dtype=np.float64)
    middle = SKETCH_MIN * SKETCH_GAMMA ** (i - 1) * 2 * SKETCH_GAMMA / (1 + SKETCH_GAMMA)
    return np.concatenate([-middle[::-1], [0.0], middle])


@dataclass
class UnitStats:
    """Everything kept about the C units of one layer over the inputs seen so far.

    top_values / top_ids (C, K): the K best entries per unit, best first (empty slots:
    -inf and PAD_ID); top_locs (C, K, 2) int32: the (row, col) of the unit's maximum in that
    input's map ((0, 0) for vector units). count: inputs seen; total, minimum, maximum,
    active (C,): sum (float64), min, max of the reduced value and count of inputs with
    value > 0; sketch (C, 2 * SKETCH_BUCKETS + 1) int64 bucket counts. Arrays are torch
    tensors on the device that reduces; `to_numpy()` for merging and reports.
    """

    k: int
    top_values: Tensor
    top_ids: Tensor
    top_locs: Tensor
    top_order: Tensor  # (C, K) int64 `order_keys` of the entries
    count: int
    total: Tensor
    minimum: Tensor
    maximum: Tensor
    active: Tensor
    sketch: Tensor

    @classmethod
    def empty(cls, units: int, k: int, device: torch.device | str = "cpu") -> UnitStats:
        f = {"device": device}
        return cls(
            k=k,
            top_values=torch.full((units, k), -math.inf, dtype=torch.float32, **f),
            top_ids=torch.full((units, k), PAD_ID, dtype=torch.int64, **f),
            top_locs=torch.zeros((units, k, 2), dtype=torch.int32, **f),
            top_order=torch.full((units, k), -(2**63), dtype=torch.int64, **f),
            count=0,
            total=torch.zeros(units, dtype=torch.float64, **f),
            minimum=torch.full((units,), math.inf, dtype=torch.float32, **f),
            maximum=torch.full((units,), -math.inf, dtype=torch.float32, **f),
            active=torch.zeros(units, dtype=torch.int64, **f),
            # int32: index_add_ on int64 is several times slower on the CPU; merged
            # states add up in int64 (a part holds fewer than 2**31 inputs).
            sketch=torch.zeros((units, 2 * SKETCH_BUCKETS + 1), dtype=torch.int32, **f),
        )

    @property
    def units(self) -> int:
        return self.top_values.shape[0]

    def update(self, values: Tensor, ids: Tensor, locs: Tensor | None = None) -> None:
        """Add a batch: values (B, C) reduced per unit, ids (B,) int64 of the samples'
        keys, locs (B, C, 2) int32 argmax locations (None: vector units)."""
        b, c = values.shape
        if c != self.units:
            raise ValueError(f"batch has {c} units, the state {self.units}")
        if b == 0:
            return
        device = self.top_values.device
        values = values.detach().to(device, torch.float32)
        ids = torch.as_tensor(ids, dtype=torch.int64, device=device)
        self.count += b
        self.total += values.double().sum(0)
        self.minimum = torch.minimum(self.minimum, values.amin(0))
        self.maximum = torch.maximum(self.maximum, values.amax(0))
        self.active += (values > 0).sum(0)
        buckets = sketch_buckets(values.t())  # (C, B)
        offsets = (
            torch.arange(c, device=device, dtype=torch.int32).view(-1, 1) * self.sketch.shape[1]
        )
        self.sketch.view(-1).index_add_(
            0, (buckets + offsets).flatten(), torch.ones(b * c, dtype=torch.int32, device=device)
        )
        if int(ids.max()) >= PAD_ID or int(ids.min()) < 0:
            raise ValueError(f"sample ids must be within [0, {PAD_ID})")
        values_t = values.t()
        # Only units where some input reaches the current K-th value can change (a tie
        # may still win on its key); late in a pass that is few units, so the exact
        # comparison and the top-k run on those rows alone.
        rows = (values_t >= self.top_values[:, -1:]).any(1).nonzero().flatten()
        if len(rows) == 0:
            return
        if locs is None:
            locs_t = torch.zeros((len(rows), b, 2), dtype=torch.int32, device=device)
        else:
            locs_t = locs.to(device, torch.int32).transpose(0, 1)[rows]
        values_t, ids_t = values_t[rows], ids.view(1, -1).expand(len(rows), b)
        self._merge_top(order_keys(values_t, ids_t), values_t, ids_t, locs_t, rows)

    def _merge_top(
        self,
        order: Tensor,
        values: Tensor,
        ids: Tensor,
        locs: Tensor,
        rows: Tensor | None = None,
    ) -> None:
        state = (self.top_order, self.top_values, self.top_ids, self.top_locs)
        full = rows is None or len(rows) == len(self.top_order)
        mine = state if full else tuple(t[rows] for t in state)
        top = _ordered_topk(
            *(
                torch.cat([old, new], 1)
                for old, new in zip(mine, (order, values, ids, locs), strict=True)
            ),
            self.k,
        )
        if full:
            self.top_order, self.top_values, self.top_ids, self.top_locs = top
        else:
            for old, new in zip(state, top, strict=True):
                old[rows] = new

    def merge(self, other: UnitStats) -> UnitStats:
        """This state and `other` (a disjoint part of the data) as one, exactly; in place."""
        if (other.units, other.k) != (self.units, self.k):
            raise ValueError(f"cannot merge {other.units}x{other.k} into {self.units}x{self.k}")
        other = other.to(self.top_values.device)
        self.count += other.count
        self.total += other.total
        self.minimum = torch.minimum(self.minimum, other.minimum)
        self.maximum = torch.maximum(self.maximum, other.maximum)
        self.active += other.active
        self.sketch = self.sketch.long() + other.sketch.long()
        self._merge_top(other.top_order, other.top_values, other.top_ids, other.top_locs)
        return self

    def to(self, device: torch.device | str) -> UnitStats:
        names = ("top_values", "top_ids", "top_locs", "top_order", "total", "minimum", "maximum")
        names = (*names, "active")
        moved = {n: getattr(self, n).to(device) for n in (*names, "sketch")}
        return UnitStats(k=self.k, count=self.count, **moved)

    def quantiles(self, qs: Sequence[float]) -> np.ndarray:
        """(C, len(qs)) quantiles from the sketch (nearest-rank), clamped to [min, max]."""
        counts = self.sketch.cpu().numpy()
        cumulative = np.cumsum(counts, axis=1)
        centres = bucket_values()
        out = np.zeros((self.units, len(qs)))
        lo, hi = self.minimum.cpu().numpy(), self.maximum.cpu().numpy()
        for j, q in enumerate(qs):
            rank = np.maximum(np.ceil(q * self.count), 1)
            bucket = (
                cumulative >= rank[..., None] if np.ndim(rank) else cumulative >= rank
            ).argmax(1)
            out[:, j] = np.clip(centres[bucket], lo, hi)
        return out

    def histogram(self, unit: int, bins: int = 24) -> tuple[np.ndarray, np.ndarray]:
        """(edges, counts) of one unit on `bins` linear bins over [min, max], from the sketch."""
        lo, hi = float(self.minimum[unit]), float(self.maximum[unit])
        if not hi > lo:
            hi = lo + 1e-6
        edges = np.linspace(lo, hi, bins + 1)
        centres = np.clip(bucket_values(), lo, hi)
        counts = np.histogram(centres, bins=edges, weights=self.sketch[unit].cpu().numpy())[0]
        return edges, counts.astype(np.int64)

    def dead(self, rel_tol: float = 1e-5) -> np.ndarray:
        """(C,) bool: units that never vary (max - min within rel_tol of their scale) or are
        never active (> 0) on any input: reported as dead, not hidden."""
        lo, hi = self.minimum.cpu().numpy(), self.maximum.cpu().numpy()
        scale = np.maximum(1.0, np.maximum(np.abs(lo), np.abs(hi)))
        constant = (hi - lo) <= rel_tol * scale
        return constant | (self.active.cpu().numpy() == 0)

    def summary(self) -> dict[str, np.ndarray]:
        """Per unit mean, min, max, active fraction, dead, and 5/50/95% quantiles."""
        n = max(self.count, 1)
        q = self.quantiles([0.05, 0.5, 0.95])
        return {
            "mean": (self.total.cpu().numpy() / n).astype(np.float64),
            "min": self.minimum.cpu().numpy().astype(np.float64),
            "max": self.maximum.cpu().numpy().astype(np.float64),
            "active_fraction": self.active.cpu().numpy() / n,
            "dead": self.dead(),
            "q05": q[:, 0],
            "q50": q[:, 1],
            "q95": q[:, 2],
        }


def brute_force_topk(
    values: np.ndarray, keys: Sequence[str], k: int
) -> list[list[tuple[float, str]]]:
    """The reference: per unit (columns of values (N, C)) the k first (value, key) pairs by
    value descending then key ascending, by a plain sort. For tests."""
    out = []
    for unit in range(values.shape[1]):
        pairs = sorted(
            zip(values[:, unit].tolist(), keys, strict=True), key=lambda p: (-p[0], p[1])
        )
        out.append(pairs[:k])
    return out


class ChunkedStats:
    """A `UnitStats` fed in chunks of about `chunk` inputs rather than batch by batch.

    `UnitStats.update` costs a fixed number of tensor operations per call, whatever the
    batch: for a small model that is as much as its forward on a batch of 64. Collecting the
    reduced values (a few KB per batch) and updating once per chunk divides that cost by
    the number of batches in a chunk. The state is the same as batch-by-batch updates
    give, since the top-K order and the sketch do not depend on how inputs are grouped.
    """

    def __init__(self, units: int, k: int, device: torch.device | str, chunk: int = 1024):
        self.state = UnitStats.empty(units, k, device)
        self.chunk = chunk
        self._pending: list[tuple[Tensor, Tensor, Tensor | None]] = []
        self._rows = 0

    def update(self, values: Tensor, ids: Tensor, locs: Tensor | None = None) -> None:
        ids = torch.as_tensor(ids, dtype=torch.int64, device=values.device)
        self._pending.append((values.detach(), ids, None if locs is None else locs.detach()))
        self._rows += len(values)
        if self._rows >= self.chunk:
            self.flush()

    def flush(self) -> UnitStats:
        """Everything added so far, in the state; returns the state."""
        if self._pending:
            values, ids, locs = zip(*self._pending, strict=True)
            self.state.update(
                torch.cat(values), torch.cat(ids), None if locs[0] is None else torch.cat(locs)
            )
            self._pending, self._rows = [], 0
        return self.state
