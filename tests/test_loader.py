"""The shard loader: equal steps on every rank, every sample once, exact resume."""

from __future__ import annotations

import io
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipeline.loader import frame_loader
from data_pipeline.partition import batches_per_rank, lane_batches, lane_slices
from data_pipeline.shard_list import Shard

UNEVEN = (50, 17, 9)


def write_shards(
    out: Path, sizes: tuple[int, ...], size: int = 16, manifest: bool = True
) -> list[str]:
    """Shards in the `catneuron shard` layout; frame i of shard s is a flat grey of value i.

    Returns every key in shard order. Kept small on purpose: the real `catneuron shard`
    can replace it.
    """
    (out / "shards").mkdir(parents=True)
    keys, rows = [], []
    for s, n in enumerate(sizes):
        path = out / "shards" / f"frames-{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(n):
                key = f"{s:016x}_{i:07d}"
                jpg = io.BytesIO()
                Image.new("RGB", (size * 2, size), (i, i, i)).save(jpg, format="JPEG", quality=95)
                meta = {
                    "video_id": f"{s:016x}",
                    "frame_index": i,
                    "width": size * 2,
                    "height": size,
                }
                sink.write(
                    {"__key__": key, "jpg": jpg.getvalue(), "json": json.dumps(meta), "cls": str(s)}
                )
                keys.append(key)
        rows.append(
            {
                "path": f"shards/{path.name}",
                "n_samples": n,
                "bytes": path.stat().st_size,
                "sha256": "",
            }
        )
    if manifest:
        (out / "manifest").mkdir()
        pq.write_table(pa.Table.from_pylist(rows), out / "manifest" / "shards.parquet")
    return keys


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("uneven")
    return out, write_shards(out, UNEVEN)


def rank_keys(source, *, world_size: int = 2, **options) -> list[list[list[str]]]:
    """Keys of every batch of every simulated rank, valid samples only."""
    per_rank = []
    for rank in range(world_size):
        loader = frame_loader(source, rank=rank, world_size=world_size, **options)
        batches = [[k for k, v in zip(b["key"], b["valid"], strict=True) if v] for b in loader]
        assert len(batches) == len(loader)
        per_rank.append(batches)
    return per_rank


def test_two_ranks_two_workers_uneven_shards_every_sample_once(uneven):
    out, keys = uneven
    per_rank = rank_keys(
        out, batch_size=4, num_workers=2, shuffle_buffer=20, seed=1, drop_last=False
    )
    assert [len(b) for b in per_rank] == [10, 10]  # ceil(76 / (2 ranks x 4))
    seen = Counter(k for batches in per_rank for batch in batches for k in batch)
    assert sorted(seen) == sorted(keys) and set(seen.values()) == {1}


