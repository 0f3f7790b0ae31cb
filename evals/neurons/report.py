"""The neuron report: PNG grids of top inputs and one self-contained static HTML page.

`unit_strip` and `layer_grid` draw the pictures (PIL, no plotting library): per unit its
top-K inputs, as the model saw them, with the receptive field at the unit's maximum
outlined in red, and the activation under each. `render_html(metrics, images)` writes
the page from metrics.json (every number on it comes from there) and the PNG bytes,
embedded as base64 data URIs, curves and histograms as inline SVG: first the headline
unit beside the best random-weights unit (`unit_panel`, also used by `catneuron
report`), then a sortable index of every unit (trained and random weights in one table)
whose rows open a panel drawn by a small inline script from the embedded index, with
the top inputs cut from JPEG sprite sheets beside the page (loaded only when a panel
opens), then every layer's raw figures in collapsed sections. No external URL.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from evals.neurons.index import INDEX_STYLE, index_section

Box = tuple[int, int, int, int]
THUMB = 64
LABEL_WIDTH = 44
CAPTION = 12


def _thumb(image: np.ndarray, box: Box | None, size: int) -> Image.Image:
    """The image scaled to size x size (nearest, so pixels stay honest), the box outlined."""
    pil = Image.fromarray(image if image.shape[-1] == 3 else np.repeat(image, 3, axis=-1))
    height, width = image.shape[:2]
    pil = pil.resize((size, size), Image.NEAREST)
    if box is not None:
        sx, sy = size / width, size / height
        x0, y0, x1, y1 = box
        ImageDraw.Draw(pil).rectangle(
            [x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1], outline=(255, 32, 32), width=2
        )
    return pil


def unit_strip(
    images: Sequence[np.ndarray],
    boxes: Sequence[Box | None],
    values: Sequence[float],
    label: str,
    *,
    thumb: int = THUMB,
) -> Image.Image:
    """One row: `label`, then each input (box outlined) with its activation under it."""
    strip = Image.new("RGB", (LABEL_WIDTH + len(images) * (thumb + 2), thumb + CAPTION), "white")
    draw = ImageDraw.Draw(strip)
    draw.text((2, thumb // 2 - 5), label, fill=(0, 0, 0))
    for i, (image, box, value) in enumerate(zip(images, boxes, values, strict=True)):
        x = LABEL_WIDTH + i * (thumb + 2)
        strip.paste(_thumb(image, box, thumb), (x, 0))
        draw.text((x + 2, thumb), f"{value:.3g}", fill=(60, 60, 60))
    return strip


def layer_grid(strips: Sequence[Image.Image]) -> Image.Image:
    """Unit strips stacked, one row each."""
    width = max(s.width for s in strips)
    grid = Image.new("RGB", (width, sum(s.height for s in strips)), "white")
    y = 0
    for s in strips:
        grid.paste(s, (0, y))
        y += s.height
    return grid


def stimulus_image(x: np.ndarray) -> np.ndarray:
    """A (C, H, W) stimulus as uint8 (H, W, 3), each image stretched to its own range
    (its norm is fixed, not its pixel range)."""
    lo, hi = float(x.min()), float(x.max())
    scaled = (x - lo) / max(hi - lo, 1e-12)
    image = np.round(255 * np.moveaxis(scaled, 0, -1)).astype(np.uint8)
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


# --------------------------------------------------------------------------- HTML


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return _e(value)


def _img(data: bytes, alt: str, cls: str = "") -> str:
    encoded = base64.b64encode(data).decode()
    return f'<img class="{cls}" alt="{_e(alt)}" src="data:image/png;base64,{encoded}">'


def svg_histogram(
    edges: Sequence[float],
    series: dict[str, Sequence[float]],
    *,
    width: int = 260,
    height: int = 90,
    threshold: float | None = None,
) -> str:
    """Overlaid bar histograms on common edges (e.g. positives and negatives), as SVG,
    with the unit's decision threshold as a dark vertical line when given."""
    colors = ["#2e9e44", "#d9534f", "#337ab7"]
    top = max([max(v) if len(v) else 0 for v in series.values()] + [1])
    n = len(edges) - 1
    bar = (width - 20) / max(n, 1)
    parts = [f'<svg class="hist" width="{width}" height="{height + 28}" role="img">']
    for k, (name, counts) in enumerate(series.items()):
        for i, c in enumerate(counts):
            h = (height - 4) * c / top
            parts.append(
                f'<rect x="{10 + i * bar:.1f}" y="{height - h:.1f}" width="{max(bar - 1, 1):.1f}" '
                f'height="{h:.1f}" fill="{colors[k % 3]}" fill-opacity="0.55"/>'
            )
        parts.append(
            f'<text x="{10 + 90 * k}" y="{height + 24}" font-size="10" fill="{colors[k % 3]}">'
            f"{_e(name)}</text>"
        )
    if threshold is not None and edges[-1] > edges[0]:
        x = 10 + (width - 20) * (threshold - edges[0]) / (edges[-1] - edges[0])
        parts.append(
            f'<line class="threshold" x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{height}" '
            'stroke="#222" stroke-width="1.5"/>'
            f'<text x="{min(x + 3, width - 60):.1f}" y="10" font-size="9">threshold {threshold:.3g}</text>'
        )
    parts.append(
        f'<text x="10" y="{height + 11}" font-size="9">{edges[0]:.3g}</text>'
        f'<text x="{width - 40}" y="{height + 11}" font-size="9">{edges[-1]:.3g}</text></svg>'
    )
    return "".join(parts)


