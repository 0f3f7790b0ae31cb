"""Eval dataset specs: every kind opens, labels and keys are right, pixels equal the loader's.

Shards are written directly with webdataset (a handful of samples, with and without `cls`)
so the loader path is exercised without the cost of `catneuron synth` + `catneuron shard`.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipeline.images import decoder_for, normalizer_for, prepare_array
from data_pipeline.loader import frame_loader
from data_pipeline.synth import CLIP_SEED_LIMIT, plan_clips, render_still
from evals.features.datasets import DatasetError, split, split_indices, write_shards
from evals.features.sources import EVAL_SEED_BASE, open_dataset, still_seed

# Not square and not the model's size, so resize and crop both do something.
PRE = {"resize": 24, "crop": 20, "grayscale": False, "mean": [0.5, 0.4, 0.3], "std": [0.2]}


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (30, 40, 3), dtype=np.uint8) for _ in range(n)]


def write_labeled_shards(
    out: Path, sizes: tuple[int, ...], *, labels: bool = True, fmt: str = "JPEG"
) -> tuple[list[str], list[np.ndarray], list[bytes]]:
    """Shards in the `catneuron shard` layout with a manifest holding real sha256s."""
    (out / "shards").mkdir(parents=True)
    keys, arrays, payloads, rows = [], [], [], []
    images = iter(_images(sum(sizes)))
    for s, n in enumerate(sizes):
        path = out / "shards" / f"g{s:06d}-000000.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(n):
                key, array = f"{s:016x}_{i:07d}", next(images)
                data = _encode(array, fmt)
                sample = {"__key__": key, "jpg": data, "json": json.dumps({"frame_index": i})}
                if labels:
                    sample["cls"] = str((s + i) % 3)
                sink.write(sample)
                keys.append(key)
                arrays.append(array)
                payloads.append(data)
        rows.append(
            {
                "path": f"shards/{path.name}",
                "n_samples": n,
                "bytes": path.stat().st_size,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
        )
    (out / "manifest").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), out / "manifest" / "shards.parquet")
    return keys, arrays, payloads


def all_batches(dataset, preprocess=PRE, batch_size=4, **kw) -> dict:
    return collect(dataset.batches(preprocess, batch_size, **kw))


def collect(batches) -> dict:
    """Concatenated valid rows of an iterable of batches."""
    batches = list(batches)
    valid = torch.cat([b["valid"] for b in batches])
    keys = [k for b in batches for k in b["key"]]
    return {
        "image": torch.cat([b["image"] for b in batches])[valid],
        "key": [k for k, v in zip(keys, valid.tolist(), strict=True) if v],
        "cls": torch.cat([b["cls"] for b in batches])[valid],
    }


def test_labeled_shards_read_through_the_loader_every_sample_once(tmp_path):
    keys, _, _ = write_labeled_shards(tmp_path / "s", (5, 4))
    (tmp_path / "s" / "manifest" / "classes.json").write_text('["zero", "one", "two"]')
    dataset = open_dataset(str(tmp_path / "s"))
    assert len(dataset) == 9 and dataset.keys == keys
    assert dataset.classes == ["zero", "one", "two"]
    assert dataset.labels.tolist() == [0, 1, 2, 0, 1, 1, 2, 0, 1]
    got = all_batches(dataset)
    loader = frame_loader(
        str(tmp_path / "s"),
        batch_size=4,
        resize=24,
        crop=20,
        mean=PRE["mean"],
        std=PRE["std"],
        with_labels=True,
        drop_last=False,
    )
    ref = collect(loader)
    assert got["key"] == keys and torch.equal(got["image"], ref["image"])
    assert got["image"].shape == (9, 3, 20, 20) and got["cls"].tolist() == dataset.labels.tolist()
    # Parts: contiguous, in order, every sample once.
    parts = [all_batches(dataset, part=p, num_parts=3)["key"] for p in range(3)]
    assert parts == [keys[0:3], keys[3:6], keys[6:9]]
    # The same shards through a brace pattern: same samples; the fingerprint follows content.
    pattern = str(tmp_path / "s" / "shards" / "g{000000..000001}-000000.tar")
    assert open_dataset(pattern).keys == keys
    assert open_dataset(str(tmp_path / "s")).fingerprint == dataset.fingerprint


def test_shard_fingerprint_changes_with_content(tmp_path):
    write_labeled_shards(tmp_path / "a", (3,))
    write_labeled_shards(tmp_path / "b", (4,))
    assert (
        open_dataset(str(tmp_path / "a")).fingerprint
        != open_dataset(str(tmp_path / "b")).fingerprint
    )


def test_unlabeled_shards(tmp_path):
    keys, arrays, payloads = write_labeled_shards(tmp_path / "u", (3, 2), labels=False)
    with pytest.raises(DatasetError, match="no labels"):
        open_dataset(str(tmp_path / "u"))
    dataset = open_dataset(str(tmp_path / "u"), labeled=False)
    assert dataset.classes == [] and dataset.labels.tolist() == [-1] * 5
    assert all_batches(dataset)["cls"].tolist() == [-1] * 5
    # Fetch back by key: the stored JPEG decoded, and the view the model got.
    source = dataset.image(keys[3])
    assert np.array_equal(source, np.asarray(Image.open(io.BytesIO(payloads[3])).convert("RGB")))
    seen = dataset.images([keys[3], keys[0]], preprocess=PRE)
    assert seen[keys[3]].shape == (20, 20, 3) and set(seen) == {keys[0], keys[3]}
    with pytest.raises(DatasetError, match="no sample with key 'nope'"):
        dataset.image("nope")


def test_in_memory_preprocessing_equals_the_loader_on_the_same_image(tmp_path):
    """PNG bytes (lossless) through the real loader == the array through `prepare_array`."""
    keys, arrays, _ = write_labeled_shards(tmp_path / "p", (6,), fmt="PNG")
    for grayscale in (False, True):
        pre = {**PRE, "grayscale": grayscale, "mean": [0.5], "std": [0.25]}
        loader = frame_loader(
            str(tmp_path / "p"),
            batch_size=6,
            resize=24,
            crop=20,
            grayscale=grayscale,
            mean=[0.5],
            std=[0.25],
            drop_last=False,
        )
        ref = next(iter(loader))["image"]
        decoder = decoder_for(pre)
        mine = np.stack([prepare_array(a, decoder, k) for a, k in zip(arrays, keys, strict=True)])
        assert torch.equal(normalizer_for(pre)(torch.from_numpy(mine)), ref)
        assert ref.shape == (6, 1 if grayscale else 3, 20, 20)


def test_arrays_already_at_the_input_size_equal_the_loader(tmp_path):
    """The no-copy path (no resize, full-size crop) gives the loader's pixels too."""
    images = [
        np.random.default_rng(i).integers(0, 256, (20, 20, 3), dtype=np.uint8) for i in range(3)
    ]
    (tmp_path / "sq").mkdir()
    with wds.TarWriter(str(tmp_path / "sq" / "sq.tar")) as sink:
        for i, image in enumerate(images):
            sink.write({"__key__": f"k{i}", "jpg": _encode(image, "PNG")})
    for resize, crop in ((20, 20), (None, None), (20, None), (24, 20)):
        pre = {**PRE, "resize": resize, "crop": crop}
        loader = frame_loader(str(tmp_path / "sq"), batch_size=3, resize=resize, crop=crop,
                              drop_last=False)  # fmt: skip
        ref = next(iter(loader))["image"]
        decoder = decoder_for(pre)
        mine = np.stack([prepare_array(a, decoder, f"k{i}") for i, a in enumerate(images)])
        assert torch.equal(
            normalizer_for({**pre, "mean": [0.0], "std": [1.0]})(torch.from_numpy(mine)), ref
        )


