"""Features, extracted once: the one forward pass that probes, kNN, k-means and neurons read.

`extract(source, dataset, layers=..., cache_root=...)` runs `model.features(x)` over a
dataset in eval mode under no_grad (bf16 autocast on CUDA), and keeps per layer
- `pooled`: conv maps as concat(global mean, global max, grid x grid mean) flattened,
  vectors unchanged (the probes' input);
- `unit_max`, `unit_mean`, `unit_argmax`: per channel the max and mean over space and the
  (row, col) of the max (the neuron analysis' input).
Everything lands in a cache under `cache_root/<key>/`, one directory per layer, with
key = hash(weights hash, dataset fingerprint, preprocessing, pooling, layer): `.npy`
files and an `index.json` written last (a temporary directory, then renamed). A
directory without a matching index, or with files of the wrong size or hash, is rebuilt,
never trusted. A second `extract` on the same inputs reads the cache and runs nothing.

With `num_workers > 1` the dataset is split into that many contiguous parts, extracted
by Ray tasks (`map_parts`, through `data_pipeline.ray_cluster.ray_session`), each writing
its own part files; parts merge in part order, so the result equals one process's.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from evals.features.cache import (
    CACHE_VERSION,
    PartWriter,
    content_hash,
    load_layer,
    publish,
    remove_stale_builds,
)
from evals.features.datasets import EvalDataset
from evals.features.models import (
    FeatureError,
    FeatureSource,
    from_export,
    pixels,
    random_init,
)

POOL_GRID = 2
__all__ = [
    "POOL_GRID",
    "FeatureError",
    "FeatureSource",
    "Features",
    "cache_key",
    "check_layers",
    "extract",
    "from_export",
    "iter_activations",
    "layer_names",
    "map_parts",
    "pixels",
    "pool",
    "pooling_spec",
    "random_init",
    "resolve_device",
    "reduce",
    "unit_stats",
]


def _as_map(activation: Tensor) -> Tensor:
    """Activations as float (B, C, H, W) or (B, D): (B, H, W) maps (codes) are one channel."""
    activation = activation.float()
    if activation.ndim == 3:
        return activation.unsqueeze(1)
    if activation.ndim not in (2, 4):
        raise FeatureError(f"activation of shape {tuple(activation.shape)}: expected 2 to 4 dims")
    return activation


def reduce(activation: Tensor, grid: int = POOL_GRID) -> dict[str, Tensor]:
    """Everything the cache keeps of one layer's batch, from one pass over the map:
    `pooled` (see `pool`) and `unit_max`, `unit_mean`, `unit_argmax` (see `unit_stats`)."""
    a = _as_map(activation)
    units = unit_stats(a)
    if a.ndim == 2:
        return {"pooled": a, **units}
    pooled = torch.cat(
        [
            units["unit_mean"],
            units["unit_max"],
            torch.nn.functional.adaptive_avg_pool2d(a, grid).flatten(1),
        ],
        dim=1,
    )
    return {"pooled": pooled, **units}


def pool(activation: Tensor, grid: int = POOL_GRID) -> Tensor:
    """(B, C, H, W) -> float (B, C * (2 + grid * grid)): [global mean | global max | grid
    means], each block channel-major, the grid cells row-major (cut as adaptive average
    pooling cuts them); (B, D) unchanged (as float). (B, H, W) maps count as one channel."""
    return reduce(activation, grid)["pooled"]


def unit_stats(activation: Tensor) -> dict[str, Tensor]:
    """Per channel over space: `unit_max`, `unit_mean` (B, C) and `unit_argmax` (B, C, 2)
    int32 (row, col) of the first maximum in row-major order; a vector's units are its
    values, at (0, 0)."""
    a = _as_map(activation)
    if a.ndim == 2:
        zeros = torch.zeros((*a.shape, 2), dtype=torch.int32, device=a.device)
        return {"unit_max": a, "unit_mean": a, "unit_argmax": zeros}
    flat = a.flatten(2)
    best, where = flat.max(dim=2)
    width = a.shape[3]
    argmax = torch.stack([where // width, where % width], dim=2).to(torch.int32)
    return {"unit_max": best, "unit_mean": flat.mean(dim=2), "unit_argmax": argmax}


def _input_side(source: FeatureSource) -> int:
    """The square input side training used: crop, else resize, else the model's input_shape."""
    side = source.preprocess.get("crop") or source.preprocess.get("resize")
    shape = (source.spec or {}).get("kwargs", {}).get("input_shape")
    if not side and shape:
        side = shape[-1]
    if not side:
        raise FeatureError(
            f"{source.path or source.name}: preprocess has neither crop nor resize and the "
            "model no input_shape: the input size is unknown"
        )
    return int(side)


