"""Frame shards for the GPU benchmark, written without video decoding.

    python -m bench.gpu_shards OUT_DIR [--frames 1536] [--size 256] [--per-shard 64]

The device machine has no PyAV and no Ray, and its minutes are too few to spend on
decoding, so `bench/make_device_kit.sh` writes the shards here and the device run
carries them. Frames are `data_pipeline.synth.render_still` pictures (the synthetic
clips' textures, shapes and planted cat faces), JPEG-encoded like `catneuron shard`
does, in its layout (`shards/frames-NNNNNN.tar` + `manifest/shards.parquet`) and its
sample format (`jpg` + `json`, keys `<video_id>_<frame_index:07d>`), through the same
writer, so the loader reads them exactly as it reads real shards.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data_pipeline.shard_writer import GroupShardWriter
from data_pipeline.storage import Store

FRAMES_PER_STILL_VIDEO = 16  # frames grouped under one video id, as a clip's frames are
MIN_DRAWN_SIDE = 96


def write_still_shards(
    out_dir: Path, *, frames: int, size: int, per_shard: int, seed: int = 0, quality: int = 90
) -> Path:
    """Write `frames` square stills of side `size` into shards of `per_shard`; returns `out_dir`.

    Built under `<out_dir>.tmp` and renamed when complete, so a half-written set is never
    taken for a finished one by a later run.
    """
    from data_pipeline.synth import render_still  # imports PyAV: only where shards are made

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = GroupShardWriter(Store(tmp), "frames", max_bytes=1 << 40, max_count=per_shard)
    for i in range(frames):
        video, index = divmod(i, FRAMES_PER_STILL_VIDEO)
        # Small sides leave a drawn face no room to move: draw at 96 px and shrink.
        side = max(size, MIN_DRAWN_SIDE)
        pixels, _ = render_still(side, side, seed * 1_000_003 + i, cat=i % 3 == 0)
        picture = Image.fromarray(pixels)
        if side != size:
            picture = picture.resize((size, size), Image.Resampling.BILINEAR)
        jpeg = io.BytesIO()
        picture.save(jpeg, format="JPEG", quality=quality)
        video_id = f"{seed:08x}{video:08x}"
        meta = {
            "video_id": video_id,
            "source": f"still:{seed}:{video}",
            "frame_index": index,
            "pts": float(index),
            "width": size,
            "height": size,
            "src_width": size,
            "src_height": size,
            "fps": 1.0,
        }
        writer.write(
            {
                "__key__": f"{video_id}_{index:07d}",
                "jpg": jpeg.getvalue(),
                "json": json.dumps(meta, sort_keys=True).encode(),
            }
        )
    records = writer.close()
    (tmp / "manifest").mkdir(parents=True)
    table = pa.Table.from_pylist([asdict(r) for r in records])
    pq.write_table(table, tmp / "manifest" / "shards.parquet")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_shards",
        description="Write still-frame shards for bench/gpu.sh (no video decoding).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("out", type=Path, help="output directory (replaced)")
    parser.add_argument("--frames", type=int, default=1536, help="frames in all")
    parser.add_argument("--size", type=int, default=256, help="side of each square frame")
    parser.add_argument("--per-shard", type=int, default=64, help="frames per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pictures")
    args = parser.parse_args(argv)
    if args.frames < 1 or args.size < 8 or args.per_shard < 1:
        print(
            "python -m bench.gpu_shards: --frames, --size, --per-shard too small", file=sys.stderr
        )
        return 2
    write_still_shards(
        args.out, frames=args.frames, size=args.size, per_shard=args.per_shard, seed=args.seed
    )
    n_bytes = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{args.out}: {args.frames} frames of {args.size}px, {n_bytes / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
