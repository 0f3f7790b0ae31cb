"""`catneuron shard` throughput against its floor and against what a user would do instead.

On generated H.264 clips (30 fps, a key frame every 2 s, like phone video) at 360p, 720p
and 1080p, prints frames/s of:
  (a) the floor: a bare PyAV loop on one core that decodes, resizes and JPEG-encodes the
      same frames, with nothing around it;
  (b) `catneuron shard` with 1 worker, also with --fast and --keyframes;
  (c) `catneuron shard` with 2 workers;
  (d) `ffmpeg -vf fps=1,scale` to JPEG files on one core, then `tar` (if ffmpeg is installed);
at --fps 1 and at every frame, with the ratios b/a (target >= 0.9), c/b (>= 1.8 on 2
free cores), fast/d at 1 fps (>= 2), and the peak RSS of the Ray worker.

    python bench/shard.py --seconds 20 --copies 6

Ray and its workers start before any clock does: the figures are steady-state rates.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import av
import pyarrow.parquet as pq
import ray

from data_pipeline import synth
from data_pipeline.shard import main as shard_main

RATE = 30
SIZE = 256
MODES = {"1 fps": ["--fps", "1"], "every frame": ["--every", "1"]}
EXTRA_MODES = {"fast 1 fps": ["--fast"], "keyframes": ["--keyframes"]}


def make_clips(folder: Path, height: int, seconds: float, copies: int) -> list[Path]:
    """`copies` files of one clip (distinct paths, so distinct video ids)."""
    width = round(height * 16 / 9 / 2) * 2
    folder.mkdir(parents=True, exist_ok=True)
    first = folder / f"clip{height}_0.mp4"
    synth.write_clip(
        first, width=width, height=height, fps=RATE, seconds=seconds, seed=height, gop=2 * RATE
    )
    paths = [first]
    for k in range(1, copies):
        paths.append(shutil.copyfile(first, folder / f"clip{height}_{k}.mp4"))
    return paths


def floor_rate(clip: Path, step: int, size: int) -> float:
    """(a): decode on one thread, resize in libswscale, encode with Pillow; nothing else."""
    start, n_frames = time.perf_counter(), 0
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        width = round(stream.codec_context.width * size / stream.codec_context.height)
        for k, frame in enumerate(container.decode(stream)):
            if k % step == 0:
                image = frame.reformat(
                    width=width, height=size, format="rgb24", interpolation="BILINEAR"
                )
                image.to_image().save(io.BytesIO(), format="JPEG", quality=90)
                n_frames += 1
    return n_frames / (time.perf_counter() - start)


@ray.remote(num_cpus=1)
def worker_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def shard_rate(clips: list[Path], out: Path, workers: int, args: list[str]) -> float:
    """(b)/(c): the real command, in this process, on a Ray cluster of `workers` CPUs."""
    command = [*map(str, clips), "--out", str(out), "--overwrite", "--num-workers", str(workers)]
    command += ["--videos-per-task", "1", "--size", str(SIZE), *args]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        assert shard_main(command) == 0
    seconds = time.perf_counter() - start
    return (
        sum(pq.read_table(out / "manifest" / "shards.parquet")["n_samples"].to_pylist()) / seconds
    )


def ffmpeg_rate(clips: list[Path], out: Path, every_frame: bool) -> float | None:
    """(d): what a user would script instead: ffmpeg to JPEG files, then one tar of them."""
    if shutil.which("ffmpeg") is None:
        return None
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    scale = f"scale=-2:{SIZE}" if every_frame else f"fps=1,scale=-2:{SIZE}"
    start = time.perf_counter()
    for clip in clips:
        subprocess.run(
            ["ffmpeg", "-v", "error", "-threads", "1", "-filter_threads", "1", "-i", str(clip),
             "-vf", scale, "-q:v", "3", str(out / f"{clip.stem}_%06d.jpg")],
            check=True,
        )  # fmt: skip
    subprocess.run(["tar", "cf", str(out.with_suffix(".tar")), "-C", str(out), "."], check=True)
    return len(list(out.glob("*.jpg"))) / (time.perf_counter() - start)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0, help="length of each clip")
    p.add_argument("--copies", type=int, default=6, help="clips per resolution (tasks to spread)")
    p.add_argument("--heights", type=int, nargs="+", default=[360, 720, 1080])
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-shard-"))
    clips = {h: make_clips(work / "clips", h, args.seconds, args.copies) for h in args.heights}
    rates: dict[tuple[int, str, str], float | None] = {}
    for h, paths in clips.items():
        for mode in MODES:
            every_frame = mode == "every frame"
            rates[h, mode, "a"] = floor_rate(paths[0], 1 if every_frame else RATE, SIZE)
            rates[h, mode, "d"] = ffmpeg_rate(paths, work / "ffmpeg", every_frame)
    peak_rss = {}
    for workers in (1, 2):
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        warm_up = clips[args.heights[0]][
            :workers
        ]  # workers import PyAV etc. before any clock starts
        shard_rate(warm_up, work / "out", workers, ["--max-frames", "1"])
        runs = {**MODES, **(EXTRA_MODES if workers == 1 else {})}
        for h, paths in clips.items():
            for mode, flags in runs.items():
                rates[h, mode, "bc"[workers - 1]] = shard_rate(paths, work / "out", workers, flags)
            if workers == 1:
                peak_rss[h] = ray.get(worker_peak_rss.remote())
        ray.shutdown()

    print(
        f"frames/s; {args.copies} x {args.seconds:g} s clips per input, {RATE} fps, resized to {SIZE} px"
    )
    print(f"{'input':>6} {'mode':>12} {'(a) floor':>10} {'(b) 1 wkr':>10} {'(c) 2 wkr':>10} "
          f"{'(d) ffmpeg':>10} {'b/a':>5} {'c/b':>5} {'b/d':>5}")  # fmt: skip
    for h in clips:
        for mode in [*MODES, *EXTRA_MODES]:
            a, b, c, d = (rates.get((h, mode, k)) for k in "abcd")
            d = rates[h, "1 fps", "d"] if mode in EXTRA_MODES else d
            cells = " ".join(f"{x:10.1f}" if x else f"{'':>10}" for x in (a, b, c, d))
            print(f"{h:>5}p {mode:>12} {cells} {ratio(b, a):>5} {ratio(c, b):>5} {ratio(b, d):>5}")
    print("targets: b/a >= 0.9, c/b >= 1.8 (2 free cores), fast 1 fps b/d >= 2")
    rss = ", ".join(f"{h}p {r / 2**30:.2f} GB" for h, r in peak_rss.items())
    print(f"peak RSS of the 1-worker Ray worker: {rss}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
