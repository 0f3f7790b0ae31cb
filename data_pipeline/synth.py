"""`catneuron synth`: deterministic sample videos with a planted cat face, and their labels.

Nothing can be downloaded where catneuron is tested, so the demo, the tests, the loader
benchmarks and the cat-neuron evals all draw their video from here. A clip is a scrolling
tileable texture under moving distractor shapes; in concept clips a drawn cat face is shown
for one stretch of frames only, so every concept clip has frames with and without it. The
face is drawn last and kept wholly inside the frame, which makes its box in `labels.parquet`
exact rather than an estimate. Everything a clip shows is a function of its seed, and x264
runs with a fixed thread count and settings that repeat, so the same seed gives the same
bytes on every run. Training never reads the labels; they exist for tests and evals. The
pictures themselves (face, shapes, textures) live in `data_pipeline.drawing`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from data_pipeline.cli_help import HelpFormatter
from data_pipeline.drawing import (
    DISTRACTOR_KINDS,
    FACE_REACH,
    Box,
    CatColors,
    Color,
    draw_cat_face,
    draw_distractor,
    random_color,
    tileable_texture,
)

__all__ = [
    "CLIP_SEED_LIMIT",
    "CatColors",
    "ClipSpec",
    "LABEL_SCHEMA",
    "Scene",
    "draw_cat_face",
    "draw_distractor",
    "main",
    "plan_clips",
    "render_shape_still",
    "render_still",
    "synthesize",
    "write_clip",
]


# The face's head radius as a share of the frame's shorter side, drawn uniformly per clip.
# Small by default (a face among clutter); "cat videos", where the cat fills much of the
# frame, are `--face-scale 0.3,0.4`.
FACE_SCALE = (0.12, 0.28)


def _bounce(start: float, velocity: float, steps: np.ndarray, limit: float) -> np.ndarray:
    """Positions at each step of a point moving at constant speed, reflected at 0 and `limit`."""
    period = 2 * limit
    pos = (start + velocity * steps) % period
    return np.where(pos > limit, period - pos, pos)


@dataclass(frozen=True)
class _Distractor:
    """A shape and its position and angle at every frame of the clip."""

    kind: str
    fill: Color
    radius: float
    x: np.ndarray
    y: np.ndarray
    angle: np.ndarray


@dataclass(frozen=True)
class _FaceTrack:
    """The face's stretch of frames: it shows from `first` for `len(angle)` frames."""

    first: int
    centre: np.ndarray  # (frames, 2)
    angle: np.ndarray
    radius: float
    colors: CatColors


