"""Loader throughput against the floor it cannot beat: a bare tarfile + Pillow loop.

Writes frame shards (JPEGs of smooth random noise, so they compress like real frames),
then prints images/s of (a) one process reading the tars with `tarfile` and decoding
each JPEG with Pillow into a float tensor, and (b) `frame_loader` over the same shards
with 0, 1 and 2 workers. The ratio per worker is the loader's overhead: the target is
>= 0.9 of the raw loop. Each figure is the best of `--repeats` passes, taken in turns
with the other readers, which matters on a shared machine.

    python bench/loader.py --frames 2000 --size 128

Rates count images after the first batch; the time to the first batch (starting the
workers, filling their first batches) is its own column.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from data_pipeline.loader import frame_loader


def write_frames(out: Path, n_frames: int, size: int, per_shard: int) -> None:
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(out / "bench-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n_frames):
            coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
            jpg = io.BytesIO()
            image.save(jpg, format="JPEG", quality=90)
            sink.write({"__key__": f"{i // 100:016x}_{i % 100:07d}", "jpg": jpg.getvalue()})


def raw_decode(shards: list[Path], batch_size: int, stack: bool) -> Iterator[int]:
    """What any loader must do at least: read each JPEG and decode it to a float tensor.

    Yields a count per `batch_size` images, so that it is timed like the loader. With
    `stack` it also gathers them into a float batch, as a loader must: on machines where
    fresh memory is costly (VMs) that alone is a visible share of the time.
    """
    images = []
    for path in shards:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                    images.append(
                        torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255.0)
                    )
                    if len(images) == batch_size:
                        yield len(torch.stack(images) if stack else images)
                        images = []
    if images:
        yield len(images)


def timed_pass(batches: Iterable[int]) -> tuple[float, float]:
    """(images/s after the first batch, seconds to the first batch) of one pass.

    Starting workers is paid once per epoch; keeping it apart from the steady rate
    keeps a short benchmark epoch from hiding what a long one gets.
    """
    start = time.perf_counter()
    iterator = iter(batches)
    next(iterator)
    first = time.perf_counter()
    n = sum(iterator)
    return n / (time.perf_counter() - first), first - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=2000, help="frames to write")
    p.add_argument("--size", type=int, default=128, help="frame side in pixels")
    p.add_argument("--per-shard", type=int, default=250, help="frames per shard")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="passes per reader; the best is kept")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_frames(out, args.frames, args.size, args.per_shard)
        shards = sorted(out.glob("*.tar"))
        readers: dict[str, tuple[int, Callable[[], Iterable[int]]]] = {
            "raw tarfile + Pillow": (1, lambda: raw_decode(shards, args.batch_size, stack=False)),
            "raw, stacked into batches": (
                1,
                lambda: raw_decode(shards, args.batch_size, stack=True),
            ),
        }
        for workers in args.workers:
            loader = frame_loader(
                out, batch_size=args.batch_size, num_workers=workers, drop_last=False
            )
            readers[f"frame_loader workers={workers}"] = (
                max(1, workers),
                lambda loader=loader: (len(b["key"]) for b in loader),
            )
        # Round-robin over the readers, so that load from other processes hits them alike.
        passes = {name: [] for name in readers}
        for _ in range(args.repeats):
            for name, (_, batches) in readers.items():
                passes[name].append(timed_pass(batches()))

    print(
        f"{args.frames} frames of {args.size}x{args.size} in {len(shards)} shards, batch {args.batch_size}"
    )
    print(f"{'reader':<30}{'images/s':>10}{'per worker':>12}{'ratio':>8}{'first batch':>13}")
    raw = max(rate for rate, _ in passes["raw tarfile + Pillow"])
    for name, (workers, _) in readers.items():
        rate = max(r for r, _ in passes[name])
        startup = min(t for _, t in passes[name])
        per_worker = rate / workers
        print(
            f"{name:<30}{rate:>10.0f}{per_worker:>12.0f}{per_worker / raw:>8.2f}{startup * 1e3:>10.0f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
