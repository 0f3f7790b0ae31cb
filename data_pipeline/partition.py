"""Which samples every rank and every loader worker reads in one epoch.

Splitting shards (not samples) over ranks and workers, as webdataset's `split_by_node`
and `split_by_worker` do, gives uneven step counts and idle workers, and ranks that see
different numbers of batches hang at the next collective. So the plan works on the
global sample index space instead:

- The epoch's shard order (shuffled by seed and epoch, identical on every rank) lays all
  N samples out in one sequence.
- Every rank gets the same number of batches: `N // (world * batch)` with `drop_last`
  (the epoch's last samples are dropped, a different set each epoch when shuffling), or
  `ceil(N / (world * batch))` without it, the missing slots filled with repeats marked
  invalid, so every sample is yielded exactly once as valid.
- A rank's batches are dealt round-robin to `num_workers` lanes: lane `k` owns batches
  `k, k + K, k + 2K, ...`, the same order in which `DataLoader` collects them from its
  workers. Each lane reads one contiguous range of the sequence: a worker opens only
  the shards overlapping its range and reads no sample twice.

Resuming after `c` batches shifts which worker plays which lane by `c`, so the
DataLoader's round-robin starts with the lane that owns batch `c`.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from data_pipeline.shard_list import Shard


@dataclass(frozen=True)
class ShardSlice:
    """Samples `start:stop` (by position) of one shard; `valid=False` marks padding repeats."""

    url: str
    start: int
    stop: int
    valid: bool = True


def shard_order(shards: Sequence[Shard], *, shuffle: bool, seed: int, epoch: int) -> list[Shard]:
    """The epoch's shard sequence, the same on every rank for a given seed and epoch."""
    order = list(shards)
    if shuffle:
        random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return order


def batches_per_rank(n_samples: int, *, world_size: int, batch_size: int, drop_last: bool) -> int:
    per_step = world_size * batch_size
    return n_samples // per_step if drop_last else math.ceil(n_samples / per_step)


def lane_batches(n_batches: int, num_lanes: int, lane: int) -> int:
    """How many of a rank's batches lane `lane` owns when they are dealt round-robin."""
    return n_batches // num_lanes + (lane < n_batches % num_lanes)


def lane_of_worker(worker: int, num_lanes: int, start_batch: int) -> int:
    """The lane a worker plays when the rank resumes at batch `start_batch`."""
    return (worker + start_batch) % num_lanes


def lane_batches_done(start_batch: int, num_lanes: int, lane: int) -> int:
    """Batches of `lane` among the rank's first `start_batch` batches."""
    return max(0, math.ceil((start_batch - lane) / num_lanes))


def _slices(order: Sequence[Shard], start: int, stop: int, valid: bool) -> list[ShardSlice]:
    """The global sample range `start:stop` of the epoch sequence, cut at shard borders."""
    offsets = list(itertools.accumulate((s.n_samples for s in order), initial=0))
    out = []
    i = bisect.bisect_right(offsets, start) - 1
    while start < stop:
        shard_end = offsets[i + 1]
        end = min(stop, shard_end)
        out.append(ShardSlice(order[i].url, start - offsets[i], end - offsets[i], valid))
        start, i = end, i + 1
    return out


def lane_slices(
    order: Sequence[Shard],
    *,
    rank: int,
    world_size: int,
    lane: int,
    num_lanes: int,
    batch_size: int,
    drop_last: bool,
) -> list[ShardSlice]:
    """The slices one lane reads, in order: `lane_batches * batch_size` samples exactly.

    Without `drop_last` a rank's real samples are spread over its lanes in proportion to
    their batch slots, and each lane pads its tail by cycling over its own samples (or,
    when it has none, the nearest sample of the sequence).
    """
    n = sum(s.n_samples for s in order)
    n_batches = batches_per_rank(
        n, world_size=world_size, batch_size=batch_size, drop_last=drop_last
    )
    slots = n_batches * batch_size
    if drop_last:
        rank_start, rank_stop = rank * slots, (rank + 1) * slots
    else:
        rank_start, rank_stop = n * rank // world_size, n * (rank + 1) // world_size
    lane_slots = [lane_batches(n_batches, num_lanes, k) * batch_size for k in range(num_lanes)]
    if lane_slots[lane] == 0:
        return []
    slots_before = sum(lane_slots[:lane])
    real = rank_stop - rank_start
    start = rank_start + real * slots_before // slots
    stop = rank_start + real * (slots_before + lane_slots[lane]) // slots
    out = _slices(order, start, stop, valid=True)
    n_pad = lane_slots[lane] - (stop - start)
    if n_pad:
        if start == stop:
            start = min(start, n - 1)
            stop = start + 1
        repeats, rest = divmod(n_pad, stop - start)
        for _ in range(repeats):
            out += _slices(order, start, stop, valid=False)
        out += _slices(order, start, start + rest, valid=False)
    return out
