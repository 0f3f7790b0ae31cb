"""Where an `EvalDataset`'s samples come from: indexed images, frame shards, subsets.

Three kinds of source sit behind every dataset spec (see `evals.features.datasets`): samples that
load one by one (image files, rendered synthetic stills, bundled arrays), batched by a
`DataLoader` over `data_pipeline.images`; WebDataset shards, read by the training loader
itself; and subsets of shards (the parent's pass, filtered). Each has `keys`, `labels`,
`batches(preprocess, batch_size, part, num_parts, num_workers)`, `images(keys,
preprocess)` and `subset(positions)`. Per-sample loaders are small frozen dataclasses,
so DataLoader workers and Ray tasks can copy them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np

EVAL_SEED_BASE = 2**40
SEEDS_PER_SET = 2**24  # stills per `synth:` seed; seeds go up to 2**16


def still_seed(seed: int, index: int) -> int:
    """The scene seed of still `index` of a `synth:` set with `seed`: always >= 2**40, so
    never one of the seeds `catneuron synth` gives its clips (< CLIP_SEED_LIMIT = 2**31),
    and distinct for distinct (seed, index)."""
    if not (0 <= seed < 2**16 and 0 <= index < SEEDS_PER_SET):
        raise ValueError(f"synth: seed {seed} / index {index} outside [0, 2**16) / [0, 2**24)")
    return EVAL_SEED_BASE + seed * SEEDS_PER_SET + index


def synth_size(spec: str) -> int | None:
    """The image side of a `synth:cat` spec (None for any other spec): the neuron
    analysis draws its invariance probes and headline panels at it."""
    if not spec.startswith("synth:cat"):
        return None
    query = spec.partition("?")[2]
    return int(dict(parse_qsl(query)).get("size", 64))


@dataclass(frozen=True)
class FileLoad:
    files: tuple[str, ...]

    def __call__(self, index: int) -> bytes:
        return Path(self.files[index]).read_bytes()


@dataclass(frozen=True)
class CatLoad:
    seed: int
    size: int
    eyed: bool = False

    def __call__(self, index: int) -> np.ndarray:
        from data_pipeline.synth import render_still

        image, _ = render_still(
            self.size,
            self.size,
            still_seed(self.seed, index),
            cat=index % 2 == 1,
            eyed_clutter=self.eyed,
        )
        return image


@dataclass(frozen=True)
class ShapesLoad:
    seed: int
    size: int
    kinds: tuple[str, ...]

    def __call__(self, index: int) -> np.ndarray:
        from data_pipeline.synth import render_shape_still

        kind = self.kinds[index % len(self.kinds)]
        return render_shape_still(self.size, self.size, still_seed(self.seed, index), kind)


@dataclass(frozen=True)
class ArrayLoad:
    images: np.ndarray  # (N, H, W, 3) uint8

    def __call__(self, index: int) -> np.ndarray:
        return self.images[index]


class MemoLoad:
    """A loader that keeps what it loaded, up to `max_bytes`: synthetic stills are slow to
    render (~10-100 ms each) and deterministic, and one process often reads the same set
    several times (the export, its random-init twin and raw pixels; every export under
    `--watch`). Copies sent to other processes (DataLoader workers, Ray tasks) start empty.
    """

    def __init__(self, inner: Callable[[int], np.ndarray], max_bytes: int = 2**29) -> None:
        self.inner, self.max_bytes = inner, max_bytes
        self.kept: dict[int, np.ndarray] = {}
        self.kept_bytes = 0

    def __call__(self, index: int) -> np.ndarray:
        image = self.kept.get(index)
        if image is None:
            image = self.inner(index)
            if self.kept_bytes + image.nbytes <= self.max_bytes:
                self.kept[index] = image
                self.kept_bytes += image.nbytes
        return image

    def __getstate__(self) -> dict:
        return {"inner": self.inner, "max_bytes": self.max_bytes, "kept": {}, "kept_bytes": 0}


class IndexedSource:
    """Samples that can be loaded one by one: image files, rendered stills, bundled arrays."""

    def __init__(
        self,
        keys: Sequence[str],
        labels: np.ndarray,
        load: Callable[[int], Any],
        indices: Sequence[int] | None = None,
    ) -> None:
        self.all_keys, self.all_labels, self.load = list(keys), labels, load
        self.indices = list(range(len(keys))) if indices is None else list(indices)
        self.keys = [self.all_keys[i] for i in self.indices]
        self.labels = self.all_labels[self.indices]

    def subset(self, positions: Sequence[int]) -> IndexedSource:
        return IndexedSource(
            self.all_keys, self.all_labels, self.load, [self.indices[p] for p in positions]
        )

    def batches(
        self, preprocess: dict, batch_size: int, part: int, num_parts: int, num_workers: int
    ) -> Iterator[dict]:
        from torch.utils.data import DataLoader

        from data_pipeline.frames import collate_frames
        from data_pipeline.images import IndexedFrames, decoder_for, normalizer_for

        n = len(self.indices)
        start, stop = n * part // num_parts, n * (part + 1) // num_parts
        if start == stop:
            return
        frames = IndexedFrames(
            self.indices[start:stop],
            self.load,
            self.all_keys,
            self.all_labels,
            decoder_for(preprocess),
        )
        # Batches cut on the whole set's grid of batch_size, not the part's: every sample
        # is then computed in the same batch whatever the split, so parts merge bit-exactly.
        cuts = [start, *range((start // batch_size + 1) * batch_size, stop, batch_size), stop]
        grid = [list(range(a - start, b - start)) for a, b in itertools.pairwise(cuts) if b > a]
        normalize = normalizer_for(preprocess)
        loader = DataLoader(
            frames, batch_sampler=grid, num_workers=num_workers, collate_fn=collate_frames
        )
        for batch in loader:
            batch["image"] = normalize(batch["image"])
            yield batch

    def images(self, keys: Sequence[str], preprocess: dict | None) -> dict[str, np.ndarray]:
        from data_pipeline.images import decode_bytes, decoder_for, prepare_array, to_rgb

        where = {k: i for i, k in enumerate(self.all_keys)}
        decoder = decoder_for(preprocess) if preprocess is not None else None
        out = {}
        for key in keys:
            if key not in where:
                raise KeyError(f"no sample with key {key!r}")
            item = self.load(where[key])
            if decoder is None:
                out[key] = to_rgb(item) if isinstance(item, bytes) else np.asarray(item)
            elif isinstance(item, bytes):
                out[key] = decode_bytes(item, decoder, key)
            else:
                out[key] = prepare_array(item, decoder, key)
        return out


class ShardSource:
    """WebDataset frame shards, read through the training loader (`drop_last=False`)."""

    def __init__(
        self, spec: str, urls: list[str], keys: list[str], labels: np.ndarray, has_labels: bool
    ) -> None:
        self.spec, self.urls, self.keys, self.labels = spec, urls, keys, labels
        self.has_labels = has_labels

    def batches(
        self, preprocess: dict, batch_size: int, part: int, num_parts: int, num_workers: int
    ) -> Iterator[dict]:
        import torch

        from data_pipeline.images import check_preprocess
        from data_pipeline.loader import frame_loader

        p = check_preprocess(preprocess)
        loader = frame_loader(
            self.spec,
            batch_size=batch_size,
            resize=p["resize"],
            crop=p["crop"],
            grayscale=bool(p["grayscale"]),
            mean=p["mean"],
            std=p["std"],
            shuffle_buffer=0,
            rank=part,
            world_size=num_parts,
            num_workers=num_workers,
            with_labels=self.has_labels,
            drop_last=False,
        )
        for batch in loader:
            if not self.has_labels:
                batch["cls"] = torch.full((len(batch["key"]),), -1, dtype=torch.int64)
            yield batch

    def subset(self, positions: Sequence[int]) -> FilteredSource:
        return FilteredSource(self, positions)

    def _samples(self) -> Iterator[dict]:
        import webdataset as wds

        return wds.tarfile_samples([{"url": url} for url in self.urls])

    def images(self, keys: Sequence[str], preprocess: dict | None) -> dict[str, np.ndarray]:
        from data_pipeline.images import decode_bytes, decoder_for, to_rgb

        wanted, out = set(keys), {}
        decoder = decoder_for(preprocess) if preprocess is not None else None
        for sample in self._samples():
            key = sample["__key__"]
            if key in wanted and key not in out:
                data = sample["jpg"]
                out[key] = to_rgb(data) if decoder is None else decode_bytes(data, decoder, key)
                if len(out) == len(wanted):
                    break
        missing = wanted - set(out)
        if missing:
            raise KeyError(f"no sample with key {sorted(missing)[0]!r}")
        return out


class FilteredSource:
    """A subset of shards: the parent's pass, keeping the subset's rows (order preserved)."""

    def __init__(self, parent: ShardSource, positions: Sequence[int]) -> None:
        self.parent, self.positions = parent, sorted(positions)
        self.keys = [parent.keys[p] for p in self.positions]
        self.labels = parent.labels[self.positions]

    def subset(self, positions: Sequence[int]) -> FilteredSource:
        return FilteredSource(self.parent, [self.positions[p] for p in positions])

    def batches(
        self, preprocess: dict, batch_size: int, part: int, num_parts: int, num_workers: int
    ) -> Iterator[dict]:
        n = len(self.keys)
        mine = set(self.keys[n * part // num_parts : n * (part + 1) // num_parts])
        if not mine:
            return
        for batch in self.parent.batches(preprocess, batch_size, 0, 1, num_workers):
            keep = [i for i, k in enumerate(batch["key"]) if k in mine and batch["valid"][i]]
            if keep:
                yield {
                    "image": batch["image"][keep],
                    "key": [batch["key"][i] for i in keep],
                    "cls": batch["cls"][keep],
                    "valid": batch["valid"][keep],
                }

    def images(self, keys: Sequence[str], preprocess: dict | None) -> dict[str, np.ndarray]:
        return self.parent.images(keys, preprocess)
