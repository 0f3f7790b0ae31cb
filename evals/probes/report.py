"""What `catneuron probe` leaves behind: metrics.json, label_fraction.png, TensorBoard
scalars at the export's step, and a short console table.

Kept apart from the evaluation itself (evals/probes/cli.py) so that the report and the
run overview (`catneuron report`) can read one documented layout:
`metrics["sources"][name]["layers"][layer]["probe" | "knn" | "kmeans"]`, `metrics["chance"]`,
`metrics["label_fraction"]["curves"][name][fraction] = {"mean", "std", "values"}`,
`metrics["finetune"]` (same shape, or None) and `metrics["headline"]`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

SOURCE_LABELS = {"export": "export", "random_init": "random init", "pixels": "raw pixels"}
COLOURS = {"export": (31, 119, 180), "random_init": (214, 39, 40), "pixels": (127, 127, 127)}


def scalars(metrics: dict) -> Iterator[tuple[str, float]]:
    """(tag, value) pairs under DESIGN.md's `eval/<eval>/<layer>/<metric>`: the export's
    figures as `top1`, `top5`, `nmi`, `ari`; baselines beside them as `random_init_top1`,
    ...; raw pixels as the layer `pixels`; chance as `eval/probe/chance/top1`; label
    fractions as `top1_frac<f>` (mean over seeds), fine-tuning under `eval/finetune/`."""
    for source, prefix in (("export", ""), ("random_init", "random_init_"), ("pixels", "")):
        info = metrics["sources"].get(source)
        if info is None:
            continue
        for layer, result in info["layers"].items():
            for metric in ("top1", "top5"):
                value = result["probe"].get(metric)
                if value is not None:
                    yield f"eval/probe/{layer}/{prefix}{metric}", value
                value = result["knn"].get(metric)
                if value is not None:
                    yield f"eval/knn/{layer}/{prefix}{metric}", value
            for metric in ("nmi", "ari"):
                yield f"eval/kmeans/{layer}/{prefix}{metric}", result["kmeans"][metric]
    yield "eval/probe/chance/top1", metrics["chance"]["top1"]
    for key in ("label_fraction", "finetune"):
        block = metrics.get(key)
        if not block:
            continue
        group = "probe" if key == "label_fraction" else "finetune"
        for source, curve in block["curves"].items():
            prefix = "" if source == "export" else f"{source}_"
            layer = block["layer"] if source != "pixels" else "pixels"
            for fraction, point in curve.items():
                yield f"eval/{group}/{layer}/{prefix}top1_frac{fraction}", point["mean"]


def write_scalars(tb_dir: Path, step: int, metrics: dict) -> int:
    """Add every scalar at `step` to the run's TensorBoard directory (a new event file
    beside the trainer's, the way pretrain.monitor writes: `add_scalar(tag, value, step)`)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tb_dir))
    count = 0
    try:
        for tag, value in scalars(metrics):
            writer.add_scalar(tag, value, step)
            count += 1
    finally:
        writer.close()
    return count


# ----------------------------------------------------------------------------- the curve PNG


