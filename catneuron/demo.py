"""`catneuron demo`: the whole flow at laptop scale, on videos it makes itself.

It runs the same subcommands a user would, through their own `main`, so the demo can
never drift from the real commands. Until training and evals land it covers what
exists: synthesize sample videos with a planted cat face, then shard them on a local
Ray cluster.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from data_pipeline import shard, synth


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="catneuron demo",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("demo"), help="working directory of the demo")
    p.add_argument("--videos", type=int, default=12, help="how many sample videos to synthesize")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic videos")
    p.add_argument("--fps", type=float, default=2.0, help="frames sampled per second of video")
    p.add_argument("--size", type=int, default=64, help="shorter side of the stored frames")
    p.add_argument("--num-workers", type=int, default=2, help="Ray workers for sharding")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    videos, shards = args.out / "videos", args.out / "shards"
    t0 = time.perf_counter()
    print(f"[1/2] synthesizing {args.videos} sample videos into {videos}")
    rc = synth.main(["--out", str(videos), "--videos", str(args.videos), "--seed", str(args.seed)])
    if rc:
        return rc
    print(f"[2/2] sharding them into {shards}")
    rc = shard.main(
        [str(videos), "--out", str(shards), "--fps", str(args.fps), "--size", str(args.size),
         "--num-workers", str(args.num_workers)]
    )
    print(
        f"demo done in {time.perf_counter() - t0:.0f} s: videos and labels.parquet in {videos}, "
        f"shards and manifests in {shards}"
    )
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