def layer_names(source: FeatureSource) -> list[str]:
    """The names `model.features` returns, in order, from one dummy forward (cached)."""
    if source._layers is None:
        channels = 1 if source.preprocess.get("grayscale") else 3
        side = _input_side(source)
        param = next(iter(source.model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        source.model.eval()
        with torch.no_grad():
            feats = source.model.features(torch.zeros(2, channels, side, side, device=device))
        source._layers = list(feats)
    return list(source._layers)


def check_layers(source: FeatureSource, layers: Sequence[str] | None) -> list[str]:
    """`layers` validated, in the given order, duplicates dropped (None or empty: all);
    an unknown name raises FeatureError listing the valid ones."""
    valid = layer_names(source)
    if not layers:
        return valid
    unknown = [name for name in layers if name not in valid]
    if unknown:
        where = source.spec.get("name") if source.spec else source.name
        raise FeatureError(
            f"{source.path or source.name}: no layer {', '.join(map(repr, unknown))} in "
            f"{where}; layers: {', '.join(valid)}"
        )
    return list(dict.fromkeys(layers))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, or CUDA when there is one and `device` is None: every eval's default."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DONE = object()
SERIAL_ENV = "CATNEURON_FEATURES_SERIAL"
"""Set to 1: decode, forward, reduce and write one after the other in one thread."""


PIPELINE_MIN_SIDE = 48
"""Inputs at least this wide are pipelined. bench/probe.py, 1 torch thread, load 0.1-0.7:
conv_ae at 64 px 1548 -> 1997 img/s pipelined (0.63 -> 0.81 of a bare forward); the tiny
conv_ae at 32 px 14409 -> 9575 img/s (its batches take under 2 ms each, so the threads'
hand-offs and the GIL cost more than they overlap)."""


def _pipelined(source: FeatureSource) -> bool:
    """Decode ahead and reduce/write behind in threads: only with a core to spare for them
    and batches big enough to pay for the hand-offs ($CATNEURON_FEATURES_SERIAL=1: never)."""
    if os.environ.get(SERIAL_ENV) == "1":
        return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        side = _input_side(source)
    except FeatureError:
        return False
    return (cores or 1) >= 2 and side >= PIPELINE_MIN_SIDE


def _ahead(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """`items`, produced by a thread up to `depth` ahead of the consumer.

    Decoding (PIL and NumPy, which release the GIL) then runs beside the forward pass on
    the other core instead of between forwards; the order, and so every result, is
    unchanged. An exception in the producer is raised in the consumer.
    """
    slots: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put((None, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put((None, _DONE))
        except BaseException as error:  # handed to the consumer, raised there
            slots.put((error, None))

    thread = threading.Thread(target=produce, name="catneuron-decode-ahead", daemon=True)
    thread.start()
    try:
        while True:
            error, item = slots.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                slots.get_nowait()
        thread.join()


class _Behind:
    """Calls `func(item)` in a thread, in order, at most `depth` items behind `put`;
    `close` waits for the last and raises the first exception the thread met."""

    def __init__(self, func: Callable[[Any], None], depth: int = 2) -> None:
        self._func, self._error, self._inline = func, None, depth == 0
        if self._inline:  # depth 0: no thread, `put` calls `func` itself
            return
        self._slots: queue.Queue = queue.Queue(depth)
        self._thread = threading.Thread(target=self._run, name="catneuron-write-behind")
        self._thread.start()

    def _run(self) -> None:
        while (item := self._slots.get()) is not _DONE:
            if self._error is None:
                try:
                    self._func(item)
                except BaseException as error:  # raised in the caller by put or close
                    self._error = error

    def put(self, item: Any) -> None:
        if self._inline:
            self._func(item)
            return
        if self._error is not None:
            self.close()
        self._slots.put(item)

    def close(self) -> None:
        if not self._inline and self._thread.is_alive():
            self._slots.put(_DONE)
            self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _device_batches(
    source: FeatureSource,
    dataset: EvalDataset,
    layers: list[str],
    *,
    batch_size: int,
    part: int,
    num_parts: int,
    device: torch.device,
    loader_workers: int,
    progress: bool,
    desc: str,
) -> Iterator[dict]:
    """The one forward pass: valid rows only, activations left on `device` in their dtype."""
    from tqdm import tqdm

    model = source.model.to(device).eval()
    start, stop = dataset.part_range(part, num_parts)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = tqdm(
        total=stop - start,
        desc=desc,
        unit="img",
        unit_scale=True,
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
        smoothing=0.1,
    )
    try:
        batches = dataset.batches(
            source.preprocess,
            batch_size,
            part=part,
            num_parts=num_parts,
            num_workers=loader_workers,
        )
        for batch in _ahead(batches) if loader_workers == 0 and _pipelined(source) else batches:
            valid = batch["valid"]
            keep = valid.nonzero().flatten() if not bool(valid.all()) else None
            if keep is not None and len(keep) == 0:
                continue
            # The padded batch goes through whole: a row's result can depend on the batch
            # size (BLAS takes another path for one row), never on the other rows' values.
            x = batch["image"].to(device, non_blocking=True)
            with torch.no_grad(), autocast:
                feats = model.features(x)
            if keep is not None:
                on_device = keep.to(device)
                feats = {name: feats[name][on_device] for name in layers}
            keys = batch["key"] if keep is None else [batch["key"][i] for i in keep.tolist()]
            cls = batch["cls"] if keep is None else batch["cls"][keep]
            bar.update(len(keys))
            yield {
                "key": keys,
                "cls": cls,
                "valid": torch.ones(len(keys), dtype=torch.bool),
                "acts": {name: feats[name] for name in layers},
            }
    finally:
        bar.close()


def iter_activations(
    source: FeatureSource,
    dataset: EvalDataset,
    *,
    layers: Sequence[str] | None = None,
    batch_size: int = 64,
    part: int = 0,
    num_parts: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
    loader_workers: int = 0,
    on_device: bool = False,
) -> Iterator[dict]:
    """Per batch `{"key": list[str], "cls": int64 (b,), "valid": all True, "acts": {layer:
    Tensor}}`, padding rows already removed; raw (unpooled) activations as float32 on the
    CPU, or with `on_device=True` left where the model ran, in its (autocast) dtype.

    Eval mode, no_grad, bf16 autocast on CUDA; the part `part` of `num_parts` only. For
    reductions of one's own (the neuron top-k); `extract` caches the standard ones.
    Batches of shards read with `loader_workers > 1` arrive interleaved: place rows by key.
    """
    names = check_layers(source, layers)
    for out in _device_batches(
        source,
        dataset,
        names,
        batch_size=batch_size,
        part=part,
        num_parts=num_parts,
        device=resolve_device(device),
        loader_workers=loader_workers,
        progress=progress,
        desc=f"activations {source.name}",
    ):
        if not on_device:
            out["acts"] = {k: v.float().cpu() for k, v in out["acts"].items()}
        yield out


@dataclass
class Features:
    """The cached per-sample features of one (source, dataset) over some layers.

    keys, labels (int64, -1 when unlabeled) in the dataset's order; per layer `pooled`
    (N, D) float32, `unit_max` / `unit_mean` (N, C) float32, `unit_argmax` (N, C, 2) int32.
    cache_keys: layer -> the cache directory name; extracted: False when every layer
    came from the cache.
    """

    keys: list[str]
    labels: np.ndarray
    classes: list[str]
    pooled: dict[str, np.ndarray]
    unit_max: dict[str, np.ndarray]
    unit_mean: dict[str, np.ndarray]
    unit_argmax: dict[str, np.ndarray]
    cache_dir: Path
    extracted: bool
    cache_keys: dict[str, str] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)

    def subset(self, positions: Sequence[int] | np.ndarray) -> Features:
        """The rows `positions` of every array (e.g. `evals.features.datasets.split_indices`)."""
        idx = np.asarray(positions, dtype=np.int64)

        def take(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {k: v[idx] for k, v in arrays.items()}

        return Features(
            keys=[self.keys[i] for i in idx.tolist()],
            labels=self.labels[idx],
            classes=self.classes,
            pooled=take(self.pooled),
            unit_max=take(self.unit_max),
            unit_mean=take(self.unit_mean),
            unit_argmax=take(self.unit_argmax),
            cache_dir=self.cache_dir,
            extracted=self.extracted,
            cache_keys=self.cache_keys,
            layers=self.layers,
        )


def pooling_spec() -> dict:
    return {
        "grid": POOL_GRID,
        "pooled": ["mean", "max", f"grid{POOL_GRID}x{POOL_GRID}_mean"],
        "units": ["max", "mean", "argmax"],
    }


def cache_key(source: FeatureSource, dataset: EvalDataset, layer: str) -> str:
    """hash(version, weights, dataset fingerprint, preprocessing, pooling, layer), 32 hex."""
    return content_hash(
        CACHE_VERSION,
        source.weights_hash,
        dataset.fingerprint,
        source.preprocess,
        pooling_spec(),
        layer,
    )[:32]


def _expected_index(source: FeatureSource, dataset: EvalDataset, layer: str) -> dict:
    return {
        "version": CACHE_VERSION,
        "layer": layer,
        "weights_hash": source.weights_hash,
        "fingerprint": dataset.fingerprint,
        "preprocess": source.preprocess,
        "pooling": pooling_spec(),
        "n": len(dataset),
    }


def _extract_part(
    source: FeatureSource,
    dataset: EvalDataset,
    layers: list[str],
    build_dirs: dict[str, str],
    part: int,
    num_parts: int,
    *,
    batch_size: int,
    device: str | torch.device | None,
    loader_workers: int,
    progress: bool,
) -> dict[str, dict]:
    """Extract part `part` of `num_parts` for `layers` into each layer's build directory;
    return layer -> the part's index entry. Runs in the caller or in a Ray task."""
    start, stop = dataset.part_range(part, num_parts)
    position = {key: i - start for i, key in enumerate(dataset.keys[start:stop], start)}
    writers = {name: PartWriter(Path(build_dirs[name]), part, start, stop) for name in layers}

    def write(batch: dict) -> None:
        try:
            rows = np.array([position[key] for key in batch["key"]], dtype=np.int64)
        except KeyError as e:
            raise RuntimeError(f"{dataset.spec}: sample {e} is not in part {part}") from None
        labels = batch["cls"].cpu().numpy()
        for name in layers:
            values = reduce(batch["acts"][name])
            values = {
                k: v.cpu().numpy() if k == "unit_argmax" else v.float().cpu().numpy()
                for k, v in values.items()
            }
            writers[name].write(rows, batch["key"], labels, values)

    # Pooling, unit statistics and the .npy writes of batch i run in a thread while the
    # model computes batch i + 1 (torch's kernels release the GIL); batches are written
    # in order, so the cache is byte-identical to a serial pass.
    behind = _Behind(write, depth=2 if _pipelined(source) else 0)
    try:
        for batch in _device_batches(
            source,
            dataset,
            layers,
            batch_size=batch_size,
            part=part,
            num_parts=num_parts,
            device=resolve_device(device),
            loader_workers=loader_workers,
            progress=progress,
            desc=f"features {source.name}" + (f" part {part}/{num_parts}" if num_parts > 1 else ""),
        ):
            behind.put(batch)
    finally:
        behind.close()
    return {name: writer.close() for name, writer in writers.items()}


def extract(
    source: FeatureSource,
    dataset: EvalDataset,
    *,
    layers: Sequence[str] | None = None,
    cache_root: Path,
    batch_size: int = 64,
    num_workers: int = 0,
    address: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    loader_workers: int = 0,
) -> Features:
    """Features of every requested layer, from the cache where it holds them, else extracted
    in one pass (all missing layers together) and cached.

    num_workers > 1: that many Ray tasks (local cluster, or `address`) each extract one
    contiguous part and write its files; `cache_root` must then be on a file system every
    node sees. loader_workers: decoding processes inside each pass.
    """
    names = check_layers(source, layers)
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    keys = {name: cache_key(source, dataset, name) for name in names}
    expected = {name: _expected_index(source, dataset, name) for name in names}
    loaded: dict[str, dict] = {}
    for name in names:
        directory = cache_root / keys[name]
        if directory.exists():
            arrays = load_layer(directory, expected[name], dataset.keys, dataset.labels)
            if arrays is None:
                print(
                    f"catneuron: {directory}: cache does not match; rebuilding it", file=sys.stderr
                )
            else:
                loaded[name] = arrays
    missing = [name for name in names if name not in loaded]
    if missing:
        remove_stale_builds(cache_root)
        token = uuid.uuid4().hex[:12]
        builds = {name: cache_root / f".{keys[name]}.build-{token}" for name in missing}
        for build in builds.values():
            build.mkdir()
        num_parts = max(1, num_workers)
        try:
            part_entries = map_parts(
                _PartJob(
                    source,
                    dataset,
                    missing,
                    {k: str(v) for k, v in builds.items()},
                    batch_size,
                    device,
                    loader_workers,
                    progress and num_parts == 1,
                ),
                num_parts,
                address,
                progress=progress,
                sizes=[
                    b - a for a, b in (dataset.part_range(p, num_parts) for p in range(num_parts))
                ],
            )
            for name in missing:
                index = {
                    **expected[name],
                    "source": source.name,
                    "dataset": dataset.spec,
                    "parts": [entries[name] for entries in part_entries],
                }
                publish(builds[name], cache_root / keys[name], index)
        finally:
            for build in builds.values():
                shutil.rmtree(build, ignore_errors=True)
        for name in missing:
            arrays = load_layer(
                cache_root / keys[name], expected[name], dataset.keys, dataset.labels
            )
            if arrays is None:
                raise FeatureError(
                    f"{cache_root / keys[name]}: cache unreadable right after writing"
                )
            loaded[name] = arrays
    first = loaded[names[0]]
    return Features(
        keys=list(dataset.keys),
        labels=first["labels"],
        classes=list(dataset.classes),
        pooled={n: loaded[n]["pooled"] for n in names},
        unit_max={n: loaded[n]["unit_max"] for n in names},
        unit_mean={n: loaded[n]["unit_mean"] for n in names},
        unit_argmax={n: loaded[n]["unit_argmax"] for n in names},
        cache_dir=cache_root,
        extracted=bool(missing),
        cache_keys=keys,
        layers=names,
    )


@dataclass
class _PartJob:
    """`func(part, num_parts)` for `map_parts`: a picklable call of `_extract_part`."""

    source: FeatureSource
    dataset: EvalDataset
    layers: list[str]
    build_dirs: dict[str, str]
    batch_size: int
    device: str | torch.device | None
    loader_workers: int
    progress: bool

    def __call__(self, part: int, num_parts: int) -> dict[str, dict]:
        return _extract_part(
            self.source,
            self.dataset,
            self.layers,
            self.build_dirs,
            part,
            num_parts,
            batch_size=self.batch_size,
            device=self.device,
            loader_workers=self.loader_workers,
            progress=self.progress,
        )


def _call_part(func: Callable[[int, int], Any], part: int, num_parts: int) -> Any:
    torch.set_num_threads(1)  # one core per task, as Ray schedules them
    return func(part, num_parts)


def map_parts(
    func: Callable[[int, int], Any],
    num_parts: int,
    address: str | None = None,
    *,
    progress: bool = False,
    sizes: Sequence[int] | None = None,
) -> list:
    """`[func(p, num_parts) for p in range(num_parts)]`, results in part order.

    num_parts <= 1: inline. Otherwise one Ray task per part (1 CPU each, retried twice)
    on a local cluster or the one at `address`, via `ray_session`; `func` must be
    picklable and should write large results to files rather than return them.
    `progress` shows a bar over finished parts, counting `sizes[p]` (e.g. images) per part.
    """
    if num_parts <= 1:
        return [func(0, 1)]
    import ray
    from tqdm import tqdm

    from data_pipeline.ray_cluster import ray_session

    with ray_session(address, num_cpus=min(num_parts, os.cpu_count() or 1)):
        task = ray.remote(num_cpus=1, max_retries=2)(_call_part)
        func_ref = ray.put(func)
        refs = [task.remote(func_ref, part, num_parts) for part in range(num_parts)]
        weights = list(sizes) if sizes is not None else [1] * num_parts
        with tqdm(
            total=sum(weights),
            desc=f"{num_parts} parts",
            unit="img" if sizes else "part",
            unit_scale=True,
            file=sys.stderr,
            disable=not progress,
        ) as bar:
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)  # raise a task's error as soon as it is known
                bar.update(sum(weights[refs.index(ref)] for ref in done))
        return ray.get(refs)
