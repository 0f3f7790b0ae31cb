"""Decoding one video: exact sampling, resize and rotation, and every kind of bad input (no Ray)."""

from __future__ import annotations

import io
import os
from fractions import Fraction
from pathlib import Path

import av
import fsspec
import numpy as np
import pytest
from PIL import Image

from data_pipeline import synth
from data_pipeline.decode import DecodeOptions, VideoError, decode_frames

RATE = 10


def encode_clip(
    path: Path,
    frames: list[np.ndarray],
    *,
    times_ms: list[int] | None = None,
    rotation: int | None = None,
    faststart: bool = False,
) -> Path:
    """H.264 mp4 of RGB frames, at RATE fps or at the given millisecond timestamps."""
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=RATE, options={"threads": "1"})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if times_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for k, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = k if times_ms is None else times_ms[k]
            if times_ms is not None:
                frame.time_base = Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def gray_frames(n: int, height: int = 64, width: int = 64) -> list[np.ndarray]:
    return [np.full((height, width, 3), 5 * k, np.uint8) for k in range(n)]


def noisy_frames(n: int, height: int = 64, width: int = 64) -> list[np.ndarray]:
    """Frames that do not compress away, so the file's bytes are mostly frames, not headers."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(n)]


def make_bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """One file of each kind of bad input, with the words its `error` must hold."""
    folder.mkdir(parents=True, exist_ok=True)
    good = encode_clip(folder / "clip_faststart.mp4", noisy_frames(30), faststart=True)
    data = good.read_bytes()
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("not a video at all\n" * 50)
    (folder / "truncated.mp4").write_bytes(data[: len(data) * 6 // 10])
    index_last = encode_clip(folder / "index_last.mp4", noisy_frames(10)).read_bytes()
    (folder / "truncated_index.mp4").write_bytes(index_last[: len(index_last) // 2])
    corrupt = bytearray(data)
    corrupt[len(data) // 3 : len(data) // 3 + 3000] = bytes(range(256)) * 11 + bytes(184)
    (folder / "corrupt.mp4").write_bytes(bytes(corrupt))
    with av.open(str(folder / "audio_only.mp4"), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for k in range(20):
            samples = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
            )
            samples.sample_rate, samples.pts = 16000, k * 1024
            container.mux(stream.encode(samples))
        container.mux(stream.encode(None))
    with av.open(str(folder / "undecodable.mkv"), "w") as container:
        stream = container.add_stream("h264", rate=RATE)
        stream.width, stream.height, stream.time_base = 64, 64, Fraction(1, RATE)
        rng = np.random.default_rng(0)
        for k in range(10):
            packet = av.Packet(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
            packet.pts = packet.dts = k
            packet.stream = stream
            container.mux(packet)
    encode_clip(folder / "huge.mp4", gray_frames(3, 256, 384))
    (folder / "folder.mp4").mkdir()
    return {
        "empty": (folder / "empty.mp4", "empty file (0 bytes)"),
        "text": (folder / "text.mp4", "cannot open: Invalid data"),
        "truncated": (folder / "truncated.mp4", "decoding stopped after"),
        "corrupt": (folder / "corrupt.mp4", "decoding stopped after"),
        "truncated_index": (folder / "truncated_index.mp4", "cannot open: Invalid data"),
        "audio_only": (folder / "audio_only.mp4", "no video stream (audio)"),
        "undecodable": (folder / "undecodable.mkv", "no decodable video frame"),
        "missing": (folder / "missing.mp4", "no such file"),
        "directory": (folder / "folder.mp4", "is a directory"),
        "huge": (folder / "huge.mp4", "384x256 is above --max-pixels 65536"),
    }


FAILING_KINDS = [
    "empty",
    "text",
    "truncated_index",
    "audio_only",
    "undecodable",
    "missing",
    "directory",
    "huge",
]
PARTIAL_KINDS = ["truncated", "corrupt"]


def nearest_indices(
    times: list[float], fps: float, start: float = 0.0, end: float = float("inf")
) -> list[int]:
    """The sampling rule written the slow way: for each start + k/fps, the nearest frame."""
    inside = [(t, i) for i, t in enumerate(times) if start - 1e-6 <= t < end - 1e-6]
    picked, k = [], 0
    while inside and start + k / fps <= inside[-1][0] + 1e-6:
        target = start + k / fps
        best = min(inside, key=lambda item: (abs(item[0] - target), item[0]))[1]
        if best not in picked:
            picked.append(best)
        k += 1
    return picked


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, list[float]]:
    """A synthetic 96x64 clip, 25 frames at 10 fps, key frame every 5 frames."""
    path = tmp_path_factory.mktemp("decode") / "clip.mp4"
    labels = synth.write_clip(path, width=96, height=64, fps=RATE, seconds=2.5, seed=3, gop=5)
    return path, labels["pts"]


def indices(path: Path, **options) -> list[int]:
    return [f.frame_index for f in decode_frames(str(path), DecodeOptions(size=32, **options))]


@pytest.mark.parametrize("fps", [1.0, 2.0, 3.0, 7.0])
def test_fps_takes_the_frame_nearest_each_requested_time(clip, fps):
    path, times = clip
    frames = list(decode_frames(str(path), DecodeOptions(fps=fps, size=32)))
    assert [f.frame_index for f in frames] == nearest_indices(times, fps)
    assert [f.pts for f in frames] == pytest.approx([times[f.frame_index] for f in frames])
    assert frames[0].video.src_width == 96 and frames[0].video.fps == RATE


def test_every_window_and_max_frames(clip):
    path, times = clip
    assert indices(path, every=4) == [0, 4, 8, 12, 16, 20, 24]
    assert indices(path, every=1) == list(range(25))
    assert indices(path, every=4, max_frames=3) == [0, 4, 8]
    assert (
        indices(path, fps=2, start=0.5, end=1.6)
        == nearest_indices(times, 2, 0.5, 1.6)
        == [5, 10, 15]
    )
    assert indices(path, every=1, start=2.0) == [20, 21, 22, 23, 24]
    assert indices(path, every=1, start=9.0) == []


def key_frames(path: Path) -> list[int]:
    with av.open(str(path)) as container:
        return [k for k, frame in enumerate(container.decode(video=0)) if frame.key_frame]


def test_keyframes_decode_only_key_frames(clip):
    path, times = clip
    keys = key_frames(path)
    assert 3 <= len(keys) < 25
    assert indices(path, keyframes=True, every=1) == keys
    assert indices(path, keyframes=True, fps=1) == [
        keys[j] for j in nearest_indices([times[i] for i in keys], 1)
    ]


def test_fast_takes_nearest_decodable_frame(clip):
    path, times = clip
    decodable = indices(path, fast=True, every=1)
    assert len(decodable) < 25 and set(key_frames(path)) < set(decodable)
    fast = indices(path, fast=True, fps=3)
    expected = [decodable[j] for j in nearest_indices([times[i] for i in decodable], 3)]
    assert fast == expected


def test_resize_crop_and_quality(clip):
    path, _ = clip

    def first(**options):
        frame = next(decode_frames(str(path), DecodeOptions(**options)))
        image = Image.open(io.BytesIO(frame.jpeg))
        assert image.format == "JPEG" and image.mode == "RGB"
        assert image.size == (frame.width, frame.height)
        return frame

    assert (first(size=32).width, first(size=32).height) == (48, 32)
    assert (first(size=200).width, first(size=200).height) == (300, 200)
    assert (first(size=None).width, first(size=None).height) == (96, 64)
    assert (first(size=32, crop="center").width, first(size=32, crop="center").height) == (32, 32)
    assert len(first(size=64, quality=30).jpeg) < len(first(size=64, quality=95).jpeg)


def test_rotation_metadata_is_applied(tmp_path):
    rgb = np.zeros((32, 64, 3), np.uint8)
    rgb[:, :16] = 255  # a white band on the left of the stored frame
    path = encode_clip(tmp_path / "rotated.mp4", [rgb] * 5, rotation=90)
    frame = next(decode_frames(str(path), DecodeOptions(size=None)))
    assert (frame.width, frame.height) == (32, 64)
    assert (frame.video.src_width, frame.video.src_height) == (32, 64)
    pixels = np.asarray(Image.open(io.BytesIO(frame.jpeg)).convert("L"), dtype=np.float32)
    assert (
        pixels[-12:].mean() > 200 and pixels[:40].mean() < 40
    )  # turned counterclockwise: band at the bottom


def test_variable_frame_rate_uses_timestamps(tmp_path):
    times_ms = list(np.cumsum([0] + [100 if k % 2 else 33 for k in range(39)]))
    path = encode_clip(tmp_path / "vfr.mp4", gray_frames(40), times_ms=[int(t) for t in times_ms])
    frames = list(decode_frames(str(path), DecodeOptions(fps=2, size=32)))
    times = [t / 1000 for t in times_ms]
    assert [f.frame_index for f in frames] == nearest_indices(times, 2)
    assert [f.pts for f in frames] == pytest.approx(
        [times[f.frame_index] for f in frames], abs=1e-3
    )


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return make_bad_inputs(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("kind", FAILING_KINDS)
def test_bad_input_fails_with_a_one_line_reason(bad_inputs, kind):
    path, reason = bad_inputs[kind]
    with pytest.raises(VideoError) as caught:
        list(decode_frames(str(path), DecodeOptions(every=1, max_pixels=256 * 256)))
    assert reason in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("kind", PARTIAL_KINDS)
def test_broken_stream_keeps_the_frames_before_the_error(bad_inputs, kind):
    path, reason = bad_inputs[kind]
    frames = []
    with pytest.raises(VideoError, match=reason):
        for frame in decode_frames(str(path), DecodeOptions(every=1, size=32)):
            frames.append(frame)
    assert 0 < len(frames) < 30
    assert [f.frame_index for f in frames] == list(range(len(frames)))


def test_non_video_extension_is_refused_before_opening(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(VideoError, match="not a video file extension"):
        list(decode_frames(str(notes), DecodeOptions()))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path, clip):
    locked = tmp_path / "locked.mp4"
    locked.write_bytes(clip[0].read_bytes())
    locked.chmod(0)
    with pytest.raises(VideoError, match="permission denied"):
        list(decode_frames(str(locked), DecodeOptions()))


def test_fsspec_urls_are_read_through_a_file_object(clip):
    path, times = clip
    url = "memory://decode-test/clip.mp4"
    with fsspec.open(url, "wb") as f:
        f.write(path.read_bytes())
    try:
        from_url = [(f.frame_index, f.jpeg) for f in decode_frames(url, DecodeOptions(size=32))]
    finally:
        fsspec.filesystem("memory").rm("/decode-test", recursive=True)
    assert from_url == [
        (f.frame_index, f.jpeg) for f in decode_frames(str(path), DecodeOptions(size=32))
    ]
    assert [index for index, _ in from_url] == nearest_indices(times, 1.0)
