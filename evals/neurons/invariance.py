"""Invariance curves: a unit's mean response as the cat face is scaled, shifted, rotated.

The synthetic source draws the face with exact control of its size, position and angle
(`data_pipeline.drawing.draw_cat_face` on `data_pipeline.synth.Scene` backgrounds, the
same cluttered scenes as `synth:cat`), so each curve varies one of them with the others
held at the reference pose (head radius 0.2 of the side, centred, upright). Every point
averages the same backgrounds (paired), and the face-free response on those backgrounds
is the baseline the curves sit above or not. A cat detector (Le et al. 2012, fig. 4)
keeps a high response over a range of scales and shifts and falls off with rotation.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw

from evals.neurons.stimulus import reduce_units

REFERENCE = {"scale": 0.2, "shift_x": 0.0, "shift_y": 0.0, "rotation": 0.0}
SWEEPS = {
    "scale": [0.06, 0.09, 0.12, 0.15, 0.2, 0.24, 0.28, 0.32, 0.36],
    "shift_x": [-0.3, -0.225, -0.15, -0.075, 0.0, 0.075, 0.15, 0.225, 0.3],
    "shift_y": [-0.3, -0.225, -0.15, -0.075, 0.0, 0.075, 0.15, 0.225, 0.3],
    "rotation": [-180, -150, -120, -90, -60, -30, 0, 30, 60, 90, 120, 150, 180],
}
UNITS = {
    "scale": "head radius / image side",
    "shift_x": "centre offset / width",
    "shift_y": "centre offset / height",
    "rotation": "degrees, clockwise",
}
BACKGROUND_SEED = 7 * 2**40  # far from the clips' (< 2**31) and the eval stills' seeds


def backgrounds(size: int, n: int, seed: int = 0) -> list[np.ndarray]:
    """n face-free cluttered scenes (uint8 (size, size, 3)), as `synth:cat` draws them."""
    from data_pipeline.synth import Scene

    return [
        Scene(size, size, 1, BACKGROUND_SEED + seed * 4096 + i, concept=False).render(0)[0]
        for i in range(n)
    ]


def render_face(
    background: np.ndarray,
    *,
    scale: float,
    shift_x: float,
    shift_y: float,
    rotation: float,
    color_seed: int,
) -> np.ndarray:
    """`background` with a cat face of head radius `scale` x side, centred at the image
    centre moved by (shift_x, shift_y) x (width, height), rotated by `rotation` degrees."""
    from data_pipeline.drawing import CatColors, draw_cat_face

    height, width = background.shape[:2]
    image = Image.fromarray(background.copy())
    colors = CatColors.random(np.random.default_rng(color_seed))
    cx, cy = width * (0.5 + shift_x), height * (0.5 + shift_y)
    draw_cat_face(ImageDraw.Draw(image), cx, cy, scale * min(width, height), rotation, colors)
    return np.asarray(image)


def _conditions() -> Iterator[tuple[str, int, dict]]:
    for sweep, values in SWEEPS.items():
        for j, value in enumerate(values):
            yield sweep, j, {**REFERENCE, sweep: float(value)}


def invariance_curves(
    model: torch.nn.Module,
    preprocess: dict,
    units: dict[str, int],
    *,
    size: int = 64,
    reduce: str = "max",
    n_backgrounds: int = 16,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> dict[str, dict]:
    """For each layer -> unit of `units`: {"unit", "baseline": {mean, sem}, "curves":
    {sweep: {"x", "mean", "sem", "unit_of_x"}}}, responses reduced as the analysis was."""
    from data_pipeline.images import decoder_for, normalizer_for, prepare_array

    decoder, normalize = decoder_for(preprocess), normalizer_for(preprocess)
    scenes = backgrounds(size, n_backgrounds, seed)
    images: list[np.ndarray] = []
    tags: list[tuple[str, int]] = []
    for b, scene in enumerate(scenes):
        images.append(scene)
        tags.append(("baseline", 0))
        for sweep, j, pose in _conditions():
            images.append(render_face(scene, color_seed=BACKGROUND_SEED + b, **pose))
            tags.append((sweep, j))
    model = model.eval().to(device)
    responses = {layer: [] for layer in units}
    index = {layer: torch.tensor([unit]) for layer, unit in units.items()}
    for start in range(0, len(images), batch_size):
        chunk = [
            prepare_array(im, decoder, "invariance") for im in images[start : start + batch_size]
        ]
        x = normalize(torch.from_numpy(np.stack(chunk))).to(device)
        with torch.no_grad():
            feats = model.features(x)
        for layer in units:
            reduced = reduce_units(feats[layer], reduce)
            picked = reduced[:, index[layer].to(reduced.device)].squeeze(1)
            responses[layer].append(picked.float().cpu().numpy())
    out: dict[str, dict] = {}
    for layer, unit in units.items():
        values = np.concatenate(responses[layer])
        grouped: dict[tuple[str, int], list[float]] = {}
        for tag, value in zip(tags, values.tolist(), strict=True):
            grouped.setdefault(tag, []).append(value)

        def stats(samples: list[float]) -> tuple[float, float]:
            a = np.asarray(samples)
            return float(a.mean()), float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else 0.0

        base_mean, base_sem = stats(grouped[("baseline", 0)])
        curves = {}
        for sweep, xs in SWEEPS.items():
            pairs = [stats(grouped[(sweep, j)]) for j in range(len(xs))]
            curves[sweep] = {
                "x": [float(v) for v in xs],
                "mean": [p[0] for p in pairs],
                "sem": [p[1] for p in pairs],
                "unit_of_x": UNITS[sweep],
            }
        out[layer] = {
            "unit": int(unit),
            "n_backgrounds": n_backgrounds,
            "baseline": {"mean": base_mean, "sem": base_sem},
            "curves": curves,
        }
    return out