def svg_curve(
    xs: Sequence[float],
    means: Sequence[float],
    sems: Sequence[float],
    baseline: float,
    title: str,
    *,
    width: int = 240,
    height: int = 120,
) -> str:
    """A mean curve with +-1 s.e.m. whiskers and the face-free baseline dashed, as SVG."""
    lo = min(min(m - s for m, s in zip(means, sems, strict=True)), baseline)
    hi = max(max(m + s for m, s in zip(means, sems, strict=True)), baseline)
    hi = hi if hi > lo else lo + 1e-6
    x0, x1 = min(xs), max(xs)
    pad = 24

    def px(x: float) -> float:
        return pad + (width - 2 * pad) * (x - x0) / max(x1 - x0, 1e-12)

    def py(y: float) -> float:
        return height - pad - (height - 2 * pad) * (y - lo) / (hi - lo)

    points = " ".join(f"{px(x):.1f},{py(m):.1f}" for x, m in zip(xs, means, strict=True))
    parts = [
        f'<svg class="curve" width="{width}" height="{height}" role="img">',
        f'<text x="{pad}" y="12" font-size="11">{_e(title)}</text>',
        f'<line x1="{pad}" x2="{width - pad}" y1="{py(baseline):.1f}" y2="{py(baseline):.1f}" '
        'stroke="#888" stroke-dasharray="4 3"/>',
        f'<polyline fill="none" stroke="#d9534f" stroke-width="2" points="{points}"/>',
    ]
    for x, m, s in zip(xs, means, sems, strict=True):
        parts.append(
            f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{py(m - s):.1f}" y2="{py(m + s):.1f}" '
            'stroke="#d9534f"/>'
        )
    parts.append(
        f'<text x="2" y="{py(hi) + 4:.1f}" font-size="9">{hi:.3g}</text>'
        f'<text x="2" y="{py(lo):.1f}" font-size="9">{lo:.3g}</text>'
        f'<text x="{pad}" y="{height - 6}" font-size="9">{x0:g}</text>'
        f'<text x="{width - pad - 10}" y="{height - 6}" font-size="9">{x1:g}</text></svg>'
    )
    return "".join(parts)