@pytest.mark.parametrize("sizes", [(50, 17, 9), (1,), (3, 5), (7, 7, 7, 7)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_partition_covers_every_sample_once_for_any_split(sizes, drop_last):
    shards = [Shard(f"s{i}", n) for i, n in enumerate(sizes)]
    for world_size, num_lanes, batch_size in itertools.product((1, 2, 3, 5), (1, 2, 3), (1, 4, 7)):
        n_batches = batches_per_rank(
            sum(sizes), world_size=world_size, batch_size=batch_size, drop_last=drop_last
        )
        valid = Counter()
        for rank, lane in itertools.product(range(world_size), range(num_lanes)):
            slices = lane_slices(
                shards,
                rank=rank,
                world_size=world_size,
                lane=lane,
                num_lanes=num_lanes,
                batch_size=batch_size,
                drop_last=drop_last,
            )
            planned = sum(s.stop - s.start for s in slices)
            assert planned == lane_batches(n_batches, num_lanes, lane) * batch_size
            valid.update((s.url, i) for s in slices if s.valid for i in range(s.start, s.stop))
        assert set(valid.values()) <= {1}
        expected = world_size * n_batches * batch_size if drop_last else sum(sizes)
        assert len(valid) == expected


def test_drop_last_gives_full_batches_of_distinct_samples(uneven):
    out, keys = uneven
    per_rank = rank_keys(out, batch_size=4, num_workers=2, shuffle_buffer=20, drop_last=True)
    assert [len(b) for b in per_rank] == [9, 9]  # floor(76 / 8)
    seen = [k for batches in per_rank for batch in batches for k in batch]
    assert all(len(batch) == 4 for batches in per_rank for batch in batches)
    assert len(seen) == len(set(seen)) == 72 and set(seen) <= set(keys)


def test_one_shard_two_ranks_two_workers_does_not_hang(tmp_path):
    keys = write_shards(tmp_path, (9,))
    per_rank = rank_keys(tmp_path, batch_size=2, num_workers=2, drop_last=False)
    assert [len(b) for b in per_rank] == [3, 3]
    assert sorted(k for batches in per_rank for batch in batches for k in batch) == keys


@pytest.mark.parametrize("resampled", [False, True])
def test_resume_yields_the_tail_of_the_uninterrupted_order(uneven, resampled):
    out, _ = uneven
    options = dict(
        batch_size=4, num_workers=2, shuffle_buffer=16, seed=7, epoch=3, rank=1, world_size=2
    )
    if resampled:
        options.update(resampled=True, batches_per_epoch=7)
    full = [b["key"] for b in frame_loader(out, **options)]
    assert len(full) == 7 if resampled else 9
    for steps in (1, 3):  # 3: the resumed run starts on the other worker
        tail = [b["key"] for b in frame_loader(out, start_sample=steps * 4, **options)]
        assert tail == full[steps:]


def test_order_depends_on_seed_and_epoch_only(uneven):
    out, _ = uneven
    options = dict(batch_size=4, num_workers=2, shuffle_buffer=16, rank=0, world_size=1)
    first = [k for b in frame_loader(out, seed=0, epoch=0, **options) for k in b["key"]]
    again = [k for b in frame_loader(out, seed=0, epoch=0, **options) for k in b["key"]]
    loader = frame_loader(out, seed=0, epoch=0, **options)
    loader.set_epoch(1)
    next_epoch = [k for b in loader for k in b["key"]]
    assert first == again
    assert next_epoch != first and sorted(next_epoch) == sorted(first)


def test_resampled_gives_every_rank_the_same_number_of_batches(uneven):
    out, keys = uneven
    per_rank = rank_keys(
        out, world_size=3, batch_size=8, num_workers=2, resampled=True, batches_per_epoch=5
    )
    assert [len(b) for b in per_rank] == [5, 5, 5]
    assert per_rank[0] != per_rank[1]
    assert {k for batches in per_rank for batch in batches for k in batch} <= set(keys)


def test_decoding_resize_crop_normalize_and_labels(uneven):
    out, keys = uneven
    loader = frame_loader(
        out, batch_size=5, resize=8, crop=8, mean=(0.5,), std=(0.25,), with_labels=True
    )
    batch = next(iter(loader))
    assert batch["image"].shape == (5, 3, 8, 8) and batch["image"].dtype == torch.float32
    assert batch["key"] == keys[:5] and batch["cls"].tolist() == [0] * 5
    grey = np.arange(5) / 255.0  # frame i is a flat grey of value i
    expected = (grey - 0.5) / 0.25
    np.testing.assert_allclose(batch["image"].mean(dim=(1, 2, 3)).numpy(), expected, atol=0.05)
    on_device = next(iter(frame_loader(out, batch_size=5, resize=8, crop=8, device="cpu")))
    torch.testing.assert_close(on_device["image"], batch["image"] * 0.25 + 0.5)
    gray = next(iter(frame_loader(out, batch_size=2, grayscale=True, crop=16)))
    assert gray["image"].shape == (2, 1, 16, 16)


def test_random_crop_and_flip_are_reproducible(tmp_path):
    write_shards(tmp_path, (6,), size=32)
    options = dict(batch_size=6, resize=24, crop=16, random_crop=True, flip=True, seed=3)
    first = next(iter(frame_loader(tmp_path, **options)))["image"]
    again = next(iter(frame_loader(tmp_path, **options)))["image"]
    assert first.shape == (6, 3, 16, 16) and torch.equal(first, again)


def test_every_kind_of_source_gives_the_same_samples(uneven, tmp_path):
    out, keys = uneven
    no_manifest = tmp_path / "bare"
    write_shards(no_manifest, UNEVEN, manifest=False)
    tars = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    sources = [
        out,
        out / "manifest" / "shards.parquet",
        str(out / "shards" / "frames-{000000..000002}.tar"),
        tars,
        no_manifest,
    ]
    for source in sources:
        loader = frame_loader(source, batch_size=4, drop_last=False)
        loaded = [k for b in loader for k, v in zip(b["key"], b["valid"], strict=True) if v]
        assert loaded == [k for k in keys], source


def test_bad_sources_fail_with_a_message_naming_them(tmp_path, uneven):
    with pytest.raises(ValueError, match="no manifest/shards.parquet and no"):
        frame_loader(tmp_path, batch_size=2)
    with pytest.raises(ValueError, match="missing-000000.tar: shard not found"):
        frame_loader([str(tmp_path / "missing-000000.tar")], batch_size=2)
    out, _ = uneven
    with pytest.raises(ValueError, match="make no full batch"):
        frame_loader(out, batch_size=64, world_size=2, rank=0)


def test_a_manifest_that_overstates_a_shard_is_an_error_not_a_hang(tmp_path):
    write_shards(tmp_path, (5, 4))
    path = tmp_path / "manifest" / "shards.parquet"
    table = pq.read_table(path).to_pylist()
    table[0]["n_samples"] = 8
    pq.write_table(pa.Table.from_pylist(table), path)
    with pytest.raises(ValueError, match="frames-000000.tar: fewer samples than the manifest says"):
        list(frame_loader(tmp_path, batch_size=3, drop_last=False))
