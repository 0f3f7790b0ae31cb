"""`catneuron report RUN`: one static page (RUN/report.html) that tells a run's whole story.

A newcomer should not have to open TensorBoard, three JSON files and two other HTML pages
to believe a result, so this page gathers them: the run's config, its loss curves (read
back from the TensorBoard events the trainer wrote), the last input/reconstruction and
filter images, the linear-probe table with its baselines and label-fraction curve, and the
neuron report's headline unit, with links to the full probe and neuron reports. Every
figure on the page is also written to RUN/metrics.json (each number in the HTML carries
its key path there, so a test can check that the two agree), and whatever is missing (no
evals yet, no TensorBoard images) is said on the page with the command that makes it.

The page is self-contained (images embedded as data URIs, curves as inline SVG): it opens
from a file, from a CI artifact or a mail attachment, with no network access.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from catneuron import report_parts as parts
from data_pipeline.cli_help import HelpFormatter

REPORT, METRICS = "report.html", "metrics.json"
_EVAL_DIR = re.compile(r"^(probe|probe_shapes|neurons)-(\d+)$")


class ReportError(ValueError):
    """A run directory that cannot be reported on; the message names the path."""


# --------------------------------------------------------------------------- collecting


def read_events(tb_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, bytes]]:
    """Every scalar series and the last image of every image tag in a TensorBoard log dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # size_guidance 0 keeps every event: the default reservoir samples scalars down to 10,000
    # and images down to 4, which would make the curve depend on the sampling.
    accumulator = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    scalars = {
        tag: [(int(e.step), float(e.value)) for e in accumulator.Scalars(tag)]
        for tag in tags.get("scalars", [])
    }
    images = {}
    for tag in tags.get("images", []):
        events = accumulator.Images(tag)
        if events:
            images[tag] = events[-1].encoded_image_string
    return scalars, images


def read_config(run: Path) -> dict[str, Any] | None:
    """The run's full config: RUN/config.json if the demo wrote one, else the latest checkpoint's."""
    saved = run / "config.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    from pretrain import checkpoint

    checkpoints = run / "checkpoints"
    for tag in reversed(checkpoint.list_tags(checkpoints)):
        try:
            return checkpoint.verify(checkpoints, tag).config
        except checkpoint.UnreadableCheckpoint:
            continue
    return None


def latest_export(run: Path) -> tuple[int, dict[str, Any]] | None:
    """(step, model.json) of the newest export of the run, if any."""
    exports = []
    for path in (run / "exports").glob("step_*"):
        spec = path / "model.json"
        if spec.is_file() and path.name.removeprefix("step_").isdigit():
            exports.append((int(path.name.removeprefix("step_")), spec))
    if not exports:
        return None
    step, spec = max(exports)
    return step, json.loads(spec.read_text())


def latest_eval(run: Path, kind: str) -> Path | None:
    """RUN/evals/<kind>-<step>/ with the highest step that holds a metrics.json."""
    found = []
    for path in (run / "evals").glob(f"{kind}-*"):
        match = _EVAL_DIR.match(path.name)
        if match and match.group(1) == kind and (path / METRICS).is_file():
            found.append((int(match.group(2)), path))
    return max(found)[1] if found else None


def training_summary(scalars: dict[str, list[tuple[int, float]]]) -> dict[str, Any]:
    """The figures of the training section: steps, stages, first and last value of each loss."""
    loss = scalars.get("train/loss", [])
    # The trainer logs `stage` at each stage start and with every interval: a stage starts
    # where the value changes.
    starts: list[tuple[int, int]] = []
    for step, value in scalars.get("stage", []):
        if not starts or int(value) != starts[-1][1]:
            starts.append((int(step), int(value)))
    last_step = loss[-1][0] if loss else 0
    stages = []
    for i, (start, stage) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else last_step
        # a loss logged at step s covers the steps up to s, so a stage's are in (start, end]
        in_stage = [v for s, v in loss if start < s <= end]
        stages.append(
            {
                "stage": stage,
                "start_step": start,
                "end_step": end,
                "first_loss": in_stage[0] if in_stage else None,
                "last_loss": in_stage[-1] if in_stage else None,
            }
        )
    final = {tag: series[-1][1] for tag, series in sorted(scalars.items()) if series}
    ips = [v for _, v in scalars.get("perf/images_per_s", [])]
    return {
        "steps": loss[-1][0] if loss else 0,
        "stages": stages,
        "final": final,
        "mean_images_per_s": sum(ips) / len(ips) if ips else None,
    }


