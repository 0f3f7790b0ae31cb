"""`catneuron demo`: the whole flow at laptop scale, on videos it makes itself.

It runs the same subcommands a user would, through their own `main`, so the demo can
never drift from the real commands. Until the evals land it covers what exists:
synthesize sample videos with a planted cat face, shard them on a local Ray cluster,
then pretrain the tiny convolutional autoencoder on two ranks through the DeepSpeed
launcher (CPU ranks with gloo where there is no GPU) and export it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from data_pipeline import shard, synth
from pretrain import launch

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "conv_ae.yaml"


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
    p.add_argument("--ranks", type=int, default=2, help="training ranks (GPUs, or CPU ranks)")
    p.add_argument("--steps", type=int, default=40, help="training steps; 0 skips training")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    videos, shards = args.out / "videos", args.out / "shards"
    t0 = time.perf_counter()
    n = 3 if args.steps > 0 else 2
    print(f"[1/{n}] synthesizing {args.videos} sample videos into {videos}")
    rc = synth.main(["--out", str(videos), "--videos", str(args.videos), "--seed", str(args.seed)])
    if rc:
        return rc
    print(f"[2/{n}] sharding them into {shards}")
    rc = shard.main(
        [
            str(videos),
            "--out",
            str(shards),
            "--fps",
            str(args.fps),
            "--size",
            str(args.size),
            "--num-workers",
            str(args.num_workers),
        ]
    )
    if rc:
        return rc
    runs = args.out / "runs"
    if args.steps > 0:
        print(f"[3/3] pretraining the tiny conv_ae on {args.ranks} ranks into {runs}/conv_ae_tiny")
        rc = launch.main(
            [
                str(TINY_CONFIG),
                f"data.source={shards}",
                f"run.output_dir={runs}",
                f"stages.steps={args.steps}",
                f"checkpoint.every={args.steps}",
                "--num-gpus",
                str(args.ranks),
            ]
        )
    print(
        f"demo done in {time.perf_counter() - t0:.0f} s: videos and labels.parquet in {videos}, "
        f"shards and manifests in {shards}"
        + (
            f", TensorBoard, checkpoints and exports in {runs} (tensorboard --logdir {runs})"
            if args.steps > 0
            else ""
        )
    )
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
