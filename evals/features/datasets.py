"""Eval dataset specs -> one `EvalDataset` that every eval (probe, kNN, k-means, neurons) reads.

A spec is what the user types after `--data`/`--train`/`--test`:

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

Every image is preprocessed exactly as the export's training config says (the `preprocess`
dict of model.json: resize of the shorter side, centre crop, grayscale, mean/std), by the
loader's own decoder and normalizer, so probes never use other pixels than training did.

Splits: `split_indices` (stratified positions; split extracted `Features` with them, so
one pass serves both halves) and `split` (dataset views). `write_shards` turns any eval
set into labeled shards, for training on it (greedy pretraining on digits, say).
Rendered synthetic stills are kept in memory per process (`MemoLoad`, up to 512 MiB),
since one eval reads the same set for several sources.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np

from evals.features.sources import (
    EVAL_SEED_BASE,
    SEEDS_PER_SET,
    ArrayLoad,
    CatLoad,
    FileLoad,
    IndexedSource,
    MemoLoad,
    ShapesLoad,
    ShardSource,
    still_seed,
)

__all__ = [
    "EVAL_SEED_BASE",
    "DatasetError",
    "EvalDataset",
    "open_dataset",
    "split",
    "split_indices",
    "still_seed",
    "subset",
    "write_shards",
]

SYNTH_DEFAULTS = {"n": 600, "seed": 0, "size": 64, "eyed": 0}
DIGITS_DEFAULTS = {"size": 32}
CAT_CLASSES = ["no_cat", "cat"]


class DatasetError(ValueError):
    """A dataset spec that cannot be used: one line naming the file or spec and the problem."""


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


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
    fingerprint = _digest("synth", kind, n, seed, size, 1, *(["eyed"] if o["eyed"] else []))
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
    fingerprint = _digest("sklearn:digits", hashlib.sha256(small.tobytes()).hexdigest(), size)
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
    fingerprint = _digest("imagefolder", classes, stats, good_labels)
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
    fingerprint = _digest("shards", content, len(keys))
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
        _digest("subset", dataset.fingerprint, tag, positions),
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