def collect(run: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, assets): every figure the page shows, and what it embeds (series, images)."""
    if not run.is_dir():
        raise ReportError(f"{run}: no such run directory")
    tb = run / "tb"
    has_events = tb.is_dir() and any(tb.glob("events.out.tfevents.*"))
    export = latest_export(run)
    if not has_events and export is None:
        raise ReportError(f"{run}: not a run directory (no tb/ events and no exports/)")
    scalars, images = read_events(tb) if has_events else ({}, {})
    metrics: dict[str, Any] = {"run": str(run), "missing": []}
    if export:
        step, spec = export
        metrics["export"] = {
            "step": step,
            "model": spec.get("name"),
            "kwargs": spec.get("kwargs"),
            "stage": spec.get("stage"),
            "path": f"exports/step_{step}",
        }
    else:
        metrics["missing"].append(["export", f"catneuron export {run}"])
    metrics["training"] = training_summary(scalars)
    if not scalars:
        metrics["missing"].append(["training curves (no TensorBoard events)", "catneuron train"])
    assets: dict[str, Any] = {"scalars": scalars, "images": images, "config": read_config(run)}
    for tag in ("images/input_recon", "images/filters"):
        if tag not in images:
            metrics["missing"].append([f"{tag} (no image logged yet)", "logging.image_every"])
    for kind, command in (
        ("probe", f"catneuron probe {run} --train synth:cat --test synth:cat?seed=1"),
        ("neurons", f"catneuron neurons {run} --data synth:cat --concept synth:cat"),
    ):
        directory = latest_eval(run, kind)
        if directory is None:
            metrics["missing"].append([f"{kind} evals", command])
            continue
        metrics[kind] = {
            "dir": os.path.relpath(directory, run),
            "metrics": json.loads((directory / METRICS).read_text()),
        }
        assets[kind] = directory
    shapes = latest_eval(run, "probe_shapes")  # the demo's second probe task, when present
    if shapes is not None:
        metrics["probe_shapes"] = {
            "dir": os.path.relpath(shapes, run),
            "metrics": json.loads((shapes / METRICS).read_text()),
        }
        assets["probe_shapes"] = shapes
    head = metrics.get("neurons", {}).get("metrics", {}).get("headline")
    if head:
        metrics["headline"] = {**head, "scorer": "catneuron neurons", "images": head.get("n_test")}
    grouped = metrics.get("neurons", {}).get("metrics", {}).get("groups", {}).get("best")
    if grouped:
        metrics["grouped_unit"] = grouped
    if probes := probe_headlines(metrics):
        metrics["probe_headline"] = probes
    _collect_figures(run, metrics, assets)
    return metrics, assets


def _collect_figures(run: Path, metrics: dict[str, Any], assets: dict[str, Any]) -> None:
    """Probe tables with intervals, first-layer filters, the headline panels' images and
    the ablation table: each into metrics.json under its own key when the run has it."""
    tables = {}
    for name, kind in (("cat vs no cat", "probe"), ("shape classes", "probe_shapes")):
        if kind in metrics:
            table = parts.collect_probe_table(metrics[kind]["metrics"], kind)
            if table:
                tables[name] = table
    if tables:
        metrics["probe_table"] = tables
    filters = parts.first_layer_filters(run, metrics.get("export"))
    if filters:
        metrics["filters"], assets["filters_png"] = filters
    panels = metrics.get("neurons", {}).get("metrics", {}).get("panels") or {}
    files = {}
    for panel in panels.values():
        for file in (panel.get("top_file"), (panel.get("stimulus") or {}).get("file")):
            if file and (assets["neurons"] / file).is_file():
                files[file] = (assets["neurons"] / file).read_bytes()
    assets["panel_images"] = files
    ablation = parts.find_ablation(run)
    if ablation:
        path, rows = ablation
        metrics["ablation"] = {"path": os.path.relpath(path, run), "rows": rows}


def probe_headlines(metrics: dict[str, Any]) -> dict[str, Any]:
    """Per probe task: top-1 of the export beside random init, raw pixels and chance."""
    out = {}
    for name, kind in (("cat vs no cat", "probe"), ("shape classes", "probe_shapes")):
        head = metrics.get(kind, {}).get("metrics", {}).get("headline") or {}
        if "top1" in head:
            out[name] = {
                "layer": head.get("layer"),
                "top1": head["top1"],
                "random_init": head.get("random_init_top1"),
                "raw_pixels": head.get("pixels_top1"),
                "chance": head.get("chance_top1"),
            }
    return out


# --------------------------------------------------------------------------- rendering


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return html.escape(str(value))


def figure(metrics: dict[str, Any], *path: str | int) -> str:
    """One number of the page, tagged with its key path in metrics.json (`data-key`)."""
    value: Any = metrics
    for key in path:
        value = value[key]
    key = html.escape(json.dumps(list(path)), quote=True)
    return f'<span class="fig" data-key="{key}">{_fmt(value)}</span>'


def svg_curves(
    series: dict[str, list[tuple[int, float]]],
    marks: list[int] = (),
    *,
    width: int = 640,
    height: int = 240,
    log: bool = True,
) -> str:
    """Line chart as inline SVG (no plotting library): one polyline per series, log y-axis
    where every value is positive (losses of greedy stages differ by orders of magnitude),
    dashed vertical lines at `marks` (stage starts)."""
    points = [(s, v) for values in series.values() for s, v in values if math.isfinite(v)]
    if not points:
        return "<p class='missing'>no values</p>"
    log = log and all(v > 0 for _, v in points)

    def ty(v: float) -> float:
        return math.log10(v) if log else v

    xs, ys = [s for s, _ in points], [ty(v) for _, v in points]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(ys)
    y1 = y1 if y1 > y0 else y0 + 1
    left, bottom, top, right = 60, 24, 10, 10

    def px(s: float) -> float:
        return left + (s - x0) / (x1 - x0) * (width - left - right)

    def py(v: float) -> float:
        return top + (1 - (ty(v) - y0) / (y1 - y0)) * (height - top - bottom)

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">']
    parts.append(
        f'<rect x="{left}" y="{top}" width="{width - left - right}" '
        f'height="{height - top - bottom}" fill="none" stroke="#999"/>'
    )
    for mark in marks:
        if x0 <= mark <= x1:
            parts.append(
                f'<line x1="{px(mark):.1f}" x2="{px(mark):.1f}" y1="{top}" y2="{height - bottom}" '
                'stroke="#aaa" stroke-dasharray="4 3"/>'
            )
    for label_y in (y0, (y0 + y1) / 2, y1):
        value = 10**label_y if log else label_y
        y = top + (1 - (label_y - y0) / (y1 - y0)) * (height - top - bottom)
        parts.append(
            f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{value:.3g}</text>'
        )
    for label_x in (x0, x1):
        parts.append(
            f'<text x="{px(label_x):.1f}" y="{height - 6}" font-size="10" text-anchor="middle">{label_x}</text>'
        )
    for i, (name, values) in enumerate(series.items()):
        good = [(s, v) for s, v in values if math.isfinite(v) and (v > 0 or not log)]
        if not good:
            continue
        path = " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in good)
        colour = colours[i % len(colours)]
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>'
        )
        parts.append(
            f'<text x="{width - right - 4}" y="{top + 12 + 12 * i}" font-size="11" '
            f'text-anchor="end" fill="{colour}">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _img(data: bytes, alt: str, width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    encoded = base64.b64encode(data).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}"{size}>'


def _config_text(config: dict[str, Any] | None) -> str:
    if config is None:
        return "<p class='missing'>no config found (no config.json and no readable checkpoint)</p>"
    import yaml

    return f"<pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>"


def _training_section(metrics: dict[str, Any], assets: dict[str, Any]) -> str:
    scalars = assets["scalars"]
    training = metrics["training"]
    out = ["<h2>Training</h2>"]
    if not scalars:
        return out[0] + "<p class='missing'>no TensorBoard events in tb/</p>"
    marks = [s["start_step"] for s in training["stages"]]
    out.append(f"<p>{figure(metrics, 'training', 'steps')} steps")
    if training["mean_images_per_s"] is not None:
        out.append(f", {figure(metrics, 'training', 'mean_images_per_s')} images/s on average")
    out.append(". Dashed lines: greedy stage starts (stage 0, 1, ... left to right).</p>")
    out.append(svg_curves({"train/loss": scalars.get("train/loss", [])}, marks))
    others = {
        t: v
        for t, v in scalars.items()
        if t.startswith("train/") and t not in ("train/loss", "train/lr")
    }
    if others:
        out.append(svg_curves(dict(sorted(others.items())[:6]), marks))
    rows = [
        f"<tr><td>{s['stage']}</td><td>{figure(metrics, 'training', 'stages', i, 'start_step')}"
        f"-{figure(metrics, 'training', 'stages', i, 'end_step')}</td>"
        f"<td>{figure(metrics, 'training', 'stages', i, 'first_loss')}</td>"
        f"<td>{figure(metrics, 'training', 'stages', i, 'last_loss')}</td></tr>"
        for i, s in enumerate(training["stages"])
    ]
    if rows:
        out.append(
            "<table><tr><th>stage</th><th>steps</th><th>first loss</th><th>last loss</th></tr>"
            + "".join(rows)
            + "</table>"
        )
    images = assets["images"]
    if "images/input_recon" in images:
        out.append(
            f"<figure>{_img(images['images/input_recon'], 'images/input_recon', 640)}<figcaption>"
            "Reconstructions (<code>images/input_recon</code>, last logged): pairs of a training "
            "input and the model's reconstruction of it, side by side.</figcaption></figure>"
        )
    if "filters" in metrics:
        out.append(_filters_figure(metrics, assets))
    elif "images/filters" in images:
        out.append(
            f"<figure>{_img(images['images/filters'], 'images/filters', 320)}<figcaption>"
            "first-layer filters (<code>images/filters</code>)</figcaption></figure>"
        )
    return "".join(out)


def _walk_numbers(tree: Any, path: tuple = ()) -> list[tuple[tuple, float]]:
    """Every (key path, number) leaf of a JSON tree's dicts, in document order; lists (per
    unit or per seed series) are left to the eval's own report."""
    if isinstance(tree, dict):
        return [item for k, v in tree.items() for item in _walk_numbers(v, (*path, k))]
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return [(path, tree)]
    return []


