"""One video to sampled, resized, JPEG-encoded frames, with PyAV.

Frames are encoded here, inside the worker that decoded them, so a raw frame never
leaves the process (a decoded frame is about ten times the size of its JPEG).

Sampling picks frames in presentation order within the window [start, end) seconds,
counted from the stream's first timestamp:
- `fps=F`: for each requested time start + k/F, the decoded frame nearest to it (ties
  go to the earlier frame); a frame nearest to several times is taken once, and times
  after the last frame take nothing. Exact when every frame is decoded.
- `every=N`: every N-th decoded frame of the window, starting with the first.
- `keyframes`: only key frames are demuxed and decoded (`skip_frame="NONKEY"`); `fast`
  lets the decoder drop non-reference frames (`skip_frame="NONREF"`) and skip the
  deblocking filter everywhere but on key frames (`skip_loop_filter="nokey"`: about 12%
  faster H.264 decode, at the price of faint block edges that a downscale mostly hides).
  Sampling at 1 fps
  otherwise decodes every frame of every GOP; with these the rules above apply to the
  frames that were decoded (the nearest decodable frame to each time).

`frame_index` is the frame's position in presentation order: counted when every frame
is decoded from the start of the stream (exact even at a variable frame rate), else
(after a seek to `start`, or with frames skipped) computed from its timestamp and the
average frame rate, which is exact at a constant rate.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import count
from typing import NamedTuple

import av
from PIL import Image

from data_pipeline.sources import is_url, looks_like_video

# Frame times are floats from pts * time_base: a frame this close to a requested time is on it.
_TIME_EPS = 1e-6
_TRANSPOSE = {90: Image.Transpose.ROTATE_90, -90: Image.Transpose.ROTATE_270,
              180: Image.Transpose.ROTATE_180, -180: Image.Transpose.ROTATE_180}  # fmt: skip


class VideoError(Exception):
    """A video that cannot give frames, with the one-line reason that goes in the manifest."""


@dataclass(frozen=True)
class DecodeOptions:
    fps: float = 1.0
    every: int | None = None
    keyframes: bool = False
    fast: bool = False
    max_frames: int | None = None
    start: float = 0.0
    end: float | None = None
    size: int | None = 256
    crop: str = "none"
    quality: int = 90
    max_pixels: int = 7680 * 4320
    threads: int = 1


@dataclass(frozen=True)
class VideoInfo:
    """What the `json` member says about a frame's video; sizes as displayed (after rotation)."""

    src_width: int
    src_height: int
    fps: float
    duration: float | None


@dataclass(frozen=True)
class EncodedFrame:
    frame_index: int
    pts: float
    jpeg: bytes
    width: int
    height: int
    video: VideoInfo


class _Candidate(NamedTuple):
    time: float
    index: int
    frame: av.VideoFrame