def make_folder(root: Path) -> dict[str, np.ndarray]:
    """root/cat/*.png, root/dog/*.jpg + an unreadable .png and a truncated .jpg."""
    images = _images(5, seed=3)
    written = {}
    for name, cls, fmt, image in [
        ("b.png", "cat", "PNG", images[0]),
        ("a.png", "cat", "PNG", images[1]),
        ("x.jpg", "dog", "JPEG", images[2]),
        ("y.jpeg", "dog", "JPEG", images[3]),
    ]:
        (root / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / name).write_bytes(_encode(image, fmt))
        written[f"{cls}/{name}"] = image
    (root / "cat" / "broken.png").write_bytes(b"not an image at all")
    (root / "dog" / "cut.jpg").write_bytes(_encode(images[4], "JPEG")[:300])
    (root / "dog" / "notes.txt").write_text("ignored: not an image suffix")
    return written


def test_image_folder_classes_sorted_unreadable_skipped_and_counted(tmp_path, capsys):
    make_folder(tmp_path / "f")
    dataset = open_dataset(str(tmp_path / "f"))
    assert dataset.classes == ["cat", "dog"]
    assert dataset.keys == ["cat/a.png", "cat/b.png", "dog/x.jpg", "dog/y.jpeg"]
    assert dataset.labels.tolist() == [0, 0, 1, 1]
    assert sorted(dataset.skipped) == ["cat/broken.png", "dog/cut.jpg"]
    err = capsys.readouterr().err
    assert "skipped 2 of 6 unreadable image files" in err and len(err.strip().splitlines()) == 1
    got = all_batches(dataset, batch_size=3)
    assert got["key"] == dataset.keys and got["image"].shape == (4, 3, 20, 20)