_HEADLINE = re.compile(r"(top1|top5|acc|auroc|heldout|le_|nmi|ari|chance|best)", re.I)


def _eval_section(kind: str, title: str, metrics: dict[str, Any], assets: dict[str, Any]) -> str:
    if kind not in metrics:
        return f"<h2>{title}</h2><p class='missing'>not run yet</p>"
    directory: Path = assets[kind]
    section = metrics[kind]
    out = [f"<h2>{title}</h2>"]
    report = directory / REPORT
    link = f'<a href="{html.escape(os.path.relpath(report, metrics["run"]))}">full report</a>'
    out.append(
        f"<p>From <code>{html.escape(section['dir'])}/metrics.json</code>"
        + (f" ({link})" if report.is_file() else "")
        + ".</p>"
    )
    numbers = _walk_numbers(section["metrics"])
    # the eval's own headline first, then its per-layer summary figures
    numbers.sort(key=lambda item: item[0][0] != "headline")
    headline = [(p, v) for p, v in numbers if _HEADLINE.search("/".join(map(str, p)))]
    if headline:
        rows = "".join(
            f"<tr><td>{html.escape(' / '.join(map(str, p)))}</td>"
            f"<td>{figure(metrics, kind, 'metrics', *p)}</td></tr>"
            for p, _ in headline[:80]
        )
        out.append(f"<table><tr><th>figure</th><th>value</th></tr>{rows}</table>")
    head = section["metrics"].get("headline") or {}
    mark = f"_{head.get('layer')}_{head.get('unit_index')}." if head else None

    def first_the_headline_unit(png: Path) -> tuple[bool, bool, str]:
        return (mark is None or mark not in png.name, not png.name.startswith("grid"), png.name)

    for png in sorted(directory.glob("*.png"), key=first_the_headline_unit)[:8]:
        out.append(
            f"<figure>{_img(png.read_bytes(), png.name, 480)}<figcaption>{html.escape(png.name)}</figcaption></figure>"
        )
    return "".join(out)


