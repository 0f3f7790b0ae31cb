"""The worker side of `catneuron shard`: one group of videos to finished shards.

A group is a run of consecutive inputs; one Ray task decodes, encodes and writes all of
it, so frames never cross the object store and only the group's manifest rows go back
to the driver. The task first deletes whatever an earlier, unfinished attempt left of
the group, which makes a retried or resumed group byte-identical to an uninterrupted one.

What a worker imports is kept to PyAV, Pillow and the standard library (fsspec for
URLs): no torch, no webdataset, no pyarrow. A worker's start is part of every job's
fixed cost.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

from data_pipeline.decode import DecodeOptions, EncodedFrame, VideoError, decode_frames
from data_pipeline.manifest import Manifest, VideoRow
from data_pipeline.shard_writer import GroupShardWriter, ShardRecord, remove_shards
from data_pipeline.sources import video_id
from data_pipeline.storage import Store


@dataclass(frozen=True)
class ShardConfig:
    """Everything a task needs besides its group; also what decides keys and shard bytes."""

    out: str  # local path or fsspec URL of the output root
    decode: DecodeOptions
    shard_max_bytes: int
    shard_max_count: int


@dataclass(frozen=True)
class GroupResult:
    group: str
    videos: list[VideoRow]
    shards: list[ShardRecord]


def one_line(error: BaseException) -> str:
    """An exception as the single line a manifest row or a log line can hold."""
    text = " ".join(str(error).split())
    if isinstance(error, VideoError):  # already the reason, worded for the manifest
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class Heartbeat:
    """A file the driver watches: its text says which video the task is on, its mtime
    when a frame was last decoded. Touched at most once a second on a local output, once
    every 10 s on an object store (each touch is a PUT)."""

    def __init__(self, store: Store, rel: str) -> None:
        self.store, self.rel = store, rel
        self.interval = 1.0 if store.is_local else 10.0
        self._position = 0
        self._last = 0.0

    def start(self, position: int) -> None:
        self._position = position
        self.store.write_bytes(self.rel, f"{position}\n".encode())
        self._last = time.monotonic()

    def beat(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            if self.store.is_local:
                import os

                os.utime(self.store.url(self.rel))
            else:
                self.store.write_bytes(self.rel, f"{self._position}\n".encode())
            self._last = now


def frame_sample(vid: str, source: str, frame: EncodedFrame) -> dict[str, object]:
    meta = {
        "video_id": vid,
        "source": source,
        "frame_index": frame.frame_index,
        "pts": round(frame.pts, 6),
        "width": frame.width,
        "height": frame.height,
        "src_width": frame.video.src_width,
        "src_height": frame.video.src_height,
        "fps": frame.video.fps,
    }
    return {
        "__key__": f"{vid}_{frame.frame_index:07d}",
        "jpg": frame.jpeg,
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


def _until_error(frames: Iterator[EncodedFrame], row: VideoRow) -> Iterator[EncodedFrame]:
    """The frames a video gives until it fails; its error goes in its row.

    Only decoding errors are caught here: an error writing a shard (a full disk) stops
    the group, whose tar stream can no longer be trusted.
    """
    try:
        yield from frames
    except Exception as error:  # any decoding failure is this video's, not the job's
        row.error = one_line(error)


def shard_video(
    source: str, writer: GroupShardWriter, options: DecodeOptions, heartbeat: Heartbeat
) -> VideoRow:
    """Write one video's frames; never raises for a bad video, the row says what went wrong.

    Frames decoded before a mid-stream error are kept: the row is `ok` with the error
    recorded. A video with no frame at all is `failed`, or `skipped` when it decoded but
    nothing fell in the requested window.
    """
    row = VideoRow(source=source, video_id=video_id(source))
    for frame in _until_error(decode_frames(source, options, heartbeat.beat), row):
        shard = writer.write(frame_sample(row.video_id, source, frame))
        if not row.shards or row.shards[-1] != shard:
            row.shards.append(shard)
        row.n_frames += 1
        row.duration, row.fps = frame.video.duration, frame.video.fps
        row.src_width, row.src_height = frame.video.src_width, frame.video.src_height
    if row.n_frames == 0:
        row.status = "failed" if row.error else "skipped"
        row.error = row.error or "no frame in the requested window"
    return row


def shard_group(
    group: str, sources: list[str], known_failures: dict[int, str], config: ShardConfig
) -> GroupResult:
    """Decode, encode and write one group; `known_failures` (by position) are not opened again."""
    store = Store(config.out)
    manifest = Manifest(store)
    remove_shards(store, group)
    writer = GroupShardWriter(
        store, group, max_bytes=config.shard_max_bytes, max_count=config.shard_max_count
    )
    heartbeat = Heartbeat(store, manifest.progress_file(group))
    videos = []
    try:
        for position, source in enumerate(sources):
            if position in known_failures:
                videos.append(
                    VideoRow(source, video_id(source), "failed", known_failures[position])
                )
                continue
            heartbeat.start(position)
            videos.append(shard_video(source, writer, config.decode, heartbeat))
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    return GroupResult(group, videos, shards)