_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1360px;margin:1.5em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:2px 7px;text-align:right}th{background:#f3f3f3}
td.l,th.l{text-align:left}.good{color:#176e17;font-weight:600}.bad{color:#a33}
.unit{display:inline-block;margin:3px;vertical-align:top}.unit img{display:block}
.unit .acts{font-size:10px;color:#555}.note{color:#555;font-size:13px}
figure{display:inline-block;margin:0.4em;vertical-align:top}figcaption{font-size:12px;color:#555}
.headline{background:#f7f7ee;border:1px solid #ddb;padding:0.6em 1em}
"""


def _verdict_class(text: str) -> str:
    return "good" if text.endswith("above random weights") and "not" not in text else "bad"


def _selectivity_table(layers: dict) -> str:
    rows = []
    for name, layer in layers.items():
        sel = layer.get("selectivity")
        if not sel:
            continue
        t, r = sel["trained"], sel.get("random", {})
        verdict = sel["verdict"]["heldout"]
        rows.append(
            f"<tr><td class='l'>{_e(name)}</td><td>{t['best_unit']}</td>"
            f"<td>{_fmt(t['best_heldout'])}</td><td>{_fmt(r.get('best_heldout', float('nan')))}</td>"
            f"<td>{_fmt(t['best_auroc'])}</td><td>{_fmt(r.get('best_auroc', float('nan')))}</td>"
            f"<td>{_fmt(t['le_best'])}</td><td>{_fmt(r.get('le_best', float('nan')))}</td>"
            f"<td>{_fmt(t['chance'])}</td>"
            f"<td class='l {_verdict_class(verdict)}'>{_e(verdict)}</td></tr>"
        )
    if not rows:
        return ""
    head = (
        "<tr><th class='l'>layer</th><th>best unit</th><th>held-out acc.</th><th>random w.</th>"
        "<th>AUROC</th><th>random w.</th><th>Le et al.</th><th>random w.</th><th>chance</th>"
        "<th class='l'>verdict (held-out)</th></tr>"
    )
    return f"<h2>Selectivity: trained vs random weights</h2><table id='selectivity'>{head}{''.join(rows)}</table>"


def _ranking_table(layer: dict) -> str:
    ranking = layer.get("ranking")
    if not ranking:
        return ""
    head = (
        "<tr><th>rank</th><th>unit</th><th>held-out acc.</th><th>AUROC</th><th>Le et al.</th>"
        "<th>threshold</th><th>sign</th></tr>"
    )
    rows = "".join(
        f"<tr><td>{i + 1}</td><td>{r['unit']}</td><td>{_fmt(r['heldout'])}</td>"
        f"<td>{_fmt(r['auroc'])}</td><td>{_fmt(r['le'])}</td><td>{_fmt(r['threshold'])}</td>"
        f"<td>{'+' if r['sign'] > 0 else '-'}</td></tr>"
        for i, r in enumerate(ranking)
    )
    return f"<table class='ranking'>{head}{rows}</table>"


def _layer_section(name: str, layer: dict, images: dict[str, bytes]) -> str:
    out = [f"<section class='layer' id='layer-{_e(name)}'><h2>Layer {_e(name)}</h2>"]
    dead = layer["dead"]
    shape = f", maps {layer['map_size'][0]}x{layer['map_size'][1]}" if layer.get("map_size") else ""
    out.append(
        f"<p>{layer['units']} units{shape}; <b>{dead['count']} dead</b> (never active or constant)"
        + (f": {_e(', '.join(map(str, dead['units'][:40])))}" if dead["count"] else "")
        + (" ..." if dead["count"] > 40 else "")
        + "</p>"
    )
    if layer.get("selectivity"):
        out.append("<h3>Most selective units (selection half picks, test half scores)</h3>")
        out.append(_ranking_table(layer))
    hists = layer.get("histograms", [])
    if hists:
        out.append("<h3>Responses of the best units: concept vs not</h3>")
        for h in hists:
            svg = svg_histogram(h["edges"], {"concept": h["positive"], "not": h["negative"]})
            out.append(f"<figure>{svg}<figcaption>unit {h['unit']}</figcaption></figure>")
    stimuli = layer.get("stimuli", [])
    if stimuli:
        out.append("<h3>Optimal stimuli (fixed L2 norm, projected gradient ascent)</h3>")
        for s in stimuli:
            image = images.get(s["file"])
            body = _img(image, f"stimulus unit {s['unit']}", "stimulus") if image else ""
            out.append(
                f"<figure>{body}<figcaption>unit {s['unit']}: {_fmt(s['activation'])} "
                f"(best real input {_fmt(s['best_real_activation'])})</figcaption></figure>"
            )
    if layer.get("stimulus_note"):
        out.append(f"<p class='note'>{_e(layer['stimulus_note'])}</p>")
    inv = layer.get("invariance")
    if inv:
        out.append(
            f"<h3>Invariance of unit {inv['unit']} (mean of {inv['n_backgrounds']} scenes; "
            "dashed: the same scenes without a face)</h3>"
        )
        for sweep, c in inv["curves"].items():
            out.append(
                "<figure>"
                + svg_curve(c["x"], c["mean"], c["sem"], inv["baseline"]["mean"], sweep)
                + f"<figcaption>{_e(c['unit_of_x'])}</figcaption></figure>"
            )
    out.append(
        f"<h3>Top {layer['top_k']} inputs of {len(layer['shown'])} units</h3>"
        f"<p class='note'>{_e(layer['shown_order'])}. Red box: the receptive field at the "
        "unit's maximum.</p>"
    )
    out.append(f"<div class='grid' data-layer='{_e(name)}'>")
    for cell in layer["shown"]:
        image = images.get(cell["file"])
        values = " ".join(f"{v:.3g}" for v in cell["values"])
        out.append(
            f"<div class='unit' data-unit='{cell['unit']}'>"
            + (_img(image, f"{name} unit {cell['unit']}") if image else "")
            + f"<div class='acts'>unit {cell['unit']}: {_e(values)}</div></div>"
        )
    out.append("</div></section>")
    return "".join(out)


_PANEL_STYLE = """
.pair{display:flex;gap:14px;align-items:flex-start}.panel{flex:1;border:1px solid #ccc;border-radius:6px;
padding:6px 10px;min-width:0}.panel.trained{border-color:#8a8;background:#fbfffb}.panel h3{margin:2px 0 4px}
.panel .row{display:flex;gap:8px;align-items:flex-start;flex-wrap:wrap}.panel figure{margin:0 4px 4px 0}
.panel .nums{font-size:13px;margin:0 0 4px}.curves{display:flex;gap:2px}
"""


def unit_panel(panel: dict, images: dict[str, bytes], title: str, fig=None) -> str:
    """One unit's evidence: top held-out inputs, histogram with threshold, stimulus,
    invariance curves. `fig(*keys)` renders a number tagged with its metrics key."""
    fig = fig or (lambda *keys: _fmt(_dig(panel, keys)))
    n_cat = sum(panel.get("top_labels", []))
    n_top = len(panel.get("top_labels", []))
    side = "trained" if "trained" in title.lower() else "random"
    out = [
        f"<div class='panel {side}' data-unit='{_e(panel['label'])}'><h3>{_e(title)}: "
        f"{_e(panel['label'])}</h3><p class='nums'>held-out accuracy <b>{fig('heldout')}</b>, "
        f"AUROC <b>{fig('auroc')}</b>, Le et al. {fig('le')} (chance {fig('chance')}, "
        f"{fig('n_test')} held-out images); concept when "
        f"{'above' if panel['sign'] > 0 else 'below'} {fig('threshold')}</p><div class='row'>"
    ]
    image = images.get(panel.get("top_file", ""))
    if image:
        out.append(
            f"<figure>{_img(image, 'top held-out inputs of ' + panel['label'], 'top')}"
            f"<figcaption>top {n_top} held-out inputs: {n_cat} with a cat<br>(green frame: "
            "cat, red: no cat)</figcaption></figure>"
        )
    h = panel.get("histogram")
    if h:
        svg = svg_histogram(
            h["edges"],
            {"cat": h["positive"], "no cat": h["negative"]},
            width=250,
            height=100,
            threshold=panel.get("threshold"),
        )
        out.append(
            f"<figure>{svg}<figcaption>held-out responses, cat vs no cat</figcaption></figure>"
        )
    out.append("</div><div class='row'>")
    stim = panel.get("stimulus")
    if stim and images.get(stim["file"]):
        out.append(
            f"<figure>{_img(images[stim['file']], 'optimal stimulus of ' + panel['label'], 'stimulus')}"
            f"<figcaption>optimal stimulus<br>response {fig('stimulus', 'activation')}</figcaption></figure>"
        )
    elif panel.get("stimulus_note"):
        out.append(f"<p class='note'>{_e(panel['stimulus_note'])}</p>")
    inv = panel.get("invariance")
    if inv:
        out.append(
            f"<div><div class='note'>invariance: mean response over {inv['n_backgrounds']} "
            "scenes as the face moves; dashed: the scenes without a face</div><div class='curves'>"
        )
        for sweep in ("shift_x", "scale", "rotation"):
            c = inv["curves"].get(sweep)
            if c:
                out.append(
                    "<figure>"
                    + svg_curve(
                        c["x"],
                        c["mean"],
                        c["sem"],
                        inv["baseline"]["mean"],
                        sweep,
                        width=150,
                        height=100,
                    )
                    + f"<figcaption>{_e(c['unit_of_x'])}</figcaption></figure>"
                )
        out.append("</div></div>")
    else:
        out.append(
            "<p class='note'>no invariance curves (the concept is not the synthetic cat face)</p>"
        )
    out.append("</div></div>")
    return "".join(out)


def _dig(tree, keys):
    for key in keys:
        tree = tree[key]
    return tree


def headline_pair(metrics: dict, images: dict[str, bytes], fig=None) -> str:
    """The trained headline unit beside the best random-weights unit."""
    panels = metrics.get("panels") or {}
    parts = []
    for side, title in (("trained", "Trained"), ("random", "Random weights (same architecture)")):
        if side in panels:
            f = (lambda *k, s=side: fig(s, *k)) if fig else None
            parts.append(unit_panel(panels[side], images, title, f))
    return f"<div class='pair'>{''.join(parts)}</div>" if parts else ""


def _groups_table(groups: dict | None) -> str:
    """Per layer the best grouped unit (evals.neurons.groups) beside random weights."""
    if not groups:
        return ""
    rows = "".join(
        f"<tr><td>{_e(name)}</td><td>{', '.join(f'#{m}' for m in g['members'])}</td>"
        f"<td>{_fmt(g['heldout'])}</td><td>{_fmt(g['auroc'])}</td>"
        f"<td>{_fmt(g['random_heldout'])}</td><td>{_fmt(g['random_auroc'])}</td></tr>"
        for name, g in groups["layers"].items()
    )
    return (
        "<h2 id='groups'>Grouped units</h2><p class='note'>Each channel pooled with the "
        "channels that fire with it most on the unlabeled data (Coates et al. 2012; the "
        "labels never choose a group), scored like single units; random weights grouped the "
        "same way.</p><table><tr><th>layer</th><th>channels</th><th>held-out</th>"
        "<th>AUROC</th><th>random held-out</th><th>random AUROC</th></tr>"
        f"{rows}</table>"
    )


def render_html(metrics: dict, images: dict[str, bytes]) -> str:
    """The whole page from metrics.json's content and the PNGs it names: the headline
    pair, the sortable index of every unit with its panel, then every layer's raw figures
    (collapsed). Sprite sheets (sprites_*.jpg) sit beside the page and load on demand."""
    summary = metrics["summary"]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>catneuron neurons: {_e(summary['source'])}</title>",
        f"<style>{_STYLE}{_PANEL_STYLE}{INDEX_STYLE}</style>",
        "</head><body><h1>Neuron analysis</h1>",
        f"<p>{_e(summary['source'])} ({_e(summary.get('model', ''))}), top-{summary['top_k']} "
        f"inputs over <b>{summary['n_inputs']}</b> images of <code>{_e(summary['data'])}</code>, "
        f"units reduced over space by <b>{_e(summary['reduce'])}</b>"
        + (f"; concept <code>{_e(summary['concept'])}</code>" if summary.get("concept") else "")
        + ". Every number here is in <code>metrics.json</code>.</p>",
    ]
    head = metrics.get("headline")
    if head:
        parts.append(
            "<div class='headline' id='headline'><b>Best concept unit</b>: "
            f"{_e(head['unit'])}: held-out accuracy "
            f"<b>{_fmt(head['heldout'])}</b> (random weights {_fmt(head['random_heldout'])}, "
            f"chance {_fmt(head['chance'])}), AUROC <b>{_fmt(head['auroc'])}</b> (random "
            f"weights {_fmt(head['random_auroc'])}), Le et al. score {_fmt(head['le'])}. "
            f"<span class='{_verdict_class(head['verdict'])}'>{_e(head['verdict'])}</span>."
            f"{headline_pair(metrics, images)}</div>"
        )
        parts.append(
            "<p class='note'>How to read it: the held-out accuracy picks the unit, its "
            "threshold and sign on one half of the concept set and scores the other half; "
            "AUROC is threshold-free (0.5 is chance); the Le et al. score picks the threshold "
            "on the scored half itself, as the paper did, and is biased upward. A random "
            "network has selective units too: a concept unit is one clearly above the same "
            "architecture with random weights.</p>"
        )
    parts.append(_groups_table(metrics.get("groups")))
    parts.append(index_section(metrics, images))
    parts.append(_selectivity_table(metrics["layers"]))
    for name, layer in metrics["layers"].items():
        parts.append(
            f"<details class='raw'><summary>Layer {_e(name)}: raw figures (rankings, "
            f"histograms, stimuli, top inputs)</summary>{_layer_section(name, layer, images)}</details>"
        )
    parts.append(
        "<script type='application/json' id='metrics-summary'>"
        + json.dumps(summary).replace("<", "\\u003c")
        + "</script></body></html>"
    )
    return "\n".join(parts)
