"""The sections of `catneuron report` below the verdict: figures built from a run's files.

Each `collect_*` function returns plain JSON (it goes into RUN/metrics.json, so every
number on the page has a key there) or None when the run lacks what it needs; the
matching `*_html` draws it. Nothing here needs a GPU or the model code: filters are
read from the export's safetensors file, probe intervals are Wilson 95% intervals.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

Z95 = 1.959964


def wilson(p: float, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy p measured on n images."""
    if not n or p is None or not math.isfinite(p):
        return (float("nan"), float("nan"))
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def collect_probe_table(probe: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """layer -> {source: {top1, lo, hi, key}} with n_test, from a probe metrics.json."""
    sources = probe.get("sources") or {}
    n = int((probe.get("data") or {}).get("n_test") or 0)
    export = (sources.get("export") or {}).get("layers") or {}
    if not export:
        return None

    def cell(src: str, layer: str) -> dict | None:
        top1 = (((sources.get(src) or {}).get("layers") or {}).get(layer) or {}).get("probe", {})
        top1 = top1.get("top1") if isinstance(top1, dict) else None
        if top1 is None:
            return None
        lo, hi = wilson(top1, n)
        key = f"{kind}/metrics/sources/{src}/layers/{layer}/probe/top1"
        return {"top1": top1, "lo": lo, "hi": hi, "key": key}

    pixel_layers = list((sources.get("pixels") or {}).get("layers") or {})
    chance = (probe.get("chance") or {}).get("top1")
    rows = {}
    for layer in export:
        rows[layer] = {
            "trained": cell("export", layer),
            "random_init": cell("random_init", layer),
            "raw_pixels": cell("pixels", pixel_layers[0]) if pixel_layers else None,
            "chance": {"top1": chance, "key": f"{kind}/metrics/chance/top1"}
            if chance is not None
            else None,
        }
    return {"n_test": n, "layers": rows}


def probe_table_html(task: str, table: dict[str, Any], fig) -> str:
    """`fig(*path)` tags a number with its key path (relative to this table)."""
    head = "".join(
        f"<th>{t}</th>" for t in ("layer", "trained", "random init", "raw pixels", "chance")
    )
    body = []
    for layer, row in table["layers"].items():
        cells = [f"<td class='l'>{html.escape(str(layer))}</td>"]
        best = max((c["top1"] for c in row.values() if c), default=None)
        for src in ("trained", "random_init", "raw_pixels", "chance"):
            c = row.get(src)
            if not c:
                cells.append("<td>-</td>")
                continue
            interval = (
                f" <span class='ci'>[{fig('layers', layer, src, 'lo')}, "
                f"{fig('layers', layer, src, 'hi')}]</span>"
                if "lo" in c
                else ""
            )
            mark = " class='top'" if c["top1"] == best and src != "chance" else ""
            cells.append(
                f"<td{mark} title='{c['key']}'>{fig('layers', layer, src, 'top1')}{interval}</td>"
            )
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f"<h3>{html.escape(task)}: top-1 on {fig('n_test')} held-out images, [95% interval]</h3>"
        f"<table class='probe'><tr>{head}</tr>{''.join(body)}</table>"
    )


def collect_label_fraction(probe: dict[str, Any]) -> dict[str, Any] | None:
    lf = probe.get("label_fraction")
    if not lf or not lf.get("curves"):
        return None
    return {"layer": lf.get("layer"), "curves": lf["curves"]}


def label_fraction_svg(lf: dict[str, Any], width: int = 420, height: int = 220) -> str:
    """Top-1 against the share of training labels (log x), mean +- std over seeds."""
    names = {"export": "trained", "random_init": "random init", "pixels": "raw pixels"}
    colours = {"export": "#2e7d32", "random_init": "#d62728", "pixels": "#1f77b4"}
    points = [
        (float(f), v["mean"], v.get("std") or 0.0, src)
        for src, curve in lf["curves"].items()
        for f, v in curve.items()
        if v and v.get("mean") is not None
    ]
    if not points:
        return "<p class='missing'>no label-fraction values</p>"
    xs = [math.log10(f) for f, *_ in points if f > 0]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0 = min(m - s for _, m, s, _ in points)
    y1 = max(m + s for _, m, s, _ in points)
    y0, y1 = y0 - 0.01, max(y1 + 0.01, y0 + 0.03)
    left, right, top, bottom = 44, 90, 10, 28

    def px(f: float) -> float:
        return left + (math.log10(f) - x0) / (x1 - x0) * (width - left - right)

    def py(v: float) -> float:
        return top + (1 - (v - y0) / (y1 - y0)) * (height - top - bottom)

    out = [f'<svg class="lf" width="{width}" height="{height}" role="img">']
    out.append(
        f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
        'fill="none" stroke="#999"/>'
    )
    for v in (y0, (y0 + y1) / 2, y1):
        out.append(
            f'<text x="{left - 4}" y="{py(v) + 4:.1f}" font-size="10" text-anchor="end">{v:.2f}</text>'
        )
    for i, (src, curve) in enumerate(lf["curves"].items()):
        pts = sorted((float(f), v["mean"], v.get("std") or 0.0) for f, v in curve.items() if v)
        colour = colours.get(src, "#555")
        out.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
            + " ".join(f"{px(f):.1f},{py(m):.1f}" for f, m, _ in pts)
            + '"/>'
        )
        for f, m, s in pts:
            out.append(
                f'<line x1="{px(f):.1f}" x2="{px(f):.1f}" y1="{py(m - s):.1f}" y2="{py(m + s):.1f}" stroke="{colour}"/>'
            )
        out.append(
            f'<text x="{width - right + 6}" y="{top + 14 + 14 * i}" font-size="11" fill="{colour}">'
            f"{names.get(src, src)}</text>"
        )
    for f in sorted({f for f, *_ in points}):
        out.append(
            f'<text x="{px(f):.1f}" y="{height - 10}" font-size="10" text-anchor="middle">{f:g}</text>'
        )
    out.append(
        f'<text x="{(left + width - right) / 2}" y="{height}" font-size="10" text-anchor="middle">'
        "share of training labels (log scale)</text></svg>"
    )
    return "".join(out)