def test_image_folder_jpeg_equals_the_loader_on_the_same_bytes(tmp_path):
    """A JPEG file and a shard holding its bytes give identical tensors (draft included)."""
    make_folder(tmp_path / "f")
    data = (tmp_path / "f" / "dog" / "x.jpg").read_bytes()
    (tmp_path / "s").mkdir()
    with wds.TarWriter(str(tmp_path / "s" / "one.tar")) as sink:
        sink.write({"__key__": "k", "jpg": data})
    loader = frame_loader(
        str(tmp_path / "s"),
        batch_size=1,
        resize=24,
        crop=20,
        mean=PRE["mean"],
        std=PRE["std"],
        drop_last=False,
    )
    dataset = open_dataset(str(tmp_path / "f"))
    got = all_batches(dataset)
    assert torch.equal(got["image"][2], next(iter(loader))["image"][0])
    assert np.array_equal(dataset.image("dog/x.jpg"), np.asarray(Image.open(io.BytesIO(data))))


def test_image_folder_errors(tmp_path):
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"junk")
    (tmp_path / "bad" / "b").mkdir()
    (tmp_path / "bad" / "b" / "y.png").write_bytes(b"junk too")
    with pytest.raises(DatasetError, match="none of the 2 image files is readable"):
        open_dataset(str(tmp_path / "bad"))
    (tmp_path / "one" / "only").mkdir(parents=True)
    (tmp_path / "one" / "only" / "x.png").write_bytes(_encode(_images(1)[0], "PNG"))
    with pytest.raises(DatasetError, match="only one class"):
        open_dataset(str(tmp_path / "one"))
    assert len(open_dataset(str(tmp_path / "one"), labeled=False)) == 1
    (tmp_path / "unfinished" / "shards").mkdir(parents=True)  # a shard run that wrote nothing
    with pytest.raises(DatasetError, match="no .*shards"):
        open_dataset(str(tmp_path / "unfinished"), labeled=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        open_dataset(str(tmp_path / "empty"))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/nonexistent/dir", "no such file"),
        ("synth:dogs", "unknown synthetic set"),
        ("synth:cat?m=3", "unknown option 'm'"),
        ("synth:cat?n=ten", "not an integer"),
        ("synth:cat?n=1", "n must be"),
        ("sklearn:iris", "unknown scikit-learn set"),
    ],
)
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(DatasetError, match=message) as info:
        open_dataset(spec)
    assert "\n" not in str(info.value)


