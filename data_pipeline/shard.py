"""`catneuron shard INPUT... --out OUT`: videos to WebDataset frame shards, on a Ray cluster.

Before any worker starts, the driver checks what it can check in a second: that OUT
(a folder or any fsspec URL) can be written and holds no shards made with other
options, that `--address` answers, and that the inputs name at least one video, which
it counts (for the progress bar, and to size the groups: see `shard_groups`). Then it
reads the inputs a second time, lazily, cuts them into content-defined groups, and keeps
at most two tasks per worker in flight (`ray.wait`), so neither the input list nor the
results pile up. Each task (see `shard_task`) writes its group's shards itself; the
driver records each finished group in the manifest and, at the end, consolidates the
manifests (see `manifest` for the layout).

A video that makes no progress for `--video-timeout` seconds is stopped: its task is
cancelled (the worker killed) and the group runs again with that video recorded as
failed. A worker that dies (a decoder crash) gets the same treatment for the video it
was on. Interrupted runs resume: rerun the same command. Failed videos are remembered:
a rerun does not try them again unless `--retry-failed` says so.

Only the standard library is imported before the arguments are parsed, so `--help`
and usage errors answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from data_pipeline.cli_help import RawHelpFormatter

EPILOG = """\
exit status: 0 when every input is ok or skipped, 1 when any input failed (every other
input is still written; see manifest/videos.parquet for one-line reasons), 2 on a usage
error, 130 when interrupted (rerun the same command to resume).

examples:
  catneuron shard videos/ --out data/frames
  catneuron shard 'clips/**/*.mp4' list.txt table.parquet --out data/frames --fps 2 --size 128
  catneuron shard s3://bucket/videos --out s3://bucket/frames --address ray://head:10001 --fast
"""
MAX_CRASH_RETRIES = 2
_SHOWN_FAILURES = 20


class UsageError(Exception):
    """A mistake in the command, said in one line; exit status 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="catneuron shard",
        description=__doc__.splitlines()[0].split(": ", 1)[1],
        formatter_class=RawHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video, directory, glob, list file (one path or URL per line), or parquet/CSV "
                        "with a 'source' column; local or any fsspec URL")  # fmt: skip
    p.add_argument("--out", required=True,
                   help="output folder or fsspec URL (s3://bucket/prefix, gs://..., az://...): "
                        "shards/ and manifest/ go under it")  # fmt: skip
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
    shards.add_argument("--videos-per-task", type=int, default=None,
                        help="mean videos per group (one task, its own shards); none: from the input "
                             "count, about 8 groups per worker, at most 256, kept for reruns")  # fmt: skip
    shards.add_argument(
        "--overwrite", action="store_true", help="delete earlier output and start over"
    )
    shards.add_argument("--retry-failed", action="store_true",
                        help="try again the videos an earlier run recorded as failed (their groups are redone)")  # fmt: skip
    cluster = p.add_argument_group("cluster")
    cluster.add_argument(
        "--address",
        default=None,
        help="address of a running Ray cluster; none starts a local one (loopback only)",
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
        ("--videos-per-task, --threads, --shard-max-count, --num-workers must be >= 1",
         min(args.videos_per_task or 1, args.threads, args.shard_max_count, args.num_workers or 1) < 1),
    ]  # fmt: skip
    for message, failed in problems:
        if failed:
            p.error(message)
    return args


def shard_config(args: argparse.Namespace) -> Any:
    from data_pipeline.decode import DecodeOptions
    from data_pipeline.shard_task import ShardConfig
    from data_pipeline.storage import canonical_root

    decode = DecodeOptions(
        fps=args.fps, every=args.every, keyframes=args.keyframes, fast=args.fast,
        max_frames=args.max_frames, start=args.start, end=args.end, size=args.size or None,
        crop=args.crop, quality=args.quality, max_pixels=args.max_pixels, threads=args.threads,
    )  # fmt: skip
    return ShardConfig(canonical_root(args.out), decode, args.shard_max_bytes, args.shard_max_count)


@dataclass
class GroupJob:
    name: str
    sources: list[str]
    known_failures: dict[int, str] = field(default_factory=dict)
    crashes: int = 0
    stop_reason: str | None = None


def _megabytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e6:.2f} MB"


