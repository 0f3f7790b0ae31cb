"""The evidence behind the headline unit, and the per-unit index of every layer.

`headline_panels` builds, for the best trained unit and the best unit of the same
architecture with random weights (both picked on the selection half), what a reader
needs to believe or doubt it: its top 16 held-out inputs (labelled cat / no cat), the
held-out histogram of its responses for each class with the chosen threshold, its
optimal stimulus and its invariance curves. `unit_index` gives every unit of every
layer (trained and random) its scores, a concept histogram and its top inputs on the
concept set, with the thumbnails packed into a few JPEG sprite sheets that the neuron
report loads lazily (so a page stays small with thousands of units).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageDraw

from evals.io import png_bytes

PANEL_TOP = 16  # held-out inputs shown per headline unit (4 x 4)
INDEX_TOP = 8  # concept-set inputs per unit in the index panels
HIST_BINS = 30
SPRITE_THUMB = 48
SPRITE_COLUMNS = 16
SPRITE_ROWS = 16
CAT, NOT = (40, 160, 60), (200, 50, 50)


def _jpeg(image: Image.Image, quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def top_grid(pictures: list[np.ndarray], labels: list[int], thumb: int = 48) -> Image.Image:
    """A 4-wide grid of inputs, each framed green (concept) or red (not)."""
    columns = 4
    rows = max(1, -(-len(pictures) // columns))
    cell = thumb + 6
    grid = Image.new("RGB", (columns * cell, rows * cell), "white")
    draw = ImageDraw.Draw(grid)
    for i, (picture, label) in enumerate(zip(pictures, labels, strict=True)):
        x, y = (i % columns) * cell, (i // columns) * cell
        draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=CAT if label else NOT)
        rgb = picture if picture.shape[-1] == 3 else np.repeat(picture, 3, axis=-1)
        grid.paste(Image.fromarray(rgb).resize((thumb, thumb), Image.NEAREST), (x + 3, y + 3))
    return grid


def class_histogram(values: np.ndarray, labels: np.ndarray, bins: int = HIST_BINS) -> dict:
    lo, hi = float(values.min()), float(values.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
    return {
        "edges": edges.tolist(),
        "positive": np.histogram(values[labels == 1], edges)[0].tolist(),
        "negative": np.histogram(values[labels == 0], edges)[0].tolist(),
    }


def _best(layers: dict, which: str) -> tuple[str, int]:
    """The layer and unit with the best selection-half accuracy (ties: earlier layer)."""
    names = list(layers)
    name = max(
        names,
        key=lambda n: (
            layers[n][which].select_accuracy[layers[n][which].best_unit],
            -names.index(n),
        ),
    )
    return name, int(layers[name][which].best_unit)


def stimuli(model, layer: str, units: list[int], shape, real: torch.Tensor, args, device):
    """Optimal stimuli of `units` as `catneuron neurons` draws them everywhere (its
    --reduce, --stimulus-steps, --jitter, --random-seed): each on the sphere of the norm of
    its best real input (row of `real`), which stands in where the ascent fails."""
    from evals.neurons.stimulus import optimal_stimulus

    return optimal_stimulus(
        model,
        layer,
        units,
        shape,
        real.flatten(1).norm(dim=1),
        reduce=args.reduce,
        steps=args.stimulus_steps,
        jitter=args.jitter,
        seed=args.random_seed,
        device=device,
        fallback=real,
    )


def _stimulus(model, layer, unit, shape, best_input, args, device) -> tuple[np.ndarray, float]:
    from evals.neurons.report import stimulus_image

    result = stimuli(model, layer, [unit], shape, best_input[None].to(device), args, device)
    return stimulus_image(result.images[0].detach().cpu().numpy()), float(result.activation[0])


def headline_panels(args, source, scores: dict, device) -> tuple[dict, dict[str, bytes]]:
    """({"trained": panel, "random": panel}, PNG files by name) for the two best units."""
    from data_pipeline.images import normalizer_for
    from evals.features.sources import synth_size
    from evals.neurons.stimulus import input_shape_of

    layers, test = scores["layers"], np.asarray(scores["test"])
    keys, dataset = scores["keys"], scores["dataset"]
    preprocess = source.preprocess
    shape = input_shape_of(preprocess)
    normalize = normalizer_for(preprocess)
    size = synth_size(args.concept)
    if size is None and scores.get("positive") == "cat":
        size = int(shape[-1])  # a folder of cat / no_cat stills: the face is drawn the same
    panels, files = {}, {}
    sides = (
        ("trained", source.model, "values"),
        ("random", scores["random_source"].model, "random_values"),
    )
    for side, model, values_key in sides:
        model = model.eval().to(device)
        name, unit = _best(layers, side)
        c = layers[name]
        s = c[side]
        values = np.asarray(c[values_key])[:, unit]
        labels = np.asarray(c["labels"])
        sign = int(s.sign[unit])
        order = test[np.lexsort((test, -sign * values[test]))][:PANEL_TOP]
        top_keys = [keys[i] for i in order]
        pictures = dataset.images(top_keys, preprocess)
        grid = top_grid([pictures[k] for k in top_keys], labels[order].tolist())
        files[f"panel_{side}_top.png"] = png_bytes(grid)
        panel = {
            "layer": name,
            "unit": unit,
            "label": f"{name} #{unit}",
            "heldout": float(s.heldout[unit]),
            "auroc": float(s.auroc[unit]),
            "le": float(s.le[unit]),
            "threshold": float(s.threshold[unit]),
            "sign": sign,
            "chance": s.chance,
            "n_test": s.n_test,
            "top_file": f"panel_{side}_top.png",
            "top_keys": top_keys,
            "top_values": values[order].tolist(),
            "top_labels": labels[order].astype(int).tolist(),
            "top_concept_fraction": float(labels[order].mean()) if len(order) else None,
            "histogram": class_histogram(values[test], labels[test]),
        }
        best = normalize(torch.from_numpy(np.array(pictures[top_keys[0]][None])))[0]
        try:
            picture, activation = _stimulus(model, name, unit, shape, best, args, device)
        except RuntimeError as e:
            panel["stimulus_note"] = f"no optimal stimulus: {str(e).splitlines()[0]}"
        else:
            file = f"panel_{side}_stimulus.png"
            files[file] = png_bytes(Image.fromarray(picture).resize((96, 96), Image.NEAREST))
            panel["stimulus"] = {"file": file, "activation": activation}
        if size is not None:
            from evals.neurons.invariance import invariance_curves

            curves = invariance_curves(
                model, preprocess, {name: unit}, size=size, reduce=args.reduce, device=device
            )
            panel["invariance"] = curves[name]
        panels[side] = panel
    return panels, files


def unit_index(
    scores: dict, preprocess: dict, top: int = INDEX_TOP
) -> tuple[dict, dict[str, bytes]]:
    """layer -> {"trained"/"random": per-unit rows}, plus the JPEG sprite sheets they index.

    Each unit's top inputs are its `top` largest responses on the concept set (in the
    direction its sign says is the concept); every distinct input is drawn once.
    """
    layers, keys, dataset = scores["layers"], scores["keys"], scores["dataset"]
    chosen: dict[tuple[str, str], np.ndarray] = {}
    wanted: set[int] = set()
    for name, c in layers.items():
        for side, values_key in (("trained", "values"), ("random", "random_values")):
            values = np.asarray(c[values_key], dtype=np.float64)
            signed = values * np.asarray(c[side].sign)[None]
            k = min(top, len(values))
            part = np.argpartition(-signed, k - 1, axis=0)[:k].T  # (C, k)
            rows = np.take_along_axis(signed.T, part, 1)
            order = np.argsort(-rows, axis=1, kind="stable")
            chosen[name, side] = np.take_along_axis(part, order, 1)
            wanted.update(chosen[name, side].ravel().tolist())
    sprite_of = {row: i for i, row in enumerate(sorted(wanted))}
    pictures = dataset.images([keys[r] for r in sorted(wanted)], preprocess)
    per_sheet = SPRITE_COLUMNS * SPRITE_ROWS
    files: dict[str, bytes] = {}
    thumbs = sorted(wanted)
    for sheet in range(0, len(thumbs), per_sheet):
        rows = thumbs[sheet : sheet + per_sheet]
        image = Image.new("RGB", (SPRITE_COLUMNS * SPRITE_THUMB, SPRITE_ROWS * SPRITE_THUMB))
        for j, row in enumerate(rows):
            p = pictures[keys[row]]
            p = p if p.shape[-1] == 3 else np.repeat(p, 3, axis=-1)
            tile = Image.fromarray(p).resize((SPRITE_THUMB, SPRITE_THUMB), Image.BILINEAR)
            image.paste(
                tile, ((j % SPRITE_COLUMNS) * SPRITE_THUMB, (j // SPRITE_COLUMNS) * SPRITE_THUMB)
            )
        files[f"sprites_{sheet // per_sheet}.jpg"] = _jpeg(image)
    index: dict = {
        "sprite": {"thumb": SPRITE_THUMB, "columns": SPRITE_COLUMNS, "per_sheet": per_sheet},
        "layers": {},
    }
    for name, c in layers.items():
        labels = np.asarray(c["labels"])
        entry = {}
        for side, values_key in (("trained", "values"), ("random", "random_values")):
            s = c[side]
            values = np.asarray(c[values_key], dtype=np.float64)
            lo, hi = values.min(0), values.max(0)
            hi = np.where(hi > lo, hi, lo + 1e-6)
            bins = np.clip(((values - lo) / (hi - lo) * 20).astype(int), 0, 19)
            pos = np.stack(
                [np.bincount(bins[labels == 1, u], minlength=20) for u in range(values.shape[1])]
            )
            neg = np.stack(
                [np.bincount(bins[labels == 0, u], minlength=20) for u in range(values.shape[1])]
            )
            top_rows = chosen[name, side]
            entry[side] = {
                "heldout": np.round(s.heldout, 4).tolist(),
                "auroc": np.round(np.nan_to_num(s.auroc, nan=0.5), 4).tolist(),
                "le": np.round(s.le, 4).tolist(),
                "threshold": s.threshold.astype(float).round(5).tolist(),
                "sign": s.sign.astype(int).tolist(),
                "range": [lo.round(5).tolist(), hi.round(5).tolist()],
                "hist_pos": pos.tolist(),
                "hist_neg": neg.tolist(),
                "top": [[sprite_of[int(r)] for r in row] for row in top_rows],
                "top_values": np.round(np.take_along_axis(values, top_rows.T, 0).T, 4).tolist(),
                "top_labels": labels[top_rows].astype(int).tolist(),
            }
        index["layers"][name] = entry
    return index, files
