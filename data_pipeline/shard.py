"""`catneuron shard INPUT... --out DIR`: videos to WebDataset frame shards, on a Ray cluster.

The driver reads the inputs lazily, cuts them into groups of `--videos-per-task`
consecutive videos, and keeps at most two tasks per worker in flight (`ray.wait`), so
neither the input list nor the results pile up. Each task (see `shard_task`) writes its
group's shards itself; the driver records each finished group in the manifest and, at
the end, consolidates the manifests (see `manifest` for the layout).

A video that makes no progress for `--video-timeout` seconds is stopped: its task is
cancelled (the worker killed) and the group runs again with that video recorded as
failed. A worker that dies (a decoder crash) gets the same treatment for the video it
was on. Interrupted runs resume: rerun the same command.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from data_pipeline.decode import DecodeOptions
from data_pipeline.manifest import Manifest, Totals, VideoRow, group_name
from data_pipeline.shard_task import GroupResult, ShardConfig, one_line, shard_group
from data_pipeline.shard_writer import remove_shards
from data_pipeline.sources import iter_sources, video_id

EPILOG = """\
exit status: 0 when every input is ok or skipped, 1 when any input failed (every other
input is still written; see manifest/videos.parquet for one-line reasons), 2 on a usage
error, 130 when interrupted (rerun the same command to resume).

examples:
  catneuron shard videos/ --out data/frames
  catneuron shard 'clips/**/*.mp4' list.txt table.parquet --out data/frames --fps 2 --size 128
  catneuron shard s3://bucket/videos --out /shared/frames --address ray://head:10001 --fast
