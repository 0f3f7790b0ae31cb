"""`catneuron shard` against what a user does today, timed as the user waits for it.

What a user scripts instead: `ffmpeg -threads 1 -vf fps=1,scale=...` on W videos at a
time (W = the number of workers), JPEG files into a folder, then one `tar`. Against it:
`catneuron shard --num-workers W`, exact sampling, `--fast` and `--keyframes`, each a
fresh command into a fresh output. Every figure is wall time from the command's start
to its exit: Ray's start and stop, imports, worker starts, manifests, everything.

Inputs: the issue's job, 24 clips of 75 s (30 minutes of video) in three classes, 720p
(1280x720), 272p (480x272) and 144p (256x144): `catneuron synth` clips scaled to each class
by ffmpeg (libx264, x264's `veryfast` preset as synth uses), copied under distinct names to
reach --videos files (copies decode exactly as the originals do; they only save the
generation time). `--seconds 10` gives the shorter job of earlier figures.

    python bench/shard.py --videos 24 --workers 2

Also printed: the fixed cost (one 2-frame clip, wall) and `catneuron shard --help`.
Targets: exact >= 0.9x ffmpeg, --fast >= 1.3x, fixed cost <= 5 s, --help < 0.5 s.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CATNEURON = [sys.executable, "-m", "catneuron"]
SIZE = 256
CLASSES = {"720p": (1280, 720), "272p": (480, 272), "144p": (256, 144)}


def make_videos(folder: Path, n_videos: int, seconds: float) -> list[Path]:
    """Two synth clips per size class, copied round-robin to `n_videos` files."""
    originals: list[Path] = []
    for k, (name, (width, height)) in enumerate(CLASSES.items()):
        out = folder / "synth" / name
        subprocess.run(
            [*CATNEURON, "synth", "--out", str(out), "--videos", "2", "--seed", str(k),
             "--min-size", "160", "--max-size", "192", "--min-seconds", str(seconds),
             "--max-seconds", str(seconds), "--fps-choices", "25,30"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        for clip in sorted(out.glob("*.mp4")):
            scaled = clip.with_name(f"{clip.stem}_{name}.mp4")
            subprocess.run(
                ["ffmpeg", "-v", "error", "-i", str(clip), "-vf", f"scale={width}:{height}",
                 "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p",
                 str(scaled)],
                check=True,
            )  # fmt: skip
            originals.append(scaled)
    videos = folder / "videos"
    videos.mkdir()
    paths = []
    for k in range(n_videos):
        source = originals[k % len(originals)]
        paths.append(Path(shutil.copyfile(source, videos / f"v{k:03d}_{source.parent.name}.mp4")))
    return paths


ENV = dict(os.environ)
"""The commands' environment: one-shot runs get a cluster record that does not exist, so
they never join a `catneuron cluster up` head by accident; `--cluster` runs name theirs."""


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV
    )
    return time.perf_counter() - start


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def ffmpeg_then_tar(videos: list[Path], out: Path, workers: int) -> tuple[float, int]:
    """(wall seconds, frames): ffmpeg on `workers` videos at a time, then one tar."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shorter_side = f"scale='if(gt(iw,ih),-2,{SIZE})':'if(gt(iw,ih),{SIZE},-2)'"

    def one(video: Path) -> None:
        subprocess.run(
            ["ffmpeg", "-v", "error", "-threads", "1", "-filter_threads", "1", "-i", str(video),
             "-vf", f"fps=1,{shorter_side}", "-q:v", "3", str(out / f"{video.stem}_%06d.jpg")],
            check=True,
        )  # fmt: skip

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, videos))
    subprocess.run(["tar", "cf", str(out.with_suffix(".tar")), "-C", str(out), "."], check=True)
    seconds = time.perf_counter() - start
    return seconds, len(list(out.glob("*.jpg")))