def _headline_section(metrics: dict[str, Any]) -> str:
    """The cat unit: best held-out unit beside the same architecture with random weights."""
    h = metrics["headline"]

    def f(key: str) -> str:
        return figure(metrics, "headline", key)

    rows = "".join(
        f"<tr><td>{name}</td><td>{f(a)}</td><td>{f(b)}</td><td>{f(c)}</td></tr>"
        for name, a, b, c in (
            ("trained", "heldout", "auroc", "le"),
            ("random weights", "random_heldout", "random_auroc", "random_le"),
        )
    )
    return (
        "<h2>The cat unit</h2>"
        f"<p>Best unit <b>{html.escape(str(h['unit']))}</b>, scored on {f('images')} held-out "
        f"images (chance {f('chance')}; scorer <code>{html.escape(str(h.get('scorer', '')))}</code>). "
        "Held-out: unit, threshold and sign picked on one half, accuracy on the other. "
        "Le et al.: best of 20 thresholds picked on the test set (biased upward).</p>"
        "<table><tr><th></th><th>held-out accuracy</th><th>AUROC</th><th>Le et al. accuracy</th></tr>"
        f"{rows}</table>{_grouped_sentence(metrics)}"
    )


def _grouped_sentence(metrics: dict[str, Any]) -> str:
    """The best grouped unit (evals.neurons.groups), beside the single unit, if scored."""
    g = metrics.get("grouped_unit")
    if not g:
        return ""

    def f(key: str) -> str:
        return figure(metrics, "grouped_unit", key)

    members = ", ".join(f"#{m}" for m in g["members"])
    return (
        f"<p>Grouped unit: {html.escape(str(g['layer']))} channels {members}, pooled because "
        "they fire together on the unlabeled training frames (Coates et al. 2012; the "
        f"labels are not used): held-out {f('heldout')}, AUROC {f('auroc')}, against "
        f"{f('random_heldout')} / {f('random_auroc')} for random weights grouped the same way.</p>"
    )