def first_layer_filters(run: Path, export: dict[str, Any] | None) -> tuple[dict, bytes] | None:
    """({"tensor", "shown", "units", "tile"}, PNG) of the export's first-layer weights as a
    square grid, each filter scaled to its own range: a conv kernel (out, in, kh, kw), or
    a dense row reshaped to the input image when its length is the input's size."""
    if not export:
        return None
    path = run / export["path"] / "model.safetensors"
    spec_path = run / export["path"] / "model.json"
    if not path.is_file() or not spec_path.is_file():
        return None
    import numpy as np
    from safetensors.numpy import load_file

    from evals.io import png_bytes

    spec = json.loads(spec_path.read_text())
    pre = spec.get("preprocess") or {}
    side = int(pre.get("crop") or pre.get("resize") or 0)
    shape = (spec.get("kwargs") or {}).get("input_shape")
    channels_options = [shape] if shape else []
    if side:
        channels_options += [[1 if pre.get("grayscale") else 3, side, side]]
    weights = load_file(str(path))
    chosen = None
    for name, w in weights.items():  # safetensors keeps the module order
        if w.ndim == 4 and w.shape[1] in (1, 3) and "decoder" not in name:
            chosen = (name, w)
            break
        if w.ndim == 2 and "decoder" not in name:
            for c, h, wd in (tuple(s) for s in channels_options):
                if w.shape[1] == c * h * wd:
                    chosen = (name, w.reshape(w.shape[0], c, h, wd))
                    break
            if chosen:
                break
    if chosen is None:
        return None
    name, w = chosen
    n = min(len(w), 256)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    k = w.shape[-1]
    scale = max(1, 48 // k)
    tile = k * scale
    gap = 2
    grid = np.full((rows * (tile + gap), cols * (tile + gap), 3), 255, np.uint8)
    for i in range(n):
        f = w[i].astype(np.float64)
        f = (f - f.min()) / max(f.max() - f.min(), 1e-12)
        f = np.moveaxis(f, 0, -1)
        f = np.repeat(f, 3, axis=-1) if f.shape[-1] == 1 else f
        f = np.kron(f, np.ones((scale, scale, 1)))
        r, c = divmod(i, cols)
        grid[
            r * (tile + gap) : r * (tile + gap) + tile, c * (tile + gap) : c * (tile + gap) + tile
        ] = np.round(255 * f).astype(np.uint8)
    info = {
        "tensor": name,
        "shown": n,
        "units": int(len(w)),
        "kernel": [int(s) for s in w.shape[1:]],
    }
    return info, png_bytes(grid)


def find_ablation(run: Path) -> tuple[Path, list[dict]] | None:
    """ablation.json beside the run, in the run, or in the demo folder above it."""
    for path in (run / "ablation.json", run / "ablation" / "ablation.json",
                 run.parent.parent / "ablation" / "ablation.json"):  # fmt: skip
        if path.is_file():
            try:
                rows = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue
            if isinstance(rows, list) and rows:
                return path, rows
    return None


def ablation_html(rows: list[dict], fig) -> str:
    head = (
        "<tr><th class='l'>variant</th><th class='l'>layer</th><th>trained: Le / held-out / AUROC</th>"
        "<th>random weights: Le / held-out / AUROC</th><th>chance</th></tr>"
    )
    body = []
    for i, r in enumerate(rows):
        t, z = r.get("trained") or {}, r.get("random") or {}

        def three(side: str, d: dict, i: int = i) -> str:
            return " / ".join(
                fig(i, side, k) if isinstance(d.get(k), (int, float)) else "-"
                for k in ("le", "heldout", "auroc")
            )

        chance = fig(i, "chance") if isinstance(r.get("chance"), (int, float)) else "-"
        body.append(
            f"<tr><td class='l'>{html.escape(str(r.get('name', i)))}</td>"
            f"<td class='l'>{html.escape(str(t.get('best_layer', '')))}</td>"
            f"<td>{three('trained', t)}</td><td>{three('random', z)}</td><td>{chance}</td></tr>"
        )
    return f"<table class='ablation'>{head}{''.join(body)}</table>"