def test_synth_cat_is_balanced_deterministic_and_matches_render_still():
    dataset = open_dataset("synth:cat?n=6&seed=3&size=32")
    assert dataset.classes == ["no_cat", "cat"] and dataset.labels.tolist() == [0, 1] * 3
    again = open_dataset("synth:cat?n=6&seed=3&size=32")
    assert again.fingerprint == dataset.fingerprint
    assert open_dataset("synth:cat?n=6&seed=4&size=32").fingerprint != dataset.fingerprint
    for index in (0, 1):
        image = dataset.image(dataset.keys[index])
        expected, box = render_still(32, 32, still_seed(3, index), cat=index == 1)
        assert np.array_equal(image, expected) and (box is not None) == (index == 1)
    got = all_batches(dataset, {**PRE, "resize": 32, "crop": 32}, batch_size=4)
    assert got["image"].shape == (6, 3, 32, 32) and got["cls"].tolist() == [0, 1] * 3


def test_synth_seed_space_is_disjoint_from_catneuron_synth_clips():
    """Clip scene seeds are < CLIP_SEED_LIMIT (for any plan); eval stills' are >= 2**40."""
    clip_seeds = [s.seed for seed in (0, 1, 7, 2**31 - 1) for s in plan_clips(50, seed)]
    assert max(clip_seeds) < CLIP_SEED_LIMIT <= EVAL_SEED_BASE
    eval_seeds = {still_seed(seed, i) for seed in (0, 1, 2**16 - 1) for i in (0, 1, 2**24 - 1)}
    assert min(eval_seeds) >= EVAL_SEED_BASE and len(eval_seeds) == 9
    with pytest.raises(ValueError, match="outside"):
        still_seed(2**16, 0)
    # Same user seed, same index: still different pixels from the clip scene of that seed.
    first_clip = plan_clips(1, 0)[0]
    clip_frame, _ = render_still(64, 64, first_clip.seed, cat=False)
    assert not np.array_equal(
        clip_frame, open_dataset("synth:cat?n=2").image("synth_cat_s0_0000000")
    )


def test_synth_shapes_classes():
    dataset = open_dataset("synth:shapes?n=8&size=32")
    assert dataset.classes == ["circle", "rectangle", "triangle", "star"]
    assert dataset.labels.tolist() == [0, 1, 2, 3] * 2
    images = dataset.images(dataset.keys[:4])
    assert all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im in images.values())
    assert len({im.tobytes() for im in images.values()}) == 4


def test_sklearn_digits():
    from sklearn.datasets import load_digits

    dataset = open_dataset("sklearn:digits?size=16")
    digits = load_digits()
    assert len(dataset) == 1797 and dataset.classes == [str(i) for i in range(10)]
    assert np.array_equal(dataset.labels, digits.target)
    image = dataset.image("digits_0005")
    assert image.shape == (16, 16, 3) and np.array_equal(image[..., 0], image[..., 2])
    expected = np.round(digits.images[5] * 255 / 16).astype(np.uint8)
    assert np.array_equal(image[::2, ::2, 0], expected)
    part = all_batches(
        dataset, {**PRE, "resize": 16, "crop": 16}, batch_size=64, part=3, num_parts=4
    )
    assert part["key"] == dataset.keys[1347:1797] and part["image"].shape == (450, 3, 16, 16)


def test_batches_follow_the_whole_sets_batch_grid():
    """Parts cut batches where the whole set does, so a sample sees the same batch either way."""
    dataset = open_dataset("sklearn:digits?size=8")
    pre = {**PRE, "resize": 8, "crop": 8}
    sizes = [len(b["key"]) for b in dataset.batches(pre, 64, part=1, num_parts=3)]
    start, stop = dataset.part_range(1, 3)
    assert (start, stop) == (599, 1198)
    assert sizes[0] == 640 - 599 and all(s == 64 for s in sizes[1:-1]) and sum(sizes) == 599


