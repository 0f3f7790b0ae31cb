"""The pictures that `synth` animates: a drawn cat face, distractor shapes, tileable textures.

Kept apart from the video writer because the evals draw concept images with the same
functions (cat faces against distractors, for neuron selectivity) without any video. All
geometry is in unit coordinates placed by one affine map, so position, scale and rotation
are free parameters of every shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

Box = tuple[int, int, int, int]
Color = tuple[int, int, int]
Points = np.ndarray  # (N, 2) float coordinates, x then y

# Cat face geometry in units of the head radius, y pointing down, centred on the head.
_TURN = np.linspace(0, 2 * np.pi, 40, endpoint=False)
_ELLIPSE = np.stack([np.cos(_TURN), np.sin(_TURN)], axis=1)
_HEAD = _ELLIPSE * (1.0, 0.88) + (0.0, 0.05)
_EAR = np.array([(-0.95, -0.28), (-0.80, -1.30), (-0.20, -0.78)])
_EAR_INNER = np.array([(-0.80, -0.42), (-0.74, -1.05), (-0.38, -0.76)])
_EYE = _ELLIPSE * (0.20, 0.16) + (-0.38, -0.12)
_PUPIL = _ELLIPSE * (0.06, 0.14) + (-0.38, -0.12)
_NOSE = np.array([(-0.12, 0.22), (0.12, 0.22), (0.0, 0.36)])
_MOUTH = [np.array([(0.0, 0.36), (-0.15, 0.50)]), np.array([(0.0, 0.36), (0.15, 0.50)])]
_WHISKERS = [np.array([(-0.30, 0.30 + 0.08 * k), (-1.50, 0.12 + 0.22 * k)]) for k in range(3)]
_MIRROR = np.array([-1.0, 1.0])
# Farthest point of the face from its centre (a whisker tip), in head radii: keeping the
# centre this far from every edge keeps the face whole at any rotation.
FACE_REACH = 1.62


def _regular(corners: int, inner: float | None = None) -> np.ndarray:
    """A regular polygon pointing up; with `inner`, a star whose inner corners lie at that radius."""
    n = corners if inner is None else 2 * corners
    angles = np.linspace(-np.pi / 2, 1.5 * np.pi, n, endpoint=False)
    radii = np.ones(n) if inner is None else np.tile([1.0, inner], corners)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_SHAPES: dict[str, np.ndarray] = {
    "circle": _ELLIPSE * (1.0, 0.8),
    "rectangle": np.array([(-1.0, -0.6), (1.0, -0.6), (1.0, 0.6), (-1.0, 0.6)]),
    "triangle": _regular(3),
    "star": _regular(5, inner=0.42),
}
DISTRACTOR_KINDS = tuple(_SHAPES)


@dataclass(frozen=True)
class CatColors:
    """The colours of one face: one object, so a concept set can vary colour apart from pose."""

    fur: Color
    ear_inner: Color
    eye: Color
    pupil: Color
    nose: Color
    whisker: Color
    outline: Color

    @classmethod
    def random(cls, rng: np.random.Generator, avoid: Sequence[Color] = ()) -> CatColors:
        """Fur far from the `avoid` colours (the background), so the face stands out in any scene."""
        for _ in range(64):
            fur = random_color(rng)
            if all(np.linalg.norm(np.subtract(fur, other)) > 120 for other in avoid):
                break
        dark = sum(fur) < 3 * 110
        eye_palette = [(120, 200, 60), (230, 200, 40), (80, 160, 230), (200, 140, 40)]
        return cls(
            fur=fur,
            ear_inner=_blend(fur, (250, 150, 170), 0.6),
            eye=eye_palette[int(rng.integers(len(eye_palette)))],
            pupil=(10, 10, 10),
            nose=(235, 120, 140),
            whisker=(245, 245, 245) if dark else (20, 20, 20),
            outline=_blend(fur, (0, 0, 0), 0.6),
        )


GINGER = CatColors(
    fur=(200, 130, 60),
    ear_inner=(240, 160, 160),
    eye=(120, 200, 60),
    pupil=(10, 10, 10),
    nose=(235, 120, 140),
    whisker=(20, 20, 20),
    outline=(80, 52, 24),
)
# Every part white: the face drawn as a mask, to measure exactly which pixels it covers.
_MASK = CatColors(*[(255, 255, 255)] * 7)


def random_color(rng: np.random.Generator) -> Color:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _blend(a: Color, b: Color, weight: float) -> Color:
    return tuple(int(round(x * (1 - weight) + y * weight)) for x, y in zip(a, b, strict=True))


def _place(
    points: Points, cx: float, cy: float, scale: float, angle: float
) -> list[tuple[float, float]]:
    """Unit geometry -> image coordinates: scale, rotate by `angle` degrees, move to (cx, cy)."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    rotated = points @ np.array([[c, s], [-s, c]]) * scale + (cx, cy)
    return [tuple(p) for p in rotated.tolist()]


