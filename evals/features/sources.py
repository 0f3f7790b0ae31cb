"""Where images come from: every dataset spec, and the source that loads its samples.

`open_dataset(spec)` turns a spec, what the user types after `--data`/`--train`/`--test`,
into an `evals.features.datasets.EvalDataset`:

- a shard directory, a `manifest/shards.parquet`, a brace pattern or a shard URL: frames
  read through `data_pipeline.loader.frame_loader` (`drop_last=False`, `valid` mask, every
  sample once); labels from each sample's `cls` member, class names from
  `manifest/classes.json` (a JSON list) when present, else "0", "1", ...;
- an ImageFolder directory, `root/<class>/*.png|jpg|jpeg|bmp|webp`, classes sorted by
  name as torchvision does; unreadable files are skipped and counted (one warning line),
  all unreadable is an error;
- `synth:cat[?n=600&seed=0&size=64&eyed=0]`: still frames drawn by `data_pipeline.synth`
  (`eyed=1`: eyed clutter, as `catneuron synth --eyed-clutter`), label 1
  when a cat face is among the distractors, 0 when not (alternating, so exactly half);
- `synth:shapes[?n=600&seed=0&size=64]`: one distractor shape on a texture, classes
  `data_pipeline.drawing.DISTRACTOR_KINDS` (circle, rectangle, triangle, star), balanced;
- `sklearn:digits`: the 1797 8x8 handwritten digits shipped with scikit-learn, as RGB
  images upscaled to `size` (default 32) by nearest neighbour.

Synthetic sets never show a frame training saw: `catneuron synth` clips draw their scene
seeds below `data_pipeline.synth.CLIP_SEED_LIMIT` (2**31), eval stills use
`EVAL_SEED_BASE + seed * 2**24 + index` with `EVAL_SEED_BASE = 2**40` (see `still_seed`).

Three kinds of source sit behind the specs: samples that load one by one (image files,
rendered synthetic stills, bundled arrays), batched by a `DataLoader` over
`data_pipeline.images`; WebDataset shards, read by the training loader itself; and
subsets of shards (the parent's pass, filtered). Each has `keys`, `labels`,
`batches(preprocess, batch_size, part, num_parts, num_workers)`, `images(keys,
preprocess)` and `subset(positions)`. Per-sample loaders are small frozen dataclasses,
so DataLoader workers and Ray tasks can copy them. Rendered synthetic stills are kept in
memory per process (`MemoLoad`, up to 512 MiB), since one eval reads the same set for
several sources.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np

from evals.features.cache import content_hash
from evals.features.datasets import DatasetError, EvalDataset

EVAL_SEED_BASE = 2**40
SEEDS_PER_SET = 2**24  # stills per `synth:` seed; seeds go up to 2**16
SYNTH_DEFAULTS = {"n": 600, "seed": 0, "size": 64, "eyed": 0}
DIGITS_DEFAULTS = {"size": 32}
CAT_CLASSES = ["no_cat", "cat"]


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
    return int(dict(parse_qsl(query)).get("size", SYNTH_DEFAULTS["size"]))


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


# ----------------------------------------------------------------------------- specs


def _options(spec: str, query: str, defaults: dict[str, int]) -> dict[str, int]:
    options = dict(defaults)
    for name, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if name not in defaults:
            raise DatasetError(f"{spec}: unknown option {name!r}; options: {', '.join(defaults)}")
        try:
            options[name] = int(value)
        except ValueError:
            raise DatasetError(f"{spec}: option {name}={value!r} is not an integer") from None
    return options


def _synth(spec: str, kind: str, query: str) -> EvalDataset:
    from data_pipeline.drawing import DISTRACTOR_KINDS

    o = _options(spec, query, SYNTH_DEFAULTS)
    if o["n"] < 2 or o["n"] > SEEDS_PER_SET:
        raise DatasetError(f"{spec}: n must be within [2, {SEEDS_PER_SET}], got {o['n']}")
    if not 16 <= o["size"] <= 1024:
        raise DatasetError(f"{spec}: size must be within [16, 1024], got {o['size']}")
    if not 0 <= o["seed"] < 2**16:
        raise DatasetError(f"{spec}: seed must be within [0, 65536), got {o['seed']}")
    n, seed, size = o["n"], o["seed"], o["size"]
    if kind == "cat":
        classes, load = CAT_CLASSES, MemoLoad(CatLoad(seed, size, bool(o["eyed"])))
        labels = np.arange(n, dtype=np.int64) % 2
    elif kind == "shapes":
        kinds = tuple(DISTRACTOR_KINDS)
        classes, load = list(kinds), MemoLoad(ShapesLoad(seed, size, kinds))
        labels = np.arange(n, dtype=np.int64) % len(classes)
    else:
        raise DatasetError(f"{spec}: unknown synthetic set {kind!r}; sets: synth:cat, synth:shapes")
    keys = [f"synth_{kind}_s{seed}_{i:07d}" for i in range(n)]
    fingerprint = content_hash("synth", kind, n, seed, size, 1, *(["eyed"] if o["eyed"] else []))
    return EvalDataset(spec, fingerprint, classes, IndexedSource(keys, labels, load))


def _digits(spec: str, query: str) -> EvalDataset:
    o = _options(spec, query, DIGITS_DEFAULTS)
    if not 8 <= o["size"] <= 1024:
        raise DatasetError(f"{spec}: size must be within [8, 1024], got {o['size']}")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetError(f"{spec}: needs scikit-learn (pip install scikit-learn)") from None
    digits = load_digits()
    size = o["size"]
    # 0..16 ink levels -> 0..255, ink bright; nearest-neighbour upscaling keeps the strokes.
    small = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    index = np.arange(size) * 8 // size
    images = np.repeat(small[:, index][:, :, index][..., None], 3, axis=3)
    labels = digits.target.astype(np.int64)
    keys = [f"digits_{i:04d}" for i in range(len(labels))]
    fingerprint = content_hash("sklearn:digits", hashlib.sha256(small.tobytes()).hexdigest(), size)
    classes = [str(c) for c in range(10)]
    return EvalDataset(spec, fingerprint, classes, IndexedSource(keys, labels, ArrayLoad(images)))


def _image_folder(spec: str, root: Path) -> EvalDataset:
    from data_pipeline.images import IMAGE_SUFFIXES, scan_image_folder, unreadable_reason

    classes, files, labels = scan_image_folder(root)
    if not files:
        raise DatasetError(
            f"{root}: no images in class folders ({root}/<class>/*{'|*'.join(IMAGE_SUFFIXES)})"
        )
    good, good_labels, skipped, first_reason = [], [], [], ""
    # Decoding releases the GIL: threads check a large folder several times faster.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        reasons = list(pool.map(unreadable_reason, files))
    for path, label, reason in zip(files, labels, reasons, strict=True):
        if reason is None:
            good.append(path)
            good_labels.append(label)
        else:
            skipped.append(str(path.relative_to(root)))
            first_reason = first_reason or f"{skipped[-1]}: {reason}"
    if not good:
        raise DatasetError(
            f"{root}: none of the {len(files)} image files is readable ({first_reason})"
        )
    if skipped:
        print(
            f"catneuron: warning: {root}: skipped {len(skipped)} of {len(files)} unreadable "
            f"image files (first: {first_reason})",
            file=sys.stderr,
        )
    keys = [path.relative_to(root).as_posix() for path in good]
    stats = [(k, p.stat().st_size, p.stat().st_mtime_ns) for k, p in zip(keys, good, strict=True)]
    fingerprint = content_hash("imagefolder", classes, stats, good_labels)
    source = IndexedSource(
        keys, np.asarray(good_labels, dtype=np.int64), FileLoad(tuple(str(p) for p in good))
    )
    return EvalDataset(spec, fingerprint, classes, source, skipped=skipped)


def _manifest_of(spec: str) -> Path | None:
    from data_pipeline.shard_list import MANIFEST

    path = Path(spec)
    if path.suffix == ".parquet" and path.is_file():
        return path
    if path.is_dir() and (path / MANIFEST).is_file():
        return path / MANIFEST
    return None


def _shards(spec: str) -> EvalDataset:
    import pyarrow.parquet as pq
    import webdataset as wds

    from data_pipeline.shard_list import resolve_shards

    try:
        shards = resolve_shards(spec)
    except (ValueError, OSError) as e:
        raise DatasetError(str(e).splitlines()[0]) from None
    keys, labels, seen = [], [], set()
    for shard in shards:
        for sample in wds.tarfile_samples([{"url": shard.url}]):
            key = sample["__key__"]
            if key in seen:
                raise DatasetError(f"{shard.url}: sample key {key!r} occurs twice in {spec}")
            seen.add(key)
            keys.append(key)
            labels.append(int(sample["cls"]) if "cls" in sample else None)
    has_labels = all(label is not None for label in labels)
    if not has_labels and any(label is not None for label in labels):
        raise DatasetError(f"{spec}: some samples have a cls label and some do not")
    manifest = _manifest_of(spec)
    content: list[Any] = []
    if manifest is not None:
        table = pq.read_table(manifest)
        if "sha256" in table.column_names:
            content = table.select(["path", "sha256"]).to_pylist()
    if not content or not all(row["sha256"] for row in content):
        content = [(os.path.basename(s.url), *_size_mtime(s.url)) for s in shards]
    fingerprint = content_hash("shards", content, len(keys))
    label_array = np.asarray(labels if has_labels else [-1] * len(keys), dtype=np.int64)
    classes: list[str] = []
    if has_labels:
        if label_array.min() < 0:
            raise DatasetError(f"{spec}: negative cls label {label_array.min()}")
        classes = [str(c) for c in range(int(label_array.max()) + 1)]
        names_file = (manifest or Path(spec) / "manifest" / "x").parent / "classes.json"
        if names_file.is_file():
            names = json.loads(names_file.read_text())
            if not isinstance(names, list) or len(names) < len(classes):
                raise DatasetError(f"{names_file}: needs a list of at least {len(classes)} names")
            classes = [str(name) for name in names]
    source = ShardSource(spec, [s.url for s in shards], keys, label_array, has_labels)
    return EvalDataset(spec, fingerprint, classes, source)


def _size_mtime(url: str) -> tuple[int, int]:
    try:
        st = os.stat(url)
        return st.st_size, st.st_mtime_ns
    except OSError:  # a URL: its name is all we know without a manifest
        return -1, -1


def _is_shard_spec(spec: str, path: Path) -> bool:
    if "{" in spec or "://" in spec or spec.startswith("pipe:"):
        return True
    if path.is_file():
        return path.suffix in (".tar", ".parquet")
    # A `catneuron shard` output (even an unfinished one) is never taken for an image folder.
    layout = (path / "shards").is_dir() or (path / "manifest").is_dir()
    return layout or _manifest_of(spec) is not None or any(path.glob("*.tar"))


def open_dataset(spec: str, *, labeled: bool = True) -> EvalDataset:
    """Open any dataset spec (see the module docstring).

    `labeled=True` (probes, selectivity) requires labels and at least two classes;
    `labeled=False` (neuron top-k) keeps labels where there are any. Raises DatasetError
    (one line naming the spec or file) for anything unusable.
    """
    spec = str(spec)
    if spec.startswith("synth:"):
        kind, _, query = spec[len("synth:") :].partition("?")
        dataset = _synth(spec, kind, query)
    elif spec.startswith("sklearn:"):
        kind, _, query = spec[len("sklearn:") :].partition("?")
        if kind != "digits":
            raise DatasetError(f"{spec}: unknown scikit-learn set {kind!r}; sets: sklearn:digits")
        dataset = _digits(spec, query)
    else:
        path = Path(spec)
        if not ("{" in spec or "://" in spec) and not path.exists():
            raise DatasetError(f"{spec}: no such file or directory")
        if _is_shard_spec(spec, path):
            dataset = _shards(spec)
        elif path.is_dir():
            dataset = _image_folder(spec, path)
        else:
            raise DatasetError(f"{spec}: not a shard set, manifest or image folder")
    if labeled:
        if not dataset.classes:
            raise DatasetError(f"{spec}: has no labels (shards need a cls member)")
        present = np.unique(dataset.labels)
        if len(present) < 2:
            raise DatasetError(f"{spec}: only one class ({dataset.classes[int(present[0])]})")
    return dataset
