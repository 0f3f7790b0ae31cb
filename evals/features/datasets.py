"""`EvalDataset`: the one kind of dataset every eval (probe, kNN, k-means, neurons) reads.

A fixed, ordered, finite set of images with labels (or none), a content fingerprint the
feature cache keys on, and `batches` preprocessed exactly as the export's training config
says (the `preprocess` dict of model.json), by the loader's own decoder and normalizer,
so probes never use other pixels than training did. Which images a spec names, and how
they load, is `evals.features.sources` (`open_dataset`).

Splits: `split_indices` (stratified positions; split extracted `Features` with them, so
one pass serves both halves) and `split` (dataset views). `write_shards` turns any eval
set into labeled shards, for training on it (greedy pretraining on digits, say).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evals.features.cache import content_hash

__all__ = [
    "DatasetError",
    "EvalDataset",
    "split",
    "split_indices",
    "subset",
    "write_shards",
]


class DatasetError(ValueError):
    """A dataset spec that cannot be used: one line naming the file or spec and the problem."""


@dataclass
class EvalDataset:
    """A fixed, ordered, finite set of images (with labels, or `cls == -1` when unlabeled).

    spec: as the user wrote it. fingerprint: a content hash (shard sha256s from the
    manifest, else shard or file names + sizes + mtimes, or the synthetic parameters):
    the feature cache keys on it. classes: class names, index = label; [] when unlabeled.
    skipped: files left out as unreadable (ImageFolder), for the report.
    """

    spec: str
    fingerprint: str
    classes: list[str]
    _source: Any = field(repr=False, default=None)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        """Number of samples (each is yielded once, valid, by `batches`)."""
        return len(self._source.keys)

    @property
    def keys(self) -> list[str]:
        """Sample keys in the dataset's fixed order (parts concatenated in part order)."""
        return self._source.keys

    @property
    def labels(self) -> np.ndarray:
        """int64 (N,) labels in key order; -1 everywhere when unlabeled."""
        return self._source.labels

    def part_range(self, part: int, num_parts: int) -> tuple[int, int]:
        """Positions `[start, stop)` of part `part` in the fixed order."""
        _check_part(part, num_parts)
        n = len(self)
        return n * part // num_parts, n * (part + 1) // num_parts

    def batches(
        self,
        preprocess: dict,
        batch_size: int,
        *,
        part: int = 0,
        num_parts: int = 1,
        num_workers: int = 0,
    ) -> Iterator[dict]:
        """Batches `{"image": float32 (B, C, H, W), "key": list[str], "cls": int64 (B,),
        "valid": bool (B,)}` preprocessed as `preprocess` (model.json's dict) says.

        Part `p` of `num_parts` is the contiguous range `part_range(p, num_parts)` of the
        fixed order, so parts concatenated in part order are the whole set, each sample
        once. Rows with `valid=False` are padding (the loader tops up the last batches of
        shards): drop them. `num_workers` decode in parallel (DataLoader workers); for
        shards with more than one, batches arrive interleaved: place rows by key.
        """
        _check_part(part, num_parts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        yield from self._source.batches(preprocess, batch_size, part, num_parts, num_workers)

    def image(self, key: str, preprocess: dict | None = None) -> np.ndarray:
        """The uint8 (H, W, 3) RGB source image of `key`, for reports; with `preprocess`,
        the image the model saw (resized, cropped; (H, W, 1) when grayscale), not normalized."""
        return self.images([key], preprocess)[key]

    def images(self, keys: Sequence[str], preprocess: dict | None = None) -> dict[str, np.ndarray]:
        """`image` for many keys at once (one pass over shards rather than one per key)."""
        try:
            return self._source.images(list(keys), preprocess)
        except KeyError as e:
            raise DatasetError(f"{self.spec}: {e.args[0]}") from None


def _check_part(part: int, num_parts: int) -> None:
    if num_parts < 1 or not 0 <= part < num_parts:
        raise ValueError(f"part {part} is outside num_parts {num_parts}")


def split_indices(
    labels: np.ndarray, test_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, deterministic (train, test) positions, each sorted.

    Each class with n_c > 1 samples puts round(n_c * test_fraction), at least 1 and at
    most n_c - 1, into test, chosen by a permutation seeded by (seed, class).
    Use it on `Features` of the whole set to extract once and split after.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test fraction must be within (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            continue
        n_test = int(np.clip(round(len(members) * test_fraction), 1, len(members) - 1))
        rng = np.random.default_rng([seed, int(c) + 1])
        test.append(rng.permutation(members)[:n_test])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def subset(dataset: EvalDataset, positions: Sequence[int], tag: str) -> EvalDataset:
    """A view of `dataset` holding `positions` (in the parent's order); `tag` names it in
    the fingerprint (e.g. "train/0.2/0")."""
    positions = sorted(int(p) for p in positions)
    return EvalDataset(
        f"{dataset.spec}#{tag}",
        content_hash("subset", dataset.fingerprint, tag, positions),
        dataset.classes,
        dataset._source.subset(positions),
        skipped=dataset.skipped,
    )


def split(
    dataset: EvalDataset, test_fraction: float, seed: int = 0
) -> tuple[EvalDataset, EvalDataset]:
    """Stratified, deterministic split into (train, test) views (see `split_indices`).

    Views of shard sets decode the parent's whole pass; where one extraction serves both,
    extract the parent and split its `Features` with `split_indices` instead."""
    train_idx, test_idx = split_indices(dataset.labels, test_fraction, seed)
    tag = f"{test_fraction}/{seed}"
    return subset(dataset, train_idx, f"train/{tag}"), subset(dataset, test_idx, f"test/{tag}")


def write_shards(
    dataset: EvalDataset,
    out_dir: str | os.PathLike,
    *,
    per_shard: int = 1000,
    lossless: bool = False,
    prefix: str = "eval",
) -> Path:
    """Write `dataset` as labeled frame shards in the `catneuron shard` layout; return `out_dir`.

    `out_dir/shards/<prefix>-NNNNNN.tar` (each renamed into place when complete) and
    `out_dir/manifest/shards.parquet` (path, n_samples, bytes, sha256) and
    `manifest/classes.json`; members `jpg` (RGB JPEG, quality 90; with `lossless`, PNG
    bytes, which the loader's Pillow decoder reads the same way: small images such as
    8x8 digits keep their exact pixels), `json` (`source_key`, `index`) and `cls` when
    labeled. Keys are `<16 hex of sha1(fingerprint)>_<index:07d>`, dot-free as webdataset
    needs. For training on an eval set (e.g. greedy pretraining on sklearn:digits).
    """
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds
    from PIL import Image

    out = Path(out_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "manifest").mkdir(exist_ok=True)
    stem = hashlib.sha1(dataset.fingerprint.encode()).hexdigest()[:16]
    keys, rows = dataset.keys, []
    for first in range(0, len(keys), per_shard):
        chunk = keys[first : first + per_shard]
        name = f"{prefix}-{first // per_shard:06d}.tar"
        final, partial = out / "shards" / name, out / "shards" / f"{name}.tmp"
        images = dataset.images(chunk)
        with wds.TarWriter(str(partial), mtime=0.0) as sink:
            for index, key in enumerate(chunk, start=first):
                buffer = io.BytesIO()
                image = Image.fromarray(images[key])
                image.save(
                    buffer, **({"format": "PNG"} if lossless else {"format": "JPEG", "quality": 90})
                )
                sample = {
                    "__key__": f"{stem}_{index:07d}",
                    "jpg": buffer.getvalue(),
                    "json": json.dumps({"source_key": key, "index": index}).encode(),
                }
                if dataset.classes:
                    sample["cls"] = str(int(dataset.labels[index])).encode()
                sink.write(sample)
        os.replace(partial, final)
        digest = hashlib.sha256(final.read_bytes()).hexdigest()
        rows.append({"path": f"shards/{name}", "n_samples": len(chunk),
                     "bytes": final.stat().st_size, "sha256": digest})  # fmt: skip
    tmp = out / "manifest" / ".classes.json.tmp"
    tmp.write_text(json.dumps(dataset.classes))
    os.replace(tmp, out / "manifest" / "classes.json")
    table = out / "manifest" / ".shards.parquet.tmp"
    pq.write_table(pa.Table.from_pylist(rows), table)
    os.replace(table, out / "manifest" / "shards.parquet")
    return out