class Scene:
    """One clip's content as a pure function of (seed, frame index).

    Holding the whole clip as state rather than drawing it in one loop lets a test render
    the very same frame with and without the face, and lets evals render single stills.
    """

    def __init__(
        self,
        width: int,
        height: int,
        n_frames: int,
        seed: int,
        *,
        concept: bool,
        face_scale: tuple[float, float] = FACE_SCALE,
        eyed_clutter: bool = False,
    ):
        rng = np.random.default_rng(seed)
        self.face_scale = face_scale
        self.width, self.height, self.n_frames = width, height, n_frames
        palette = (random_color(rng), random_color(rng))
        # A 2x2 tiling of one period makes every scroll offset a plain slice.
        self._tiles = np.tile(tileable_texture(rng, height, width, palette), (2, 2, 1))
        self._scroll = rng.uniform(-0.02, 0.02, 2) * (width, height)  # pixels per frame
        short, steps = min(width, height), np.arange(n_frames)
        self._distractors = [
            _Distractor(
                kind=DISTRACTOR_KINDS[int(rng.integers(len(DISTRACTOR_KINDS)))],
                fill=random_color(rng),
                radius=float(rng.uniform(0.04, 0.14) * short),
                x=_bounce(rng.uniform(0, width), rng.uniform(-0.03, 0.03) * short, steps, width),
                y=_bounce(rng.uniform(0, height), rng.uniform(-0.03, 0.03) * short, steps, height),
                angle=rng.uniform(0, 360) + rng.uniform(-6, 6) * steps,
            )
            for _ in range(int(rng.integers(3, 9)))
        ]
        self.face = self._face_track(rng, palette) if concept else None
        # Eyed clutter: each distractor carries two near-black dots and a thin light or dark
        # stroke, the face's pupils and whiskers, so that no single dark spot or thin line
        # gives the face away. Drawn from a second generator, so the rest of the scene is
        # the same with and without it.
        self._details = None
        if eyed_clutter:
            extra = np.random.default_rng([seed, 1])
            self._details = [
                (extra.uniform(0.15, 0.35), extra.uniform(0, 360), extra.random() < 0.5)
                for _ in self._distractors
            ]

    def _face_track(self, rng: np.random.Generator, palette: tuple[Color, Color]) -> _FaceTrack:
        """Shown for one stretch that never covers a whole clip, so both kinds of frame exist."""
        n = self.n_frames
        if n == 1:
            first, count = 0, 1
        else:
            count = int(np.clip(round(rng.uniform(0.3, 0.7) * n), 1, n - 1))
            first = int(rng.integers(0, n - count + 1))
        radius = float(rng.uniform(*self.face_scale) * min(self.width, self.height))
        margin = FACE_REACH * radius + radius / 24 + 2
        ends = np.array(
            [
                (
                    rng.uniform(margin, self.width - margin),
                    rng.uniform(margin, self.height - margin),
                )
                for _ in range(2)
            ]
        )
        t = np.linspace(0.0, 1.0, count)
        return _FaceTrack(
            first=first,
            centre=(1 - t[:, None]) * ends[0] + t[:, None] * ends[1],
            angle=rng.uniform(-35, 35) + rng.uniform(-20, 20) * t,
            radius=radius,
            colors=CatColors.random(rng, avoid=palette),
        )

    @staticmethod
    def _draw_details(
        draw: ImageDraw.ImageDraw,
        d: _Distractor,
        index: int,
        spread: float,
        turn: float,
        light: bool,
    ) -> None:
        x, y, r = d.x[index], d.y[index], d.radius
        a = np.deg2rad(d.angle[index] + turn)
        dx, dy = spread * r * np.cos(a), spread * r * np.sin(a)
        dot = max(1.0, r * 0.12)
        for side in (1, -1):
            cx, cy = x + side * dx, y + side * dy
            draw.ellipse((cx - dot, cy - dot, cx + dot, cy + dot), fill=(10, 10, 10))
        ink = (245, 245, 245) if light else (20, 20, 20)
        draw.line(
            (x - dy * 1.6, y + dx * 1.6, x + dy * 1.6, y - dx * 1.6),
            fill=ink,
            width=max(1, round(r / 12)),
        )

    def render(self, index: int, *, face: bool = True) -> tuple[np.ndarray, Box | None]:
        """Frame `index` as (height, width, 3) uint8 RGB, and the face box if the face shows in it."""
        dx, dy = (int(round(v)) for v in self._scroll * index)
        dx, dy = dx % self.width, dy % self.height
        view = self._tiles[dy : dy + self.height, dx : dx + self.width]
        image = Image.fromarray(np.ascontiguousarray(view))
        draw = ImageDraw.Draw(image)
        for i, d in enumerate(self._distractors):
            draw_distractor(draw, d.kind, d.x[index], d.y[index], d.radius, d.angle[index], d.fill)
            if self._details is not None:
                self._draw_details(draw, d, index, *self._details[i])
        track, box = self.face, None
        if face and track is not None and 0 <= index - track.first < len(track.angle):
            k = index - track.first
            x0, y0, x1, y1 = draw_cat_face(
                draw, *track.centre[k], track.radius, track.angle[k], track.colors
            )
            box = (max(x0, 0), max(y0, 0), min(x1, self.width), min(y1, self.height))
        return np.asarray(image), box


