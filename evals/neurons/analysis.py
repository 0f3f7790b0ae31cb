"""From streamed statistics and concept scores to metrics.json, PNG grids and TensorBoard.

`catneuron neurons` (evals.neurons) computes; this module assembles: which units each
layer shows, their top inputs fetched back by key with the receptive field at the
argmax outlined, the optimal stimuli of the top units beside their best real inputs,
the invariance curves of a `synth:cat` concept's best units, and the one dict that
metrics.json holds and the HTML page is rendered from.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from evals.io import png_bytes
from evals.neurons.report import (
    layer_grid,
    render_html,
    stimulus_image,
    unit_strip,
)

RANKED = 20  # units listed in each layer's selectivity ranking
HISTOGRAMS = 4  # best units whose concept / not-concept histograms are drawn


def _finite(values: np.ndarray) -> list:
    return [None if not math.isfinite(v) else float(v) for v in np.asarray(values, float).tolist()]


def _shown_units(stats, scores, show: int) -> tuple[list[int], str]:
    dead = stats.dead()
    if scores is not None:
        order = [int(u) for u in scores["trained"].ranking()]
        text = "Units in order of selectivity (selection half)"
    else:
        best = stats.top_values[:, 0].cpu().numpy()
        order = [int(u) for u in np.lexsort((np.arange(len(best)), -best))]
        text = "Units in order of their largest activation"
    live = [u for u in order if not dead[u]]
    return (live or order)[:show], text + ", dead units left out"


def analyse(
    args: argparse.Namespace, source, dataset, layers: list[str], stats: dict, spatial: dict, scores
) -> tuple[dict, dict[str, bytes], dict[str, dict[str, np.ndarray]]]:
    """(metrics, PNG files by name, layer -> {tag: HWC uint8} for TensorBoard)."""
    from data_pipeline.images import normalizer_for
    from evals.features.extractor import resolve_device
    from evals.neurons.panels import stimuli
    from evals.neurons.selectivity import compare
    from evals.neurons.stimulus import input_shape_of, receptive_fields, unit_values
    from evals.neurons.topk import KeyIndex

    index = KeyIndex(dataset.keys)
    device = resolve_device(args.device)
    model = source.model.eval().to(device)
    preprocess = source.preprocess
    shape = input_shape_of(preprocess)
    concept_layers = scores["layers"] if scores else {}
    shown = {
        name: _shown_units(stats[name], concept_layers.get(name), args.show) for name in layers
    }
    stimulus_units = {}
    for name in layers:
        units, _ = shown[name]
        stimulus_units[name] = units[: args.stimulus_units]
    # Every image the report needs, fetched in one pass (shards are read once).
    wanted = set()
    for name in layers:
        ids = stats[name].top_ids.cpu().numpy()
        for unit in shown[name][0]:
            wanted.update(index.key(i) for i in ids[unit] if i < len(index))
    pictures = dataset.images(sorted(wanted), preprocess)
    normalize = normalizer_for(preprocess)
    metrics: dict = {"headline": {}, "summary": {}, "layers": {}}
    images: dict[str, bytes] = {}
    grids: dict[str, dict[str, np.ndarray]] = {}
    for name in layers:
        st = stats[name]
        summary = st.summary()
        top_values = st.top_values.cpu().numpy()
        top_ids = st.top_ids.cpu().numpy()
        top_locs = st.top_locs.cpu().numpy()
        valid = top_ids < len(index)
        units, order_text = shown[name]
        boxes = {}
        if spatial[name]:
            locations = [tuple(top_locs[u, j]) for u in units for j in range(st.k) if valid[u, j]]
            try:
                boxes = receptive_fields(model, name, locations, shape, device=device)
            except RuntimeError:
                boxes = {}
        strips, cells = [], []
        for unit in units:
            keys = [index.key(i) for i in top_ids[unit][valid[unit]]]
            unit_boxes = [
                boxes.get(tuple(int(v) for v in top_locs[unit, j])) for j in range(len(keys))
            ]
            values = top_values[unit][: len(keys)].tolist()
            strip = unit_strip([pictures[k] for k in keys], unit_boxes, values, f"u{unit}")
            file = f"unit_{name}_{unit}.png"
            images[file] = png_bytes(strip)
            strips.append(strip)
            edges, counts = st.histogram(unit)
            cells.append(
                {
                    "unit": unit,
                    "file": file,
                    "keys": keys,
                    "values": values,
                    "boxes": [list(b) if b else None for b in unit_boxes],
                    "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
                }
            )
        grid = np.asarray(layer_grid(strips)) if strips else np.zeros((8, 8, 3), np.uint8)
        images[f"grid_{name}.png"] = png_bytes(grid)
        grids[name] = {"top_inputs": grid}
        dead = np.flatnonzero(summary["dead"]).tolist()
        layer = {
            "units": st.units,
            "map_size": spatial[name],
            "inputs": st.count,
            "top_k": st.k,
            "dead": {"count": len(dead), "fraction": len(dead) / max(st.units, 1), "units": dead},
            "shown_order": order_text,
            "grid_file": f"grid_{name}.png",
            "shown": cells,
        }
        # Optimal stimuli of the top units, on the sphere of their best real input's norm.
        chosen = [u for u in stimulus_units[name] if valid[u, 0]]
        if chosen:
            best_keys = [index.key(top_ids[u, 0]) for u in chosen]
            real = normalize(torch.from_numpy(np.stack([pictures[k] for k in best_keys])))
            real = real.to(device)
            unit_index = torch.tensor(chosen, device=device)
            try:
                with torch.no_grad():
                    real_values = unit_values(model, name, real, unit_index, args.reduce)
                result = stimuli(model, name, chosen, shape, real, args, device)
            except RuntimeError as e:
                layer["stimulus_note"] = f"no optimal stimulus: {str(e).splitlines()[0]}"
            else:
                entries, pics = [], []
                for i, unit in enumerate(chosen):
                    picture = stimulus_image(result.images[i].detach().cpu().numpy())
                    file = f"stimulus_{name}_{unit}.png"
                    images[file] = png_bytes(
                        Image.fromarray(picture).resize((96, 96), Image.NEAREST)
                    )
                    pics.append(picture)
                    entries.append(
                        {
                            "unit": unit,
                            "file": file,
                            "activation": float(result.activation[i]),
                            "start_activation": float(result.start_activation[i]),
                            "best_real_activation": float(real_values[i]),
                            "best_real_key": best_keys[i],
                            "radius": float(result.radius[i]),
                            "norm": float(result.images[i].norm()),
                            "steps": result.steps,
                        }
                    )
                layer["stimuli"] = entries
                grids[name]["stimuli"] = np.concatenate(pics, axis=1)
        layer["per_unit"] = {
            "mean": _finite(summary["mean"]),
            "min": _finite(summary["min"]),
            "max": _finite(summary["max"]),
            "active_fraction": _finite(summary["active_fraction"]),
            "q05": _finite(summary["q05"]),
            "q50": _finite(summary["q50"]),
            "q95": _finite(summary["q95"]),
            "top_keys": [[index.key(i) for i in row[row < len(index)]] for row in top_ids],
            "top_values": [_finite(row[ok]) for row, ok in zip(top_values, valid, strict=True)],
            "top_locs": [row[ok].tolist() for row, ok in zip(top_locs, valid, strict=True)]
            if spatial[name]
            else None,
        }
        if name in concept_layers:
            c = concept_layers[name]
            trained, random = c["trained"], c["random"]
            layer["selectivity"] = compare(trained, random)
            layer["ranking"] = [
                {
                    "unit": int(u),
                    "heldout": float(trained.heldout[u]),
                    "auroc": float(trained.auroc[u]),
                    "le": float(trained.le[u]),
                    "select_accuracy": float(trained.select_accuracy[u]),
                    "threshold": float(trained.threshold[u]),
                    "sign": int(trained.sign[u]),
                }
                for u in trained.ranking()[:RANKED]
            ]
            layer["histograms"] = []
            for u in trained.ranking()[:HISTOGRAMS]:
                v = c["values"][:, u]
                edges = np.linspace(v.min(), v.max() if v.max() > v.min() else v.min() + 1e-6, 25)
                layer["histograms"].append(
                    {
                        "unit": int(u),
                        "edges": edges.tolist(),
                        "positive": np.histogram(v[c["labels"] == 1], edges)[0].tolist(),
                        "negative": np.histogram(v[c["labels"] == 0], edges)[0].tolist(),
                    }
                )
            layer["per_unit"]["selectivity"] = trained.per_unit()
            layer["per_unit"]["random_selectivity"] = random.per_unit()
        metrics["layers"][name] = layer
    if scores:
        from evals.neurons.groups import groups_summary
        from evals.neurons.panels import headline_panels, unit_index

        _invariance(args, model, preprocess, scores, metrics, device)
        metrics["headline"] = _headline(scores, metrics)
        grouped = groups_summary(scores["layers"])
        if grouped:
            metrics["groups"] = grouped
        metrics["panels"], files = headline_panels(args, source, scores, device)
        images.update(files)
        metrics["index"], sprites = unit_index(scores, preprocess)
        images.update(sprites)
    else:
        del metrics["headline"]
    metrics["summary"] = {
        "source": source.name,
        "export": str(source.path) if source.path else None,
        "model": (source.spec or {}).get("name"),
        "data": dataset.spec,
        "concept": args.concept,
        "positive": scores["positive"] if scores else None,
        "reduce": args.reduce,
        "top_k": args.top,
        "n_inputs": len(dataset),
        "n_concept": len(scores["dataset"]) if scores else None,
        "layers": layers,
        "random_seed": args.random_seed,
        "split_seed": args.split_seed,
    }
    return metrics, images, grids


def _invariance(args, model, preprocess, scores, metrics, device) -> None:
    from evals.features.sources import synth_size
    from evals.neurons.invariance import invariance_curves

    size = synth_size(args.concept)
    if size is None:
        return
    units = {name: int(c["trained"].best_unit) for name, c in scores["layers"].items()}
    curves = invariance_curves(
        model, preprocess, units, size=size, reduce=args.reduce, device=device
    )
    for name, curve in curves.items():
        metrics["layers"][name]["invariance"] = curve


def _headline(scores: dict, metrics: dict) -> dict:
    """The best layer's best unit, both picked on the selection half."""
    from evals.neurons.selectivity import best_layer

    layers = scores["layers"]
    best = best_layer({name: layer["trained"] for name, layer in layers.items()})
    trained, random = layers[best]["trained"], layers[best]["random"]
    unit = trained.best_unit
    return {
        "layer": best,
        "unit": f"{best} #{unit}",
        "unit_index": int(unit),
        "heldout": float(trained.heldout[unit]),
        "auroc": float(trained.auroc[unit]),
        "le": float(trained.le[unit]),
        "le_best": trained.le_best,
        "random_heldout": random.best_heldout,
        "random_auroc": random.best_auroc,
        "random_le": random.le_best,
        "chance": trained.chance,
        "n_test": trained.n_test,
        "verdict": metrics["layers"][best]["selectivity"]["verdict"]["heldout"],
    }


