"""Frame shards to training batches: the one loader that training and evals share.

`frame_loader(source, batch_size=...)` returns a `FrameLoader`: an iterable of batch
dicts `{"image": float32 (B, C, H, W), "key": list[str], "valid": bool (B,),
"cls": int64 (B,) with labels}` whose `len()` is the number of batches this rank gets in
an epoch, the same on every rank, so no rank waits forever at a collective.

Two modes:
- exact (default): one pass over the data per epoch, no sample on two ranks or twice
  (see `partition` for how). `drop_last` (the default, for training) drops the last
  `N mod (world_size x batch_size)` samples of the epoch's order; without it (evals)
  every sample is yielded once, and the last batches are topped up with repeats marked
  `valid=False`: mask them out of losses and metrics.
- resampled: each worker draws shards with replacement, forever, from a generator
  seeded by (seed, epoch, rank, lane); an epoch is `batches_per_epoch` batches on every
  rank. For training at scale, where shards far outnumber ranks and exact epochs matter
  less than never stalling.

The batch order is a pure function of (source, seed, epoch, rank, world_size,
num_workers, batch_size): workers batch their own samples and `DataLoader` collects
them round-robin, so a run resumed with `start_sample` yields exactly the tail of the
uninterrupted sequence.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.frames import FrameDecoder, PixelNormalizer, Sample, collate_frames
from data_pipeline.partition import (
    ShardSlice,
    batches_per_rank,
    lane_batches,
    lane_batches_done,
    lane_of_worker,
    lane_slices,
    shard_order,
)
from data_pipeline.shard_list import Shard, resolve_shards, shard_samples, tar_samples

Batch = dict[str, Any]


def read_slices(slices: Iterable[ShardSlice]) -> Iterator[Sample]:
    """Samples `start:stop` of each slice's shard, flagged `__valid__` or padding.

    A shard that ends early would leave this worker short of its planned batches and
    its rank short of steps, so it is an error here instead of a hang later.
    """
    for piece in slices:
        samples = shard_samples(piece.url)  # local, pipe: or any fsspec URL (s3://...)
        n_read = 0
        for sample in itertools.islice(samples, piece.start, piece.stop):
            sample["__valid__"] = piece.valid
            n_read += 1
            yield sample
        if n_read < piece.stop - piece.start:
            raise ValueError(
                f"{piece.url}: fewer samples than the manifest says ({piece.start + n_read})"
            )


@dataclass(frozen=True)
class RankPlan:
    """What one rank reads in one epoch; every field is needed to reproduce its order."""

    shards: tuple[Shard, ...]
    batch_size: int
    rank: int
    world_size: int
    num_lanes: int
    n_batches: int
    drop_last: bool
    resampled: bool
    shuffle_buffer: int
    seed: int
    epoch: int
    start_batch: int


class FrameStream(IterableDataset):
    """One rank's epoch of batches; a worker builds and runs the pipeline of its own lane."""

    def __init__(self, plan: RankPlan, decoder: FrameDecoder) -> None:
        super().__init__()
        self.plan, self.decoder = plan, decoder

    def _sample_source(self, lane: int) -> list[Any]:
        plan = self.plan
        if plan.resampled:
            lane_seed = wds.utils.make_seed(plan.epoch, plan.rank, lane)
            shards = wds.ResampledShards(
                [s.url for s in plan.shards],
                seed=plan.seed,
                worker_seed=lambda: lane_seed,
                deterministic=True,
                empty_check=True,
            )
            return [shards, tar_samples]
        order = shard_order(
            plan.shards, shuffle=plan.shuffle_buffer > 0, seed=plan.seed, epoch=plan.epoch
        )
        slices = lane_slices(
            order,
            rank=plan.rank,
            world_size=plan.world_size,
            lane=lane,
            num_lanes=plan.num_lanes,
            batch_size=plan.batch_size,
            drop_last=plan.drop_last,
        )
        return [functools.partial(read_slices, slices)]

    def __iter__(self) -> Iterator[Batch]:
        plan = self.plan
        worker = get_worker_info()
        lane = lane_of_worker(worker.id if worker else 0, plan.num_lanes, plan.start_batch)
        done = lane_batches_done(plan.start_batch, plan.num_lanes, lane)
        todo = lane_batches(plan.n_batches, plan.num_lanes, lane) - done
        if todo <= 0:
            return iter(())
        buffer = plan.shuffle_buffer
        sample_rng = random.Random(f"samples/{plan.seed}/{plan.epoch}/{plan.rank}/{lane}")
        pipeline = wds.DataPipeline(
            *self._sample_source(lane),
            wds.shuffle(buffer, initial=buffer, rng=sample_rng) if buffer else None,
            wds.slice(done * plan.batch_size, None),  # resume: skipped before the costly decode
            wds.map(self.decoder),
            wds.batched(plan.batch_size, collation_fn=collate_frames, partial=False),
            wds.slice(todo),
        )
        return iter(pipeline)