def plot_label_fractions(path: Path, metrics: dict) -> None:
    """Top-1 against the labeled fraction (log x), mean and spread over seeds: the linear
    probe (solid) and, with --finetune, fine-tuning (dashed), per source. Matplotlib
    when it is installed, else a plain PIL drawing of the same curves."""
    series = []
    for key, style in (("label_fraction", "probe"), ("finetune", "finetune")):
        block = metrics.get(key)
        if not block:
            continue
        for source, curve in block["curves"].items():
            points = sorted((float(f), p["mean"], p["std"]) for f, p in curve.items())
            label = f"{SOURCE_LABELS.get(source, source)} ({style})"
            series.append((source, style, label, points))
    layers = f"probe layer {metrics['label_fraction']['layer']}"
    if metrics.get("finetune"):
        layers += f", fine-tuned on {metrics['finetune']['layer']}"
    title = (
        f"{metrics['model']['name']} step {metrics['step']} ({layers}): "
        f"top-1 on {metrics['data']['test']}"
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_pil(path, series, title, metrics["chance"]["top1"])
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=100)
    for source, style, label, points in series:
        xs, ys, es = zip(*points, strict=True)
        colour = tuple(c / 255 for c in COLOURS.get(source, (0, 0, 0)))
        ax.errorbar(
            xs, ys, yerr=es, label=label, color=colour, marker="o", capsize=3,
            linestyle="-" if style == "probe" else "--",
        )  # fmt: skip
    ax.axhline(metrics["chance"]["top1"], color="black", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of training labels")
    ax.set_ylabel("test top-1")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_pil(path: Path, series: list, title: str, chance: float) -> None:
    from PIL import Image, ImageDraw

    width, height, margin = 640, 440, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    fractions = sorted({p[0] for *_, points in series for p in points}) or [1.0]
    lo, hi = math.log10(min(fractions)), math.log10(max(fractions))
    span = hi - lo or 1.0

    def xy(f: float, y: float) -> tuple[float, float]:
        x = margin + (math.log10(f) - lo) / span * (width - 2 * margin)
        return x, height - margin - y * (height - 2 * margin)

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        _, y = xy(fractions[0], tick)
        draw.text((8, y - 6), f"{tick:.2f}", fill="black")
    for f in fractions:
        x, _ = xy(f, 0.0)
        draw.text((x - 12, height - margin + 6), f"{f:g}", fill="black")
    y_chance = xy(fractions[0], chance)[1]
    draw.line([margin, y_chance, width - margin, y_chance], fill=(0, 0, 0), width=1)
    for row, (source, style, label, points) in enumerate(series):
        colour = COLOURS.get(source, (0, 0, 0))
        coords = [xy(f, m) for f, m, _ in points]
        if style == "probe":
            draw.line(coords, fill=colour, width=2)
        else:
            for a, b in zip(coords[:-1], coords[1:], strict=True):
                draw.line([a, ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)], fill=colour, width=2)
        for (f, m, s), (x, y) in zip(points, coords, strict=True):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            draw.line([x, xy(f, m - s)[1], x, xy(f, m + s)[1]], fill=colour)
        draw.text((margin + 8, margin + 8 + 14 * row), label, fill=colour)
    draw.text((margin, 20), title, fill="black")
    draw.text((width // 2 - 80, height - 24), "fraction of training labels (log)", fill="black")
    image.save(path)


# ----------------------------------------------------------------------------- console table


def _fmt(value: float | None) -> str:
    return "   -  " if value is None else f"{value:6.3f}"


def table(metrics: dict) -> str:
    """A few lines: per layer the export's probe / kNN / k-means NMI beside random init,
    then raw pixels, chance, the label-fraction curve and fine-tuning."""
    data = metrics["data"]
    lines = [
        f"probe {metrics['model']['name']} step {metrics['step']} on {data['test']} "
        f"(train {data['n_train']} / test {data['n_test']}, {len(data['classes'])} classes, "
        f"solver {metrics['protocol']['solver']})",
        f"{'layer':<14}{'probe':>8}{'random':>8}{'knn':>8}{'random':>8}{'nmi':>8}{'random':>8}",
    ]
    export, rnd = metrics["sources"]["export"], metrics["sources"]["random_init"]
    for layer, result in export["layers"].items():
        base = rnd["layers"][layer]
        lines.append(
            f"{layer:<14}{_fmt(result['probe']['top1']):>8}{_fmt(base['probe']['top1']):>8}"
            f"{_fmt(result['knn']['top1']):>8}{_fmt(base['knn']['top1']):>8}"
            f"{_fmt(result['kmeans']['nmi']):>8}{_fmt(base['kmeans']['nmi']):>8}"
        )
    pix = metrics["sources"]["pixels"]["layers"]["pixels"]
    lines.append(
        f"{'raw pixels':<14}{_fmt(pix['probe']['top1']):>8}{'':>8}"
        f"{_fmt(pix['knn']['top1']):>8}{'':>8}{_fmt(pix['kmeans']['nmi']):>8}"
    )
    lines.append(f"{'chance':<14}{_fmt(metrics['chance']['top1']):>8}")
    for key, name in (("label_fraction", "probe"), ("finetune", "finetune")):
        block = metrics.get(key)
        if not block:
            continue
        for source in ("export", "random_init"):
            curve = block["curves"].get(source)
            if curve:
                points = "  ".join(
                    f"{float(f):g}: {p['mean']:.3f}±{p['std']:.3f}" for f, p in curve.items()
                )
                lines.append(f"{name} {block['layer']} {SOURCE_LABELS[source]:<12} labels {points}")
    return "\n".join(lines)