def render_still(
    width: int,
    height: int,
    seed: int,
    *,
    cat: bool,
    face_scale: tuple[float, float] = FACE_SCALE,
    eyed_clutter: bool = False,
) -> tuple[np.ndarray, Box | None]:
    """One cluttered image, with a cat face or without: the unit of the evals' concept sets."""
    scene = Scene(
        width, height, 1, seed, concept=cat, face_scale=face_scale, eyed_clutter=eyed_clutter
    )
    return scene.render(0)


def render_shape_still(width: int, height: int, seed: int, kind: str) -> np.ndarray:
    """One distractor shape of `kind` (`DISTRACTOR_KINDS`) on a texture: the unit of the
    evals' shape-classification set. The shape is large, wholly inside, in a colour far
    from the background's, at a random position, size and angle."""
    if kind not in DISTRACTOR_KINDS:
        raise ValueError(f"unknown shape {kind!r}; kinds: {', '.join(DISTRACTOR_KINDS)}")
    rng = np.random.default_rng(seed)
    palette = (random_color(rng), random_color(rng))
    image = Image.fromarray(tileable_texture(rng, height, width, palette))
    for _ in range(64):
        fill = random_color(rng)
        if all(np.linalg.norm(np.subtract(fill, other)) > 120 for other in palette):
            break
    radius = float(rng.uniform(0.22, 0.38) * min(width, height))
    cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
    draw_distractor(ImageDraw.Draw(image), kind, cx, cy, radius, rng.uniform(0, 360), fill)
    return np.asarray(image)