def _probe_headline_section(metrics: dict[str, Any]) -> str:
    """Linear probes on the frozen features beside random init, raw pixels and chance."""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(str(row['layer']))}</td>"
        + "".join(
            f"<td>{figure(metrics, 'probe_headline', name, key)}</td>"
            for key in ("top1", "random_init", "raw_pixels", "chance")
        )
        + "</tr>"
        for name, row in metrics["probe_headline"].items()
    )
    return (
        "<h2>Linear probes (top-1 on held-out stills)</h2><table><tr><th>task</th><th>layer</th>"
        "<th>trained</th><th>random init</th><th>raw pixels</th><th>chance</th></tr>"
        f"{rows}</table>"
    )


_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1360px;margin:0.6em auto;padding:0 1em;color:#222}
h1{font-size:1.5em;margin:0.2em 0}h2{margin:1.2em 0 0.3em}p{margin:0.3em 0}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
td.l,th.l{text-align:left}th{background:#f3f3f3}td.top{font-weight:600}.ci{color:#777;font-size:12px}
pre{background:#f6f6f6;padding:0.6em;max-height:24em;overflow:auto;font-size:12px}
.missing{color:#a33}figure{display:inline-block;margin:0.5em;vertical-align:top}
figcaption{font-size:12px;color:#555;max-width:640px}.note{color:#555;font-size:13px}
.good{color:#176e17;font-weight:600}.bad{color:#a33;font-weight:600}
a.small{font-size:14px;font-weight:normal}#verdict .lead{font-size:15px;margin:0.2em 0 0.5em}details{margin:0.6em 0}summary{cursor:pointer}
"""


def _verdict_section(metrics: dict[str, Any], assets: dict[str, Any]) -> str:
    """The first screen: the best trained unit beside the best random-weights unit."""
    from evals.neurons.report import _PANEL_STYLE, headline_pair

    panels = metrics["neurons"]["metrics"]["panels"]
    t, r = panels.get("trained", {}), panels.get("random", {})

    def fig(side: str, *keys: str | int) -> str:
        return figure(metrics, "neurons", "metrics", "panels", side, *keys)

    head = metrics.get("headline") or {}
    verdict = str(head.get("verdict", ""))
    cls = "good" if verdict.endswith("above random weights") and "not" not in verdict else "bad"
    lead = (
        f"<p class='lead'>Best trained unit <b>{html.escape(str(t.get('label')))}</b>: held-out "
        f"accuracy {fig('trained', 'heldout')} against {fig('random', 'heldout')} for the best "
        f"unit of the same network with random weights ({html.escape(str(r.get('label')))}), "
        f"chance {fig('trained', 'chance')}: <span class='{cls}'>{html.escape(verdict)}</span>.</p>"
        if t and r
        else ""
    )
    note = ""
    if t.get("sign", 1) < 0:
        note = (
            "<p class='note'>This unit signals a cat by responding <i>less</i> (its threshold "
            "was chosen on the selection half with sign -). The Le et al. score only counts "
            "the positive direction, so it is lower for this unit than its held-out accuracy.</p>"
        )
    link = ""
    report = assets["neurons"] / REPORT
    if report.is_file():
        href = html.escape(os.path.relpath(report, metrics["run"]))
        link = f" <a class='small' href='{href}#units'>(every unit)</a>"
    return (
        f"<style>{_PANEL_STYLE}</style><section id='verdict'><h2 style='margin-top:0.3em'>"
        f"Verdict: is there a cat neuron?{link}</h2>{lead}"
        f"{headline_pair(metrics['neurons']['metrics'], assets['panel_images'], fig)}{note}</section>"
    )


def _probe_section(metrics: dict[str, Any]) -> str:
    out = ["<h2>Linear probes on frozen features</h2>"]
    for task, table in metrics["probe_table"].items():

        def fig(*keys: str | int, task: str = task) -> str:
            return figure(metrics, "probe_table", task, *keys)

        out.append(parts.probe_table_html(task, table, fig))
    lf = metrics.get("probe", {}).get("metrics", {}).get("label_fraction")
    if lf and lf.get("curves"):
        out.append(
            f"<figure>{parts.label_fraction_svg(lf)}<figcaption>Label-fraction curve "
            f"(<code>probe/metrics/label_fraction</code>), layer {html.escape(str(lf.get('layer')))}: "
            "top-1 of a probe trained on a share of the labels, mean and spread over seeds."
            "</figcaption></figure>"
        )
    return "".join(out)


def _filters_figure(metrics: dict[str, Any], assets: dict[str, Any]) -> str:
    f = metrics["filters"]
    kernel = "x".join(map(str, f["kernel"]))
    return (
        f"<figure>{_img(assets['filters_png'], 'first-layer filters')}<figcaption>First-layer "
        f"filters: {figure(metrics, 'filters', 'shown')} of {figure(metrics, 'filters', 'units')} "
        f"units of <code>{html.escape(f['tensor'])}</code> ({kernel} each, read from the export), "
        "each scaled to its own range (black: its most negative weight, white: its most positive)."
        "</figcaption></figure>"
    )


def _ablation_section(metrics: dict[str, Any]) -> str:
    ab = metrics["ablation"]

    def fig(*keys: str | int) -> str:
        return figure(metrics, "ablation", "rows", *keys)

    return (
        f"<h2>Ablation</h2><p class='note'>From <code>{html.escape(ab['path'])}</code>: each "
        "variant's best unit, trained beside random weights.</p>"
        + parts.ablation_html(ab["rows"], fig)
    )


def render(metrics: dict[str, Any], assets: dict[str, Any], sections: list[str] = ()) -> str:
    """The page: the verdict first, then probes, training, ablation; raw figures collapsed.
    `sections` are extra HTML blocks (a caller's summary), placed after the verdict."""
    run = html.escape(metrics["run"])
    model = ""
    if "export" in metrics:
        model = (
            f"model <b>{html.escape(str(metrics['export']['model']))}</b>, export at step "
            f"{figure(metrics, 'export', 'step')}. "
        )
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>catneuron report: {run}</title><style>{_STYLE}</style></head><body>",
        f"<h1>catneuron report</h1><p class='note'>{model}Every number here is also in "
        "<code>metrics.json</code> (hover a probe cell for its key).</p>",
    ]
    panels = metrics.get("neurons", {}).get("metrics", {}).get("panels")
    if panels:
        out.append(_verdict_section(metrics, assets))
    elif "headline" in metrics:
        out.append(_headline_section(metrics))
    if metrics["missing"]:
        items = "".join(
            f"<li>{html.escape(what)}: <code>{html.escape(how)}</code></li>"
            for what, how in metrics["missing"]
        )
        out.append(f"<div class='missing'><p>Missing from this run:</p><ul>{items}</ul></div>")
    out += list(sections)
    if metrics.get("probe_table"):
        out.append(_probe_section(metrics))
    elif metrics.get("probe_headline"):
        out.append(_probe_headline_section(metrics))
    out.append(_training_section(metrics, assets))
    if "ablation" in metrics:
        out.append(_ablation_section(metrics))
    raw = [_eval_section("probe", "Linear probe", metrics, assets)]
    if "probe_shapes" in metrics:
        raw.append(_eval_section("probe_shapes", "Linear probe: shape classes", metrics, assets))
    raw.append(_eval_section("neurons", "Neurons", metrics, assets))
    if "images/filters" in assets["images"]:
        raw.append(
            "<h2>Filters as logged to TensorBoard</h2>"
            + _img(assets["images"]["images/filters"], "images/filters")
        )
    raw.append("<h2>Config</h2>" + _config_text(assets.get("config")))
    out.append(
        "<details id='raw'><summary>Raw figures: every eval's metrics, PNGs and the config"
        "</summary>" + "".join(raw) + "</details>"
    )
    out.append(f"<p class='note'>Run <code>{run}</code>.</p></body></html>")
    return "\n".join(out)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(run: Path, sections: list[str] = (), extra: dict[str, Any] | None = None) -> Path:
    """Collect, render and write RUN/report.html and RUN/metrics.json; return the page's path.

    `extra` figures (the demo's headline) are merged into metrics.json under their keys.
    """
    metrics, assets = collect(run)
    for key, value in (extra or {}).items():
        metrics.setdefault(key, value)  # an eval's own figures win over the caller's
    page = render(metrics, assets, sections)
    _write_atomic(run / METRICS, json.dumps(metrics, indent=2, default=str) + "\n")
    _write_atomic(run / REPORT, page)
    return run / REPORT


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="catneuron report",
        description="Write RUN/report.html (config, loss curves, reconstructions, filters, probe "
        "and neuron headlines, links to the full eval reports) and RUN/metrics.json.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("run", type=Path, help="run directory (holding tb/, exports/, evals/)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        path = write_report(args.run)
    except (ReportError, json.JSONDecodeError, OSError) as e:
        print(f"catneuron report: {e}", file=sys.stderr)
        return 2
    metrics = json.loads((args.run / METRICS).read_text())
    for what, how in metrics["missing"]:
        print(f"report: missing {what} ({how})")
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