def _open_local(path: str) -> str:
    """The path, after the checks whose FFmpeg messages would not say what is wrong."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise VideoError("no such file") from None
    except PermissionError:
        raise VideoError("permission denied") from None
    if stat.S_ISDIR(info.st_mode):
        raise VideoError("is a directory")
    if stat.S_ISREG(info.st_mode) and info.st_size == 0:
        raise VideoError("empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise VideoError("permission denied")
    return path


def _display_size(frame: av.VideoFrame) -> tuple[int, int, Image.Transpose | None]:
    transpose = _TRANSPOSE.get(round(frame.rotation)) if frame.rotation else None
    if transpose in (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270):
        return frame.height, frame.width, transpose
    return frame.width, frame.height, transpose


def _target_size(width: int, height: int, size: int | None) -> tuple[int, int]:
    """(width, height) with the shorter side `size` and the aspect ratio kept."""
    if not size:
        return width, height
    if width <= height:
        return size, max(size, round(height * size / width))
    return max(size, round(width * size / height)), size


def frame_to_jpeg(frame: av.VideoFrame, options: DecodeOptions) -> tuple[bytes, int, int]:
    """Resize, rotate as displayed, center-crop, encode.

    The resize runs in libswscale straight from the decoder's YUV, in the same pass as the
    conversion to RGB; its bilinear filter widens when it shrinks, so it does not alias.
    At 1080p that is about four times faster than making a full-size RGB image for
    Pillow to resize (bench/shard.py).
    """
    display_width, display_height, transpose = _display_size(frame)
    width, height = _target_size(display_width, display_height, options.size)
    turned = (display_width, display_height) != (frame.width, frame.height)
    coded = (height, width) if turned else (width, height)
    image = frame.reformat(
        width=coded[0], height=coded[1], format="rgb24", interpolation="BILINEAR"
    ).to_image()
    if transpose is not None:
        image = image.transpose(transpose)
    if options.crop == "center" and options.size:
        left, top = (width - options.size) // 2, (height - options.size) // 2
        image = image.crop((left, top, left + options.size, top + options.size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=options.quality)
    return buffer.getvalue(), image.width, image.height


def _nearest_to_times(
    candidates: Iterator[_Candidate], first: float, step: float
) -> Iterator[_Candidate]:
    """The candidate nearest to each time first + k * step, each candidate at most once."""
    targets = (first + k * step for k in count())
    target, previous, taken = next(targets), None, None
    for current in candidates:
        while current.time >= target - _TIME_EPS:
            later_is_closer = previous is None or current.time - target < target - previous.time
            best = current if later_is_closer else previous
            if best is not taken:
                taken = best
                yield best
            target = next(targets)
        previous = current


def _select(
    candidates: Iterator[_Candidate], begin: float, options: DecodeOptions
) -> Iterator[_Candidate]:
    if options.every:
        return (c for k, c in enumerate(candidates) if k % options.every == 0)
    return _nearest_to_times(candidates, begin, 1.0 / options.fps)


def _video_stream(
    container: av.container.InputContainer, options: DecodeOptions
) -> av.video.stream.VideoStream:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        raise VideoError(f"no video stream ({', '.join(kinds) or 'no streams at all'})")
    stream = container.streams.video[0]
    if container.format.name == "tty" or stream.codec_context.name == "ansi":
        raise VideoError(f"not a video ({container.format.name} format)")
    pixels = stream.codec_context.width * stream.codec_context.height
    if pixels > options.max_pixels:
        size = f"{stream.codec_context.width}x{stream.codec_context.height}"
        raise VideoError(f"{size} is above --max-pixels {options.max_pixels}")
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = options.threads
    if options.keyframes:
        stream.codec_context.skip_frame = "NONKEY"
    elif options.fast:
        stream.codec_context.skip_frame = "NONREF"
        stream.codec_context.options = {"skip_loop_filter": "nokey"}
    return stream


def _seek(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, seconds: float
) -> bool:
    """Seek to the key frame at or before `seconds`; False where the input cannot seek."""
    try:
        container.seek(int(seconds / stream.time_base), stream=stream, backward=True)
    except (av.error.FFmpegError, OSError):
        return False
    return True


def _decoded_frames(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    keyframes_only: bool,
) -> Iterator[av.VideoFrame]:
    """Every frame the decoder gives; an FFmpeg error becomes a VideoError saying where."""
    time = 0.0
    try:
        for packet in container.demux(stream):
            if keyframes_only and packet.size and not packet.is_keyframe:
                continue
            for frame in packet.decode():
                time = frame.time or time
                yield frame
    except av.error.FFmpegError as error:
        raise VideoError(f"decoding stopped after {time:.2f} s: {error.strerror}") from None


@dataclass
class _Window:
    """Which decoded frames fall in [begin, end), and how a frame's time and index are read."""

    origin: float
    begin: float
    end: float
    rate: float
    counted: bool
    n_decoded: int = 0

    def candidates(
        self, frames: Iterator[av.VideoFrame], heartbeat: Callable[[], None] | None
    ) -> Iterator[_Candidate]:
        for frame in frames:
            time = frame.time if frame.time is not None else self.n_decoded / (self.rate or 1.0)
            index = self.n_decoded if self.counted else round((time - self.origin) * self.rate)
            self.n_decoded += 1
            if heartbeat is not None:
                heartbeat()
            if time >= self.end - _TIME_EPS:
                return
            if time >= self.begin - _TIME_EPS:
                yield _Candidate(time, index, frame)


def decode_frames(
    source: str, options: DecodeOptions, heartbeat: Callable[[], None] | None = None
) -> Iterator[EncodedFrame]:
    """Sampled frames of one video, encoded; raises VideoError with a one-line reason.

    An error after some frames were yielded means the stream broke part-way: the frames
    already yielded are good, and the caller keeps them. Ending without a frame means
    none fell in the window. `heartbeat` runs for every decoded frame, so a watcher can
    tell a slow video from a hung one.
    """
    if not looks_like_video(source):
        raise VideoError("not a video file extension")
    with ExitStack() as stack:
        if is_url(source):
            import fsspec  # only for URLs: a local job's workers do without it

            target = stack.enter_context(fsspec.open(source, "rb"))
        else:
            target = _open_local(source)
        try:
            container = stack.enter_context(av.open(target, metadata_errors="ignore"))
        except av.error.FFmpegError as error:
            raise VideoError(f"cannot open: {error.strerror}") from None
        stream = _video_stream(container, options)
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        if stream.duration:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = container.duration / av.time_base if container.duration else None
        origin = (
            float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        )
        begin = origin + options.start
        seeked = options.start > 0 and _seek(container, stream, begin)
        window = _Window(
            origin=origin,
            begin=begin,
            end=origin + options.end if options.end is not None else float("inf"),
            rate=rate,
            counted=not (seeked or options.keyframes or options.fast),
        )
        frames = _decoded_frames(container, stream, options.keyframes)
        info, last_index, n_taken = None, -1, 0
        for candidate in _select(window.candidates(frames, heartbeat), begin, options):
            if candidate.index <= last_index:  # indices from timestamps can repeat
                continue
            jpeg, width, height = frame_to_jpeg(candidate.frame, options)
            if info is None:
                src_width, src_height, _ = _display_size(candidate.frame)
                info = VideoInfo(src_width, src_height, rate, duration)
            yield EncodedFrame(candidate.index, candidate.time, jpeg, width, height, info)
            last_index, n_taken = candidate.index, n_taken + 1
            if options.max_frames and n_taken >= options.max_frames:
                return
        if window.n_decoded == 0:
            raise VideoError("no decodable video frame")