"""
MAX_CRASH_RETRIES = 2
_SHOWN_FAILURES = 20


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option with its default, and the epilog's lines kept as written."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="catneuron shard",
        description=__doc__.splitlines()[0].split(": ", 1)[1],
        formatter_class=HelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video, directory, glob, list file (one path or URL per line), or parquet/CSV "
                        "with a 'source' column; local or any fsspec URL")  # fmt: skip
    p.add_argument(
        "--out", type=Path, required=True, help="output directory (shards/ and manifest/)"
    )
    sampling = p.add_argument_group("sampling")
    sampling.add_argument(
        "--fps", type=float, default=1.0, help="frames per second, at times start + k/fps"
    )
    sampling.add_argument(
        "--every", type=int, default=None, help="take every N-th frame instead of --fps"
    )
    sampling.add_argument("--keyframes", action="store_true", help="decode key frames only")
    sampling.add_argument("--fast", action="store_true",
                          help="skip non-reference frames and most deblocking; take the nearest decodable frame")  # fmt: skip
    sampling.add_argument(
        "--max-frames", type=int, default=None, help="at most this many frames per video"
    )
    sampling.add_argument(
        "--start", type=float, default=0.0, help="seconds into each video to start at"
    )
    sampling.add_argument(
        "--end", type=float, default=None, help="seconds into each video to stop at"
    )
    image = p.add_argument_group("frames")
    image.add_argument(
        "--size", type=int, default=256, help="shorter side in pixels (0: keep the source size)"
    )
    image.add_argument(
        "--crop", choices=("none", "center"), default="none", help="center-crop to size x size"
    )
    image.add_argument("--quality", type=int, default=90, help="JPEG quality (1-95)")
    image.add_argument("--max-pixels", type=int, default=7680 * 4320,
                       help="refuse videos with more pixels per frame than this")  # fmt: skip
    shards = p.add_argument_group("shards")
    shards.add_argument(
        "--shard-max-bytes", type=int, default=256 * 2**20, help="bytes of frames per shard"
    )
    shards.add_argument("--shard-max-count", type=int, default=10_000, help="frames per shard")
    shards.add_argument("--videos-per-task", type=int, default=16,
                        help="consecutive videos one task shards; each task writes its own shards")  # fmt: skip
    shards.add_argument(
        "--overwrite", action="store_true", help="delete earlier output and start over"
    )
    cluster = p.add_argument_group("cluster")
    cluster.add_argument(
        "--address",
        default=None,
        help="address of a running Ray cluster; none starts a local one",
    )
    cluster.add_argument("--num-workers", type=int, default=None,
                         help="concurrent tasks; none means the cluster's CPUs / --threads")  # fmt: skip
    cluster.add_argument(
        "--threads", type=int, default=1, help="decoder threads (and CPUs) per task"
    )
    cluster.add_argument("--video-timeout", type=float, default=300.0,
                         help="seconds a video may go without decoding a frame before it is stopped")  # fmt: skip
    cluster.add_argument(
        "--retries", type=int, default=2, help="Ray retries of a task whose worker died"
    )
    args = p.parse_args(argv)
    problems = [
        ("--fps must be > 0", args.fps <= 0),
        ("--every must be >= 1", args.every is not None and args.every < 1),
        ("--size must be >= 0", args.size < 0),
        ("--quality must be in 1..95", not 1 <= args.quality <= 95),
        ("--start must be >= 0", args.start < 0),
        ("--end must be > --start", args.end is not None and args.end <= args.start),
        ("--keyframes and --fast exclude each other", args.keyframes and args.fast),
        ("--crop center needs --size > 0", args.crop == "center" and not args.size),
        ("--videos-per-task, --threads, --shard-max-count must be >= 1",
         min(args.videos_per_task, args.threads, args.shard_max_count) < 1),
    ]  # fmt: skip
    for message, failed in problems:
        if failed:
            p.error(message)
    return args


def shard_config(args: argparse.Namespace) -> ShardConfig:
    decode = DecodeOptions(
        fps=args.fps, every=args.every, keyframes=args.keyframes, fast=args.fast,
        max_frames=args.max_frames, start=args.start, end=args.end, size=args.size or None,
        crop=args.crop, quality=args.quality, max_pixels=args.max_pixels, threads=args.threads,
    )  # fmt: skip
    return ShardConfig(str(args.out.resolve()), decode, args.shard_max_bytes, args.shard_max_count)


def chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


@dataclass
class GroupJob:
    group: int
    sources: list[str]
    known_failures: dict[int, str] = field(default_factory=dict)
    crashes: int = 0
    stop_reason: str | None = None


class Progress:
    """The tqdm bar (videos/s, frames/s, ETA) and the tallies of this run."""

    def __init__(self, inputs: list[str]) -> None:
        self.bar = tqdm(unit=" videos", dynamic_ncols=True, smoothing=0.1, disable=None)
        self.t0 = time.perf_counter()
        self.frames = self.done_before = self.shown_failures = 0
        self._total: list[int] = []
        threading.Thread(target=self._count, args=(inputs,), daemon=True).start()

    def _count(self, inputs: list[str]) -> None:
        """A second, lazy pass over the inputs, only for the ETA; the bar runs without it meanwhile."""
        with contextlib.suppress(Exception):  # an unreadable input is reported by the sharding pass
            self._total.append(sum(1 for _ in iter_sources(inputs)))

    def advance(self, n_videos: int, n_frames: int = 0) -> None:
        if self._total and self.bar.total is None:
            self.bar.total = self._total[0]
        self.frames += n_frames
        self.bar.set_postfix_str(
            f"{self.frames / (time.perf_counter() - self.t0):.1f} frames/s", refresh=False
        )
        self.bar.update(n_videos)

    def report_failures(self, rows: list[VideoRow]) -> None:
        for row in rows:
            if row.status == "failed":
                self.shown_failures += 1
                if self.shown_failures <= _SHOWN_FAILURES:
                    self.bar.write(f"failed: {row.source}: {row.error}", file=sys.stderr)

    def summary(self, totals: Totals) -> str:
        seconds = time.perf_counter() - self.t0
        counts = ", ".join(f"{totals.statuses[s]} {s}" for s in ("ok", "failed", "skipped"))
        return (
            f"sharded {sum(totals.statuses.values())} videos ({counts}; {self.done_before} done before), "
            f"{totals.n_frames} frames into {totals.n_shards} shards, {totals.n_bytes / 1e9:.2f} GB, "
            f"in {seconds:.1f} s ({self.frames / seconds:.1f} frames/s this run)"
        )


class Driver:
    """Submits groups with back-pressure, watches for hung videos, records finished groups."""

    def __init__(
        self, args: argparse.Namespace, config: ShardConfig, manifest: Manifest, progress: Progress
    ):
        import ray

        self.ray = ray
        self.args, self.config, self.manifest, self.progress = args, config, manifest, progress
        self.task = ray.remote(shard_group).options(
            num_cpus=args.threads, max_retries=args.retries, retry_exceptions=False
        )
        self.pending: dict[object, GroupJob] = {}

    def submit(self, job: GroupJob) -> None:
        self.manifest.progress_file(job.group).unlink(missing_ok=True)
        self.pending[self.task.remote(job.group, job.sources, job.known_failures, self.config)] = (
            job
        )

    def run(self, groups: Iterator[list[str]], max_in_flight: int) -> int:
        """Shard every group; return how many groups the input held."""
        numbered = enumerate(groups)
        n_groups = 0
        while True:
            while len(self.pending) < max_in_flight and (item := next(numbered, None)) is not None:
                n_groups = item[0] + 1
                if self.manifest.group_is_done(*item):
                    self.progress.done_before += len(item[1])
                    self.progress.advance(len(item[1]))
                else:
                    self.submit(GroupJob(*item))
            if not self.pending:
                return n_groups
            ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=1.0)
            for ref in ready:
                self.finish(ref, self.pending.pop(ref))
            self.stop_stalled()

    def finish(self, ref: object, job: GroupJob) -> None:
        try:
            result: GroupResult = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as error:  # the task itself failed, e.g. disk full
            self.record(job, [], error=f"task failed: {one_line(error.cause or error)}")
        except self.ray.exceptions.RayError as error:  # worker killed or crashed, node lost
            reason = job.stop_reason or f"its worker died ({type(error).__name__})"
            self.retry_without_current_video(job, reason)
        else:
            self.record(job, result.videos, shards=result.shards)

    def retry_without_current_video(self, job: GroupJob, reason: str) -> None:
        position = self.current_position(job)
        if position is None:
            job.crashes += 1
            if job.crashes > MAX_CRASH_RETRIES:
                self.record(job, [], error=reason)
                return
        else:
            job.known_failures[position] = reason
        job.stop_reason = None
        self.submit(job)

    def current_position(self, job: GroupJob) -> int | None:
        try:
            return int(self.manifest.progress_file(job.group).read_text())
        except (OSError, ValueError):
            return None

    def stop_stalled(self) -> None:
        now = time.time()
        for ref, job in self.pending.items():
            if job.stop_reason is not None:
                continue
            try:
                idle = now - self.manifest.progress_file(job.group).stat().st_mtime
            except FileNotFoundError:
                continue
            if idle > self.args.video_timeout:
                job.stop_reason = f"timed out: no frame decoded for {self.args.video_timeout:g} s"
                self.ray.cancel(ref, force=True)

    def record(
        self, job: GroupJob, videos: list[VideoRow], shards=(), error: str | None = None
    ) -> None:
        if error is not None:
            videos = [VideoRow(s, video_id(s), "failed", error) for s in job.sources]
            remove_shards(self.manifest.shard_dir, group_name(job.group))
        self.manifest.write_group(job.group, videos, list(shards))
        self.progress.report_failures(videos)
        self.progress.advance(len(videos), sum(v.n_frames for v in videos))


def connect(args: argparse.Namespace) -> bool:
    """Join `--address` or start a local cluster; True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if args.address:
        ray.init(address=args.address, **quiet)
    else:
        workers = args.num_workers or os.cpu_count() or 1
        ray.init(
            address="local",
            num_cpus=workers * args.threads,
            object_store_memory=200 * 2**20,
            **quiet,
        )
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = shard_config(args)
    manifest = Manifest(args.out)
    options = {**asdict(config.decode), "shard_max_bytes": args.shard_max_bytes,
               "shard_max_count": args.shard_max_count, "videos_per_task": args.videos_per_task}  # fmt: skip
    options.pop("threads")
    try:
        manifest.prepare(options, args.overwrite)
    except (OSError, ValueError) as error:
        print(f"catneuron shard: {one_line(error)}", file=sys.stderr)
        return 2
    import ray

    progress = Progress(args.inputs)
    try:
        started = connect(args)
    except (ConnectionError, RuntimeError, ValueError) as error:
        progress.bar.close()
        print(f"catneuron shard: cannot start or reach Ray: {one_line(error)}", file=sys.stderr)
        return 2
    try:
        workers = args.num_workers or max(
            1, int(ray.cluster_resources().get("CPU", 1)) // args.threads
        )
        driver = Driver(args, config, manifest, progress)
        n_groups = driver.run(chunks(iter_sources(args.inputs), args.videos_per_task), 2 * workers)
        totals = manifest.consolidate(n_groups)
    except KeyboardInterrupt:
        progress.bar.close()
        print("catneuron shard: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (OSError, ValueError) as error:  # an input list that cannot be read, an unwritable --out
        progress.bar.close()
        print(f"catneuron shard: {one_line(error)}", file=sys.stderr)
        return 2
    finally:
        if started:
            ray.shutdown()
    progress.bar.close()
    print(progress.summary(totals))
    return 1 if totals.statuses["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