class FrameLoader:
    """Batches of one rank for one epoch; `len()` is equal on every rank.

    Iterating starts fresh workers each time (they get the current epoch and position);
    call `set_epoch` between epochs for a new order, as with `DistributedSampler`.
    """

    def __init__(
        self,
        stream: FrameStream,
        normalize: PixelNormalizer,
        *,
        num_workers: int,
        prefetch_factor: int | None,
        device: torch.device | None,
    ) -> None:
        self.stream, self.normalize, self.device = stream, normalize, device
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor

    def __len__(self) -> int:
        """Batches in a whole epoch on this rank (a resumed epoch yields fewer)."""
        return self.stream.plan.n_batches

    @property
    def epoch(self) -> int:
        return self.stream.plan.epoch

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        """Reorder for `epoch` and skip the first `start_sample` samples of this rank."""
        plan = self.stream.plan
        start_batch = _start_batch(start_sample, plan.batch_size, plan.n_batches)
        self.stream.plan = replace(plan, epoch=epoch, start_batch=start_batch)
        self.stream.decoder = replace(self.stream.decoder, epoch=epoch)

    def __iter__(self) -> Iterator[Batch]:
        loader = DataLoader(
            self.stream,
            batch_size=None,  # workers batch themselves: only finished tensors cross processes
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            persistent_workers=False,
            pin_memory=self.device is not None and self.device.type == "cuda",
            # Its own generator: without one, every new iterator draws its base seed from
            # the global torch RNG, so reopening the stream on resume would shift the
            # trainer's random numbers (the order here comes from the plan's seeds alone).
            generator=torch.Generator(),
        )
        for batch in loader:
            if self.device is not None:
                batch = {
                    k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                    for k, v in batch.items()
                }
            batch["image"] = self.normalize(batch["image"])
            yield batch


def _start_batch(start_sample: int, batch_size: int, n_batches: int) -> int:
    if start_sample % batch_size or not 0 <= start_sample <= n_batches * batch_size:
        raise ValueError(
            f"start_sample={start_sample} must be a multiple of batch_size={batch_size} "
            f"within the epoch's {n_batches * batch_size} samples"
        )
    return start_sample // batch_size


def _distributed_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values win; otherwise torch.distributed's, if it is initialized."""
    initialized = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialized else 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return rank, world_size


def frame_loader(
    source: str | os.PathLike | Sequence[str],
    *,
    batch_size: int,
    resize: int | None = None,
    crop: int | None = None,
    random_crop: bool = False,
    flip: bool = False,
    grayscale: bool = False,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    shuffle_buffer: int = 0,
    seed: int = 0,
    epoch: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 0,
    resampled: bool = False,
    batches_per_epoch: int | None = None,
    start_sample: int = 0,
    with_labels: bool = False,
    drop_last: bool = True,
    prefetch_factor: int | None = 2,
    device: str | torch.device | None = None,
) -> FrameLoader:
    """Batches of frames from WebDataset shards for this rank; see the module docstring.

    source: a shard directory (its `manifest/shards.parquet` if present, else its
        `*.tar`), a manifest parquet, a brace pattern, or a list of shard paths/URLs;
        each local or behind any fsspec URL (`s3://bucket/frames`, credentials from the
        environment as fsspec's backend reads them).
    resize: shorter side before cropping; crop: square size (centre unless random_crop);
    flip: random horizontal flip. mean/std apply after scaling pixels to [0, 1], one
        value per channel or one for all.
    shuffle_buffer: 0 keeps the stored order; otherwise shards are shuffled per epoch
        and samples through a buffer this large, deterministically given (seed, epoch).
    rank/world_size: default to torch.distributed's when it is initialized.
    resampled: sample shards with replacement; needs batches_per_epoch.
    start_sample: samples this rank already consumed this epoch (steps x batch_size).
    drop_last: exact mode only; False keeps every sample and pads with `valid=False`.
    device: where batches are returned; images cross from workers as uint8 and are
        normalized there (a GPU trainer passes its device: 4x less to copy, no CPU math).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if resampled != (batches_per_epoch is not None):
        raise ValueError("batches_per_epoch is required with resampled=True and only then")
    rank, world_size = _distributed_rank(rank, world_size)
    shards = tuple(resolve_shards(source))
    if resampled:
        n_batches = batches_per_epoch
    else:
        n_samples = sum(s.n_samples for s in shards)
        n_batches = batches_per_rank(
            n_samples, world_size=world_size, batch_size=batch_size, drop_last=drop_last
        )
        if n_batches == 0:
            raise ValueError(
                f"{source}: {n_samples} samples make no full batch of {batch_size} on each of "
                f"{world_size} ranks; use drop_last=False or a smaller batch_size"
            )
    plan = RankPlan(
        shards=shards,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        num_lanes=max(1, num_workers),
        n_batches=n_batches,
        drop_last=drop_last,
        resampled=resampled,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        epoch=epoch,
        start_batch=_start_batch(start_sample, batch_size, n_batches),
    )
    decoder = FrameDecoder(
        resize=resize,
        crop=crop,
        random_crop=random_crop,
        flip=flip,
        grayscale=grayscale,
        with_labels=with_labels,
        seed=seed,
        epoch=epoch,
    )
    return FrameLoader(
        FrameStream(plan, decoder),
        PixelNormalizer(mean, std, channels=1 if grayscale else 3),
        num_workers=num_workers,
        prefetch_factor=prefetch_factor,
        device=None if device is None else torch.device(device),
    )