LABEL_SCHEMA = pa.schema(
    [
        ("clip", pa.string()),
        ("source", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("fps", pa.float64()),
        ("has_concept", pa.bool_()),
        ("frame_index", pa.int32()),
        ("pts", pa.float64()),
        ("concept", pa.bool_()),
        ("x0", pa.int32()),
        ("y0", pa.int32()),
        ("x1", pa.int32()),
        ("y1", pa.int32()),
    ]
)


def write_clip(
    path: str | os.PathLike,
    *,
    width: int,
    height: int,
    fps: float | Fraction,
    seconds: float,
    seed: int,
    concept: bool = True,
    gop: int | None = None,
    crf: int | None = None,
    preset: str = "veryfast",
    threads: int = 1,
    face_scale: tuple[float, float] = FACE_SCALE,
    eyed_clutter: bool = False,
) -> dict[str, list]:
    """Encode one synthetic H.264 mp4 at `path`; return its per-frame label columns.

    The file appears under its final name only once complete. The returned columns are the
    clip's rows of `labels.parquet` (see `synthesize`). `gop` is the keyframe interval (x264's
    default when None), `crf` the quality (23 when None). x264's output depends on its thread
    count, so `threads` is fixed rather than automatic: the same arguments give the same bytes
    on every machine; raise it to encode large clips faster.
    """
    if width % 2 or height % 2:
        raise ValueError(f"{path}: yuv420p needs even width and height, got {width}x{height}")
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    n_frames = max(2, round(seconds * rate))
    scene = Scene(
        width,
        height,
        n_frames,
        seed,
        concept=concept,
        face_scale=face_scale,
        eyed_clutter=eyed_clutter,
    )
    options = {
        "preset": preset,
        "crf": str(23 if crf is None else crf),
        "threads": str(threads),
        # With macroblock-tree rate control on, this x264 build gave different bytes (and
        # decoded frames) from run to run for the same frames, even on one thread; with it
        # off, 25 of 25 runs agreed. B-frames and lookahead stay on.
        "x264-params": "mbtree=0",
    }
    if gop is not None:
        options["g"] = str(gop)
    labels: dict[str, list] = {
        k: [] for k in ("frame_index", "pts", "concept", "x0", "y0", "x1", "y1")
    }
    partial = path.with_name(f".{path.name}.partial")
    try:
        with av.open(str(partial), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=rate, options=options)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for index in range(n_frames):
                rgb, box = scene.render(index)
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = index
                container.mux(stream.encode(frame))
                labels["frame_index"].append(index)
                labels["pts"].append(float(index / rate))
                labels["concept"].append(box is not None)
                for key, value in zip(("x0", "y0", "x1", "y1"), box or (None,) * 4, strict=True):
                    labels[key].append(value)
            container.mux(stream.encode(None))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    columns = {
        "clip": path.name,
        "source": str(path.resolve()),
        "width": width,
        "height": height,
        "fps": float(rate),
        "has_concept": concept,
    }
    return {**{k: [v] * n_frames for k, v in columns.items()}, **labels}


# Every clip's scene seed is below this; eval stills (`evals.features.sources.still_seed`) draw
# theirs at or above 2**40, so an eval set never shows a scene that training saw.
CLIP_SEED_LIMIT = 2**31


@dataclass(frozen=True)
class ClipSpec:
    name: str
    width: int
    height: int
    fps: Fraction
    seconds: float
    seed: int
    concept: bool


def plan_clips(
    n_videos: int,
    seed: int,
    *,
    concept_fraction: float = 0.5,
    min_size: int = 96,
    max_size: int = 192,
    min_seconds: float = 2.0,
    max_seconds: float = 5.0,
    fps_choices: Sequence[float] = (10, 15, 24, 25, 30),
) -> list[ClipSpec]:
    """Decide every clip before drawing any: sizes, rates, lengths and which clips hold the face.

    Exactly round(n * fraction) clips get the face, chosen by a seeded shuffle; each clip's
    own content seed depends only on (seed, index), not on how many clips are asked for.
    """
    rng = np.random.default_rng(seed)
    with_face = set(rng.permutation(n_videos)[: round(n_videos * concept_fraction)].tolist())
    specs = []
    for index in range(n_videos):
        clip_rng = np.random.default_rng([seed, index])
        specs.append(
            ClipSpec(
                name=f"clip_{index:05d}.mp4",
                width=2 * int(clip_rng.integers(min_size // 2, max_size // 2 + 1)),
                height=2 * int(clip_rng.integers(min_size // 2, max_size // 2 + 1)),
                fps=Fraction(
                    fps_choices[int(clip_rng.integers(len(fps_choices)))]
                ).limit_denominator(1001),
                seconds=float(clip_rng.uniform(min_seconds, max_seconds)),
                seed=int(clip_rng.integers(CLIP_SEED_LIMIT)),
                concept=index in with_face,
            )
        )
    return specs


def synthesize(
    out_dir: str | os.PathLike,
    n_videos: int,
    seed: int,
    *,
    face_scale: tuple[float, float] = FACE_SCALE,
    eyed_clutter: bool = False,
    **plan_options,
) -> list[Path]:
    """Write `clip_00000.mp4`, ... and `labels.parquet` under `out_dir`; return the clip paths.

    `labels.parquet` has one row per decoded frame: `clip`, `source` (absolute path),
    `frame_index` (0-based, presentation order), `pts` (seconds), `concept` (face visible),
    the face box `x0, y0, x1, y1` (half-open pixels; null without face), and the clip's
    `width`, `height`, `fps`, `has_concept`. `plan_options` go to `plan_clips`. Clips from an
    earlier run that this run does not write are removed, so the directory and the labels
    always describe the same set. `face_scale` and `eyed_clutter` are `Scene`'s.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = plan_clips(n_videos, seed, **plan_options)
    tables, paths = [], []
    for spec in specs:
        path = out / spec.name
        labels = write_clip(
            path,
            width=spec.width,
            height=spec.height,
            fps=spec.fps,
            seconds=spec.seconds,
            seed=spec.seed,
            concept=spec.concept,
            face_scale=face_scale,
            eyed_clutter=eyed_clutter,
        )
        tables.append(pa.table(labels, schema=LABEL_SCHEMA))
        paths.append(path)
    for stale in sorted(set(out.glob("clip_*.mp4")) - set(paths)):
        stale.unlink()
    table = pa.concat_tables(tables) if tables else LABEL_SCHEMA.empty_table()
    partial = out / ".labels.parquet.partial"
    pq.write_table(table, partial)
    os.replace(partial, out / "labels.parquet")
    return paths


def _fps_list(text: str) -> list[float]:
    try:
        rates = [float(Fraction(part)) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of frame rates: {text!r}"
        ) from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError(f"frame rates must be positive: {text!r}")
    return rates


def _scale_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not LO,HI: {text!r}") from None
    if not 0.02 <= lo <= hi <= 0.3:
        raise argparse.ArgumentTypeError(f"need 0.02 <= LO <= HI <= 0.3 (the face fits): {text!r}")
    return lo, hi


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="catneuron synth",
        description="Write procedurally generated H.264 sample videos, some with a drawn cat face, "
        "and labels.parquet (per frame: is the face visible, and its box).",
        formatter_class=HelpFormatter,
    )
    add = p.add_argument
    add(
        "--out",
        type=Path,
        required=True,
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="directory for clip_NNNNN.mp4 and labels.parquet",
    )
    add("--videos", type=int, default=8, metavar="N", help="how many clips to write")
    add("--seed", type=int, default=0, metavar="S", help="the same seed writes the same clips")
    add(
        "--concept-fraction",
        type=float,
        default=0.5,
        metavar="F",
        help="fraction of clips that show the cat face (exactly round(N * F) clips)",
    )
    add("--min-size", type=int, default=96, metavar="PX", help="smallest frame width and height")
    add("--max-size", type=int, default=192, metavar="PX", help="largest frame width and height")
    add("--min-seconds", type=float, default=2.0, metavar="SEC", help="shortest clip")
    add("--max-seconds", type=float, default=5.0, metavar="SEC", help="longest clip")
    add(
        "--fps-choices",
        type=_fps_list,
        default="10,15,24,25,30",
        metavar="LIST",
        help="comma-separated frame rates each clip draws one of",
    )
    add(
        "--face-scale",
        type=_scale_range,
        default=",".join(f"{v:g}" for v in FACE_SCALE),
        metavar="LO,HI",
        help="the face's head radius as a share of the frame's shorter side, drawn per clip",
    )
    add(
        "--eyed-clutter",
        action="store_true",
        help="give every distractor the face's near-black pupils and a thin whisker stroke, so "
        "that no single dark spot or thin line gives the face away (the cat-neuron demo's data)",
    )
    args = p.parse_args(argv)
    if args.videos < 0:
        p.error("--videos must be >= 0")
    if not 0.0 <= args.concept_fraction <= 1.0:
        p.error("--concept-fraction must be within [0, 1]")
    if not 32 <= args.min_size <= args.max_size:
        p.error("need 32 <= --min-size <= --max-size")
    if not 0 < args.min_seconds <= args.max_seconds:
        p.error("need 0 < --min-seconds <= --max-seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        print(f"catneuron synth: {args.out}: exists and is not a directory", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        paths = synthesize(
            args.out,
            args.videos,
            args.seed,
            concept_fraction=args.concept_fraction,
            min_size=args.min_size,
            max_size=args.max_size,
            min_seconds=args.min_seconds,
            max_seconds=args.max_seconds,
            fps_choices=args.fps_choices,
            face_scale=args.face_scale,
            eyed_clutter=args.eyed_clutter,
        )
    except OSError as err:
        print(f"catneuron synth: {args.out}: {err.strerror or err}", file=sys.stderr)
        return 1
    labels = pq.read_table(args.out / "labels.parquet", columns=["clip", "concept", "has_concept"])
    with_face = len(set(labels.filter(labels["has_concept"])["clip"].to_pylist()))
    print(
        f"synth: {len(paths)} clips ({with_face} with the cat face), {labels.num_rows} frames "
        f"({sum(labels['concept'].to_pylist())} showing it) and labels.parquet in {args.out} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