def _draw_face_parts(
    draw: ImageDraw.ImageDraw, cx: float, cy: float, radius: float, angle: float, colors: CatColors
) -> np.ndarray:
    """Draw every part of the face; return all the vertices placed, for a bound on its extent."""
    line = max(1, round(radius / 12))
    placed: list[list[tuple[float, float]]] = []

    def polygon(points: Points, fill: Color, outline: Color | None = None) -> None:
        xy = _place(points, cx, cy, radius, angle)
        draw.polygon(xy, fill=fill, outline=outline, width=line if outline else 0)
        placed.append(xy)

    def segment(points: Points, fill: Color) -> None:
        xy = _place(points, cx, cy, radius, angle)
        draw.line(xy, fill=fill, width=line)
        placed.append(xy)

    for side in (1.0, -1.0):
        polygon(_EAR * (side, 1), colors.fur, colors.outline)
        polygon(_EAR_INNER * (side, 1), colors.ear_inner)
    polygon(_HEAD, colors.fur, colors.outline)
    for side in (1.0, -1.0):
        polygon(_EYE * (side, 1), colors.eye, colors.outline)
        polygon(_PUPIL * (side, 1), colors.pupil)
    polygon(_NOSE, colors.nose)
    for stroke in _MOUTH:
        segment(stroke, colors.outline)
    for whisker in _WHISKERS:
        segment(whisker, colors.whisker)
        segment(whisker * _MIRROR, colors.whisker)
    return np.array([p for shape in placed for p in shape])


def draw_cat_face(
    draw: ImageDraw.ImageDraw,
    cx: float,
    cy: float,
    radius: float,
    angle: float = 0.0,
    colors: CatColors | None = None,
) -> Box:
    """Draw a cat face (head, ears, eyes with pupils, nose, mouth, whiskers) centred at (cx, cy).

    `radius` is the head radius in pixels, `angle` a clockwise rotation in degrees. Returns the box
    `(x0, y0, x1, y1)` of the pixels it drew, half-open like `Image.crop`, not clipped to
    the image. The box is exact: rasterized lines and outlines reach past the geometry by
    amounts that depend on Pillow's rounding, so the face is drawn once more as a white
    mask on a small canvas (shifted by whole pixels, hence rasterized identically) and the
    mask's bounding box is taken.
    """
    vertices = _draw_face_parts(draw, cx, cy, radius, angle, colors or GINGER)
    reach = radius / 12 + 2  # more than any line or outline extends past its vertices
    x0, y0 = (math.floor(v - reach) for v in vertices.min(axis=0))
    x1, y1 = (math.ceil(v + reach) for v in vertices.max(axis=0))
    mask = Image.new("RGB", (x1 - x0, y1 - y0))
    _draw_face_parts(ImageDraw.Draw(mask), cx - x0, cy - y0, radius, angle, _MASK)
    left, top, right, bottom = mask.getbbox()
    return x0 + left, y0 + top, x0 + right, y0 + bottom


def draw_distractor(
    draw: ImageDraw.ImageDraw,
    kind: str,
    cx: float,
    cy: float,
    radius: float,
    angle: float,
    fill: Color,
) -> None:
    """Draw one distractor shape (`DISTRACTOR_KINDS`): the clutter a cat detector must ignore."""
    draw.polygon(_place(_SHAPES[kind], cx, cy, radius, angle), fill=fill)


def _periodic_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth value noise that wraps around both axes, so a scrolled texture shows no seam."""
    grid = rng.random((cells, cells), dtype=np.float32)

    def axis_weights(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.arange(n, dtype=np.float32) * cells / n
        lo = pos.astype(np.int64)
        frac = pos - lo
        return lo, (lo + 1) % cells, frac * frac * (3 - 2 * frac)

    y0, y1, fy = axis_weights(height)
    x0, x1, fx = axis_weights(width)
    rows = grid[y0] * (1 - fy)[:, None] + grid[y1] * fy[:, None]
    return rows[:, x0] * (1 - fx) + rows[:, x1] * fx


def tileable_texture(
    rng: np.random.Generator, height: int, width: int, palette: tuple[Color, Color]
) -> np.ndarray:
    """A tileable (height, width, 3) uint8 texture: noise mixed with stripes or a checkerboard."""
    noise = sum(
        _periodic_noise(rng, height, width, cells) / k for k, cells in ((1, 4), (2, 9), (4, 23))
    )
    y = np.arange(height, dtype=np.float32)[:, None] / height
    x = np.arange(width, dtype=np.float32)[None, :] / width
    kind = rng.choice(["stripes", "checker", "noise"])
    if kind == "stripes":
        kx, ky = (int(k) for k in rng.integers(-6, 7, 2))
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * (kx * x + (ky or 1) * y))
    elif kind == "checker":
        nx, ny = (int(k) for k in rng.integers(2, 9, 2))
        pattern = ((np.floor(2 * nx * x) + np.floor(2 * ny * y)) % 2).astype(np.float32)
    else:
        pattern = _periodic_noise(rng, height, width, 40)
    value = 0.6 * noise / noise.max() + 0.4 * pattern
    value = (value - value.min()) / max(float(np.ptp(value)), 1e-6)
    low, high = (np.array(c, dtype=np.float32) for c in palette)
    return (low + value[..., None] * (high - low)).astype(np.uint8)