class Progress:
    """The tqdm bar (videos/s, frames/s, ETA) and the tallies of this run."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total, unit=" videos", dynamic_ncols=True, smoothing=0.1, disable=None
        )
        self.t0 = time.perf_counter()
        self.frames = self.done_before = self.failed_before = self.shown_failures = 0

    def advance(self, n_videos: int, n_frames: int = 0) -> None:
        self.frames += n_frames
        self.bar.set_postfix_str(
            f"{self.frames / (time.perf_counter() - self.t0):.1f} frames/s", refresh=False
        )
        self.bar.update(n_videos)

    def report_failures(self, rows: list[Any]) -> None:
        for row in rows:
            if row.status == "failed":
                self.shown_failures += 1
                if self.shown_failures <= _SHOWN_FAILURES:
                    self.bar.write(f"failed: {row.source}: {row.error}", file=sys.stderr)

    def summary(self, totals: Any, started: float) -> str:
        seconds = time.perf_counter() - started
        counts = ", ".join(f"{totals.statuses[s]} {s}" for s in ("ok", "failed", "skipped"))
        before = f"{self.done_before} done before"
        if self.failed_before:
            before += f", {self.failed_before} failed before and not retried (--retry-failed)"
        sizes = ""
        if totals.shard_bytes:
            median = sorted(totals.shard_bytes)[len(totals.shard_bytes) // 2]
            low, high = min(totals.shard_bytes), max(totals.shard_bytes)
            sizes = f" (median {_megabytes(median)}, {_megabytes(low)} to {_megabytes(high)})"
        return (
            f"sharded {sum(totals.statuses.values())} videos ({counts}; {before}), "
            f"{totals.n_frames} frames into {totals.n_shards} shards{sizes}, "
            f"{totals.n_bytes / 1e9:.2f} GB, in {seconds:.1f} s "
            f"({self.frames / max(seconds, 1e-9):.1f} frames/s this run)"
        )


class Driver:
    """Submits groups with back-pressure, watches for hung videos, records finished groups."""

    def __init__(self, args: argparse.Namespace, config: Any, manifest: Any, progress: Progress):
        import ray

        from data_pipeline.shard_task import shard_group

        self.ray = ray
        self.args, self.config, self.manifest, self.progress = args, config, manifest, progress
        self.store = manifest.store
        self.task = ray.remote(shard_group).options(
            num_cpus=args.threads, max_retries=args.retries, retry_exceptions=False
        )
        self.pending: dict[object, GroupJob] = {}
        self.group_names: list[str] = []
        self._stall_check_every = 1.0 if self.store.is_local else 5.0
        self._last_stall_check = 0.0

    def submit(self, job: GroupJob) -> None:
        self.store.remove(self.manifest.progress_file(job.name))
        ref = self.task.remote(job.name, job.sources, job.known_failures, self.config)
        self.pending[ref] = job

    def is_done(self, name: str) -> bool:
        """Done: recorded, and either all ok/skipped or failed videos that are not retried."""
        from data_pipeline.manifest import DONE_STATUSES

        statuses = self.manifest.done_statuses(name)
        if statuses is None:
            return False
        failed = sum(s not in DONE_STATUSES for s in statuses)
        if failed and self.args.retry_failed:
            return False
        self.progress.failed_before += failed
        return True

    def run(self, groups: Iterator[tuple[str, list[str]]], max_in_flight: int) -> None:
        """Shard every group not done before; `group_names` lists them all, in order."""
        while True:
            while len(self.pending) < max_in_flight and (item := next(groups, None)) is not None:
                name, sources = item
                self.group_names.append(name)
                if self.is_done(name):
                    self.progress.done_before += len(sources)
                    self.progress.advance(len(sources))
                else:
                    self.submit(GroupJob(name, sources))
            if not self.pending:
                return
            ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=1.0)
            for ref in ready:
                self.finish(ref, self.pending.pop(ref))
            self.stop_stalled()

    def finish(self, ref: object, job: GroupJob) -> None:
        from data_pipeline.shard_task import one_line

        try:
            result = self.ray.get(ref)
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
            return int(self.store.read_bytes(self.manifest.progress_file(job.name)))
        except (OSError, ValueError):
            return None

    def stop_stalled(self) -> None:
        now = time.time()
        if time.monotonic() - self._last_stall_check < self._stall_check_every:
            return
        self._last_stall_check = time.monotonic()
        for ref, job in self.pending.items():
            if job.stop_reason is not None:
                continue
            beat = self.store.mtime(self.manifest.progress_file(job.name))
            if beat is not None and now - beat > self.args.video_timeout:
                job.stop_reason = f"timed out: no frame decoded for {self.args.video_timeout:g} s"
                self.ray.cancel(ref, force=True)

    def record(self, job: GroupJob, videos: list, shards=(), error: str | None = None) -> None:
        from data_pipeline.manifest import VideoRow
        from data_pipeline.shard_writer import remove_shards
        from data_pipeline.sources import video_id

        if error is not None:
            videos = [VideoRow(s, video_id(s), "failed", error) for s in job.sources]
            remove_shards(self.store, job.name)
            shards = ()
        self.manifest.write_group(job.name, videos, list(shards))
        self.progress.report_failures(videos)
        self.progress.advance(len(videos), sum(v.n_frames for v in videos))


def count_inputs(inputs: list[str]) -> int:
    """How many videos the inputs name; a usage error when they name none."""
    from data_pipeline.sources import iter_sources

    try:
        n = sum(1 for _ in iter_sources(inputs))
    except (OSError, ValueError) as error:
        raise UsageError(_say(error)) from None
    if n == 0:
        names = " ".join(inputs)
        raise UsageError(
            f"{names}: names no video (empty folder or list, or a glob matching nothing)"
        )
    return n


def _say(error: BaseException) -> str:
    """An OSError as `file: problem`; anything else as its one-line message."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    from data_pipeline.shard_task import one_line

    return one_line(error) if not isinstance(error, ValueError) else " ".join(str(error).split())