def test_split_is_stratified_deterministic_and_disjoint():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    train, test = split_indices(labels, 0.2, seed=1)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(100))
    assert np.bincount(labels[test]).tolist() == [10, 6, 4]
    again = split_indices(labels, 0.2, seed=1)
    assert np.array_equal(again[1], test)
    assert not np.array_equal(split_indices(labels, 0.2, seed=2)[1], test)
    dataset = open_dataset("synth:shapes?n=20&size=16")
    tr, te = split(dataset, 0.25, seed=0)
    assert len(tr) == 16 and len(te) == 4 and set(tr.keys).isdisjoint(te.keys)
    assert np.bincount(te.labels).tolist() == [1, 1, 1, 1]
    assert tr.fingerprint not in (te.fingerprint, dataset.fingerprint)
    got = all_batches(te, {**PRE, "resize": 16, "crop": 16})
    assert got["key"] == te.keys and got["cls"].tolist() == te.labels.tolist()


def test_split_of_shards_reads_the_subset_only(tmp_path):
    keys, _, _ = write_labeled_shards(tmp_path / "s", (6, 6))
    dataset = open_dataset(str(tmp_path / "s"))
    train, test = split(dataset, 0.25, seed=0)
    assert len(train) + len(test) == 12
    for view in (train, test):
        assert all_batches(view)["key"] == view.keys
        halves = [all_batches(view, part=p, num_parts=2)["key"] for p in range(2)]
        assert halves[0] + halves[1] == view.keys


def test_write_shards_round_trips_an_eval_set(tmp_path):
    """An eval set written as labeled shards (for training on it) reads back the same."""
    dataset = open_dataset("synth:shapes?n=6&size=16")
    out = write_shards(dataset, tmp_path / "out", per_shard=4, lossless=True)
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "eval-000000.tar",
        "eval-000001.tar",
    ]
    back = open_dataset(str(out))
    assert len(back) == 6 and back.classes == dataset.classes
    assert back.labels.tolist() == dataset.labels.tolist()
    pre = {**PRE, "resize": 16, "crop": 16}
    assert torch.equal(all_batches(back, pre)["image"], all_batches(dataset, pre)["image"])
    rows = pq.read_table(out / "manifest" / "shards.parquet").to_pylist()
    assert [r["n_samples"] for r in rows] == [4, 2] and all(len(r["sha256"]) == 64 for r in rows)
    assert (
        write_shards(dataset, tmp_path / "again", per_shard=4, lossless=True)
        and open_dataset(str(tmp_path / "again")).fingerprint == back.fingerprint
    )  # same content, same bytes, same fingerprint


def test_synth_renders_are_kept_per_process_and_not_pickled(monkeypatch):
    import pickle

    import evals.features.sources as sources

    dataset = open_dataset("synth:shapes?n=4&size=16")
    pre = {**PRE, "resize": 16, "crop": 16}
    first = all_batches(dataset, pre)["image"]
    calls = []
    monkeypatch.setattr(sources.ShapesLoad, "__call__", lambda self, i: calls.append(i))
    assert torch.equal(all_batches(dataset, pre)["image"], first) and calls == []
    copy = pickle.loads(pickle.dumps(dataset._source.load))
    assert copy.kept == {} and dataset._source.load.kept_bytes == 4 * 16 * 16 * 3


@pytest.mark.slow
def test_real_catneuron_shard_output_unlabeled(shards):
    """The session's `catneuron synth` + `catneuron shard` output: unlabeled, every frame once."""
    with pytest.raises(DatasetError, match="no labels"):
        open_dataset(str(shards))
    dataset = open_dataset(str(shards), labeled=False)
    got = all_batches(
        dataset, {**PRE, "resize": 32, "crop": 32}, batch_size=16, part=1, num_parts=2
    )
    start, stop = dataset.part_range(1, 2)
    assert got["key"] == dataset.keys[start:stop] and got["image"].shape[1:] == (3, 32, 32)
    assert dataset.image(dataset.keys[-1]).shape == (64, 64, 3)