def catneuron_shard(folder: Path, out: Path, workers: int, flags: list[str]) -> tuple[float, int]:
    """(wall seconds, frames) of one fresh `catneuron shard` command."""
    import pyarrow.parquet as pq

    shutil.rmtree(out, ignore_errors=True)
    command = [*CATNEURON, "shard", str(folder), "--out", str(out), "--num-workers",
               str(workers), "--size", str(SIZE), "--fps", "1", *flags]  # fmt: skip
    seconds = timed(command)
    frames = sum(pq.read_table(out / "manifest" / "shards.parquet")["n_samples"].to_pylist())
    return seconds, frames


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=24, help="input files (>= 20 for the targets)")
    p.add_argument("--seconds", type=float, default=75.0, help="length of each clip")
    p.add_argument("--workers", type=int, default=2, help="ffmpeg processes / shard workers")
    p.add_argument("--repeats", type=int, default=1, help="runs of each command (median shown)")
    p.add_argument(
        "--cluster", action="store_true",
        help="also run exact, --fast and the tiny clip on a `catneuron cluster up` head",
    )  # fmt: skip
    p.add_argument("--only", default=None, help="comma-separated names of the runs to do")
    args = p.parse_args()
    if shutil.which("ffmpeg") is None:
        raise SystemExit("bench/shard.py: ffmpeg is not installed")
    work = Path(tempfile.mkdtemp(prefix="bench-shard-"))
    ENV["CATNEURON_CLUSTER_FILE"] = str(work / "no-cluster.json")
    ENV.pop("CATNEURON_RAY_ADDRESS", None)
    print(f"load average before: {load()}")
    try:
        videos = make_videos(work, args.videos, args.seconds)
        runs = {
            "ffmpeg + tar": lambda: ffmpeg_then_tar(videos, work / "ffmpeg", args.workers),
            "shard (exact)": lambda: catneuron_shard(videos[0].parent, work / "o", args.workers, []),
            "shard --fast": lambda: catneuron_shard(videos[0].parent, work / "o", args.workers, ["--fast"]),
            "shard --keyframes": lambda: catneuron_shard(
                videos[0].parent, work / "o", args.workers, ["--keyframes"]
            ),
        }  # fmt: skip
        if args.only:
            runs = {
                k: v for k, v in runs.items() if k in args.only.split(",") or k == "ffmpeg + tar"
            }
        results = {}
        for name, run in runs.items():
            measured = [run() for _ in range(args.repeats)]
            results[name] = (statistics.median(s for s, _ in measured), measured[-1][1])
        tiny = work / "tiny"
        subprocess.run([*CATNEURON, "synth", "--out", str(tiny), "--videos", "1", "--min-size",
                        "64", "--max-size", "64", "--min-seconds", "0.2", "--max-seconds", "0.2",
                        "--fps-choices", "10"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        fixed = statistics.median(
            timed([*CATNEURON, "shard", str(tiny), "--out", str(work / f"t{k}"), "--fps", "5"])
            for k in range(args.repeats)
        )
        help_s = min(timed([*CATNEURON, "shard", "--help"]) for _ in range(3))
        on_cluster: dict[str, float] = {}
        if args.cluster:
            ENV["CATNEURON_CLUSTER_FILE"] = str(work / "cluster.json")
            up = [*CATNEURON, "cluster", "up", "--num-cpus", str(os.cpu_count() or 1)]
            up_s = timed(up)
            try:
                folder = videos[0].parent
                for name, flags in (("cluster: exact", []), ("cluster: --fast", ["--fast"])):
                    measured = [catneuron_shard(folder, work / "o", args.workers, flags)
                                for _ in range(args.repeats)]  # fmt: skip
                    results[name] = (statistics.median(s for s, _ in measured), measured[-1][1])
                on_cluster["tiny"] = statistics.median(
                    timed([*CATNEURON, "shard", str(tiny), "--out", str(work / f"c{k}"), "--fps", "5"])
                    for k in range(args.repeats)
                )  # fmt: skip
                on_cluster["up"] = up_s
            finally:
                timed([*CATNEURON, "cluster", "down"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = results["ffmpeg + tar"][0]
    print(f"{args.videos} videos ({', '.join(CLASSES)} classes, {args.seconds:g} s each), "
          f"1 fps to {SIZE} px, {args.workers} workers; wall time, command start to exit")  # fmt: skip
    print(f"{'command':<18} {'seconds':>8} {'frames':>7} {'vs ffmpeg':>10}")
    for name, (seconds, frames) in results.items():
        print(f"{name:<18} {seconds:8.1f} {frames:7d} {base / seconds:9.2f}x")
    print(f"fixed cost (one 2-frame clip): {fixed:.1f} s; catneuron shard --help: {help_s:.2f} s")
    if on_cluster:
        print(f"on a running cluster (catneuron cluster up: {on_cluster['up']:.1f} s, once): "
              f"one 2-frame clip {on_cluster['tiny']:.1f} s")  # fmt: skip
    print(f"load average after: {load()}")
    print("targets: exact >= 0.9x, --fast >= 1.3x, fixed cost <= 5 s, --help < 0.5 s; "
          "on a running cluster: exact >= 1.0x")  # fmt: skip


if __name__ == "__main__":
    main()