def write_outputs(out: Path, metrics: dict, images: dict[str, bytes]) -> None:
    """metrics.json, report.html and the PNGs, in a temporary directory renamed to `out`."""
    from evals.io import build_dir, replace_dir, write_json

    out = Path(out)
    tmp = build_dir(out, "tmp")
    for file, data in images.items():  # per-unit strips live in the page only
        if not file.startswith("unit_"):
            (tmp / file).write_bytes(data)
    write_json(tmp / "metrics.json", metrics, indent=1)
    (tmp / "report.html").write_text(render_html(metrics, images))
    replace_dir(tmp, out)


def write_tensorboard(
    tb_dir: Path, step: int, metrics: dict, grids: dict[str, dict[str, np.ndarray]]
) -> None:
    """`eval/neurons/<layer>/<figure>` scalars and image grids at the export's step."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tb_dir))
    try:
        for name, layer in metrics["layers"].items():
            prefix = f"eval/neurons/{name}"
            writer.add_scalar(f"{prefix}/dead_fraction", layer["dead"]["fraction"], step)
            sel = layer.get("selectivity")
            if sel:
                t, r = sel["trained"], sel.get("random", {})
                for figure in ("best_heldout", "best_auroc", "le_best", "chance"):
                    writer.add_scalar(f"{prefix}/{figure}", t[figure], step)
                for figure in ("best_heldout", "best_auroc", "le_best"):
                    if figure in r:
                        writer.add_scalar(f"{prefix}/random_{figure}", r[figure], step)
            for tag, image in grids.get(name, {}).items():
                writer.add_image(f"{prefix}/{tag}", image, step, dataformats="HWC")
    finally:
        writer.close()