def choose_group_size(saved: dict | None, asked: int | None, n_inputs: int, n_workers: int) -> int:
    from data_pipeline.shard_groups import auto_group_size

    recorded = (saved or {}).get("group_size")
    if asked is not None:
        if recorded is not None and recorded != asked:
            raise UsageError(
                f"the output was sharded with --videos-per-task {recorded}: pass --overwrite to "
                "start over, or leave the option out"
            )
        return asked
    return recorded or auto_group_size(n_inputs, n_workers)


def prepare_output(args: argparse.Namespace) -> tuple[Any, Any, dict, dict | None]:
    """(config, manifest, options, options saved earlier) once OUT is known to be writable."""
    from data_pipeline.manifest import Manifest
    from data_pipeline.storage import Store

    config = shard_config(args)
    manifest = Manifest(Store(config.out))
    options = {**asdict(config.decode), "shard_max_bytes": args.shard_max_bytes,
               "shard_max_count": args.shard_max_count}  # fmt: skip
    options.pop("threads")
    try:
        saved = manifest.prepare(options, args.overwrite)
    except OSError as error:
        raise UsageError(f"--out {_say(error)}") from None
    except ValueError as error:
        raise UsageError(_say(error)) from None
    if args.videos_per_task is not None:  # a clash is known before the cluster starts
        choose_group_size(saved, args.videos_per_task, 0, 1)
    return config, manifest, options, saved


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    config, manifest, options, saved = prepare_output(args)
    from data_pipeline.ray_cluster import RayAddressError, check_address, ray_session

    if args.address:
        try:
            check_address(args.address)
        except RayAddressError as error:
            raise UsageError(str(error)) from None
    n_inputs = count_inputs(args.inputs)
    local_workers = args.num_workers or os.cpu_count() or 1
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(ray_session(args.address, num_cpus=local_workers * args.threads))
        except Exception as error:  # Ray raises bare Exceptions when its processes do not start
            raise UsageError(f"cannot start or reach Ray: {_say(error)}") from None
        progress, stopped = None, []

        def on_sigterm(signum: int, _frame: object) -> None:  # the same path as Ctrl-C
            stopped.append(signum)
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            totals, progress = shard_all(args, config, manifest, options, saved, n_inputs)
        except KeyboardInterrupt:
            # no new work is handed out; a task's shard is renamed into place whole or not
            # at all, so leaving Ray (which ends the running tasks) loses nothing written
            name = "SIGTERM" if stopped else "interrupted"
            print(f"catneuron shard: {name}; rerun the same command to resume", file=sys.stderr)
            return 128 + (stopped[0] if stopped else signal.SIGINT)
        except (OSError, ValueError) as error:  # an input list that cannot be read, a full disk
            print(f"catneuron shard: {_say(error)}", file=sys.stderr)
            return 2
        finally:
            signal.signal(signal.SIGTERM, previous)
    print(progress.summary(totals, started))
    return 1 if totals.statuses["failed"] else 0


def shard_all(
    args: argparse.Namespace,
    config: Any,
    manifest: Any,
    options: dict,
    saved: dict | None,
    n_inputs: int,
) -> tuple[Any, Progress]:
    """The job itself, on a connected cluster: returns the consolidated totals."""
    import ray

    from data_pipeline.shard_groups import named_groups
    from data_pipeline.sources import iter_sources

    workers = args.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // args.threads)
    group_size = choose_group_size(saved, args.videos_per_task, n_inputs, workers)
    if saved is None or saved.get("group_size") != group_size:
        manifest.save_options({**options, "group_size": group_size})
    progress = Progress(n_inputs)
    try:
        driver = Driver(args, config, manifest, progress)
        driver.run(named_groups(iter_sources(args.inputs), group_size), 2 * workers)
        return manifest.consolidate(driver.group_names), progress
    finally:
        progress.bar.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UsageError as error:
        print(f"catneuron shard: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
