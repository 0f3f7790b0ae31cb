"""`catneuron demo --ablation`: which ingredients make a cat-selective unit emerge, as a table.

Le et al. (2012) credit their cat and face neurons to sparsity with L2 pooling, local
contrast normalization, greedy layer-wise training, a concept frequent in the data, and
test images scaled to the top units' receptive field. Each row here trains one variant
and scores every unit of every layer on held-out cat / no-cat stills, beside the same
architecture with random weights and beside chance, so that what training added is in
plain view (a random network already has units that separate the classes somewhat).

To fit the whole table in minutes on a laptop, the rows train in-process with the
trainer's stage protocol (each greedy stage's frozen predecessors in eval mode under
no_grad, AdamW over that stage's parameters only, warmup + cosine) on frames drawn by the
same scene generator as `catneuron synth` (`render_still`), rather than through the
DeepSpeed launcher. The demo itself trains its recipe through the real pipeline.

Scores per unit (a conv channel reduced by max over space, or a dense unit), computed
by `evals.neurons.selectivity.score_units`, the scorer of `catneuron neurons`, on one stratified
half/half split of the test set:
- `le`: Le et al.'s protocol: best accuracy over 20 thresholds between the unit's min and
  max, unit and threshold picked on the test half itself (biased upward; for comparability);
- `heldout`: unit, threshold and sign picked on the selection half, accuracy on the test
  half: the honest figure;
- `auroc`: the AUROC on the test half of the unit best on the selection half.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.cli_help import HelpFormatter

TRAIN_SEED, TEST_SEED = 2**41, 2**42  # scene seeds no `catneuron synth` clip uses (< 2**31)


@dataclass
class Variant:
    """One row: a model and how it is trained and tested."""

    name: str
    model: str
    kwargs: dict
    steps: int = 400
    lr: float = 1e-3
    concept_fraction: float = 0.5
    test: str = "synth"  # "synth": faces as synth draws them; "centred": scaled to the field
    grayscale: bool = False
    size: int = 32  # the model's input side; frames are drawn at 64 px and resized
    clutter: str = "eyed"  # "eyed": distractors carry pupils and whiskers; "plain": they do not
    note: str = ""
    extra: dict = field(default_factory=dict)


def default_variants() -> list[Variant]:
    """The rows of the README's table: the demo's recipe and its ablations first, then the
    other families at their best settings found so far."""
    conv = {"channels": [16, 32, 64]}
    dense = {
        "input_shape": [1, 32, 32],
        "hidden": [512, 64],
        "activation": "sigmoid",
        "fine_tune": False,
    }
    sparse = {"sparsity_target": 0.03, "sparsity_weight": 0.3}
    recipe = {**dense, **sparse}
    wta = {"in_channels": 1, "channels": [32, 64, 64], "strides": [2, 2, 2], "lifetime_k": 0.3}
    # about 27% of a demo clip set's frames show the face; the WTA rows train at that share
    gray64 = {"grayscale": True, "size": 64, "concept_fraction": 0.3}
    return [
        Variant("wta_conv_ae 64 px gray (the demo's recipe)", "wta_conv_ae", wta, 400, **gray64),
        Variant(
            "wta_conv_ae, no sparsity (same net, plain conv AE)",
            "wta_conv_ae",
            {**wta, "lifetime_k": 1.0, "spatial": False},
            400,
            **gray64,
        ),
        Variant(
            "wta_conv_ae, lifetime k 10%, 800 steps",
            "wta_conv_ae",
            {**wta, "lifetime_k": 0.1},
            800,
            **gray64,
        ),
        Variant(
            "wta_conv_ae, 4 layers (4x4 deepest map)",
            "wta_conv_ae",
            {**wta, "channels": [32, 64, 64, 64], "strides": [2, 2, 2, 2]},
            400,
            **gray64,
        ),
        Variant(
            "wta_conv_ae 32 px gray",
            "wta_conv_ae",
            wta,
            400,
            grayscale=True,
            concept_fraction=0.3,
        ),
        Variant(
            "wta_conv_ae 64 px colour",
            "wta_conv_ae",
            {**wta, "in_channels": 3},
            400,
            size=64,
            concept_fraction=0.3,
        ),
        Variant(
            "wta_conv_ae, plain clutter (no pupils on distractors)",
            "wta_conv_ae",
            wta,
            400,
            clutter="plain",
            **gray64,
        ),
        Variant(
            "wta_conv_ae, concept rare (10% of frames)",
            "wta_conv_ae",
            wta,
            400,
            **{**gray64, "concept_fraction": 0.1},
        ),
        Variant(
            "conv_ae end to end (the issue's starting point)",
            "conv_ae",
            {**conv, "greedy": False},
            800,
            2e-3,
        ),
        Variant(
            "conv_ae greedy + KL sparsity",
            "conv_ae",
            {
                **conv,
                "greedy": True,
                "fine_tune": False,
                "activation": "sigmoid",
                "sparsity_target": 0.05,
                "sparsity_weight": 0.1,
            },
            400,
            2e-3,
        ),
        Variant(
            "local_sparse (L2 pooling, LCN, greedy TICA)",
            "local_sparse",
            {
                "in_channels": 3,
                "input_size": 32,
                "maps": 8,
                "receptive_field": [6, 4, 3],
                "stride": [2, 1, 1],
            },
            300,
            2e-3,
        ),
        Variant("stacked_ae gray, greedy, no sparsity", "stacked_ae", dense, 700, grayscale=True),
        Variant(
            "stacked_ae gray, greedy + KL sparsity (the earlier demo recipe)",
            "stacked_ae",
            recipe,
            700,
            grayscale=True,
        ),
        Variant(
            "earlier recipe, concept rare (10% of frames)",
            "stacked_ae",
            recipe,
            700,
            concept_fraction=0.1,
            grayscale=True,
        ),
        Variant(
            "earlier recipe, test faces centred and scaled to the field",
            "stacked_ae",
            recipe,
            700,
            test="centred",
            grayscale=True,
        ),
    ]


# --------------------------------------------------------------------------- data


def render_frames(
    n: int, seed: int, fraction: float, size: int, canvas: int = 64, eyed: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """`n` cluttered stills (uint8 (n, size, size, 3)) and whether each shows a face.

    Drawn at `canvas` pixels like a small synth frame, then resized to the model's input.
    A face in exactly round(n * fraction) of them, at seeded positions in the order.
    """
    from PIL import Image

    from data_pipeline.synth import render_still

    rng = np.random.default_rng(seed % 2**32)
    with_face = np.zeros(n, dtype=bool)
    with_face[rng.permutation(n)[: round(n * fraction)]] = True
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        still, _ = render_still(canvas, canvas, seed + i, cat=bool(with_face[i]), eyed_clutter=eyed)
        if size != canvas:
            still = np.asarray(Image.fromarray(still).resize((size, size), Image.BILINEAR))
        images[i] = still
    return images, with_face


def render_centred(
    n: int, seed: int, size: int, canvas: int = 64, reach: float = 0.8
) -> tuple[np.ndarray, np.ndarray]:
    """Balanced test stills whose face is centred (+-10%) and spans `reach` of the image:
    Le et al.'s test faces were scaled to the top units' receptive field."""
    from PIL import Image, ImageDraw

    from data_pipeline.drawing import FACE_REACH, CatColors, draw_cat_face
    from data_pipeline.synth import render_still

    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % 2 == 0
    for i in range(n):
        still, _ = render_still(canvas, canvas, seed + i, cat=False)
        if labels[i]:
            rng = np.random.default_rng([seed % 2**32, i])
            picture = Image.fromarray(still)
            radius = reach * canvas / (2 * FACE_REACH) * rng.uniform(0.85, 1.15)
            cx, cy = canvas / 2 + rng.uniform(-0.1, 0.1, 2) * canvas
            corners = (tuple(int(c) for c in still[0, 0]), tuple(int(c) for c in still[-1, -1]))
            colors = CatColors.random(rng, avoid=corners)
            draw_cat_face(ImageDraw.Draw(picture), cx, cy, radius, rng.uniform(-20, 20), colors)
            still = np.asarray(picture)
        images[i] = np.asarray(Image.fromarray(still).resize((size, size), Image.BILINEAR))
    return images, labels


def to_input(images: np.ndarray, grayscale: bool):
    import torch

    x = torch.from_numpy(images).float().div(255).permute(0, 3, 1, 2)
    if grayscale:
        x = x.mean(1, keepdim=True)
    return (x - 0.5) / 0.25


# --------------------------------------------------------------------------- scores


def unit_activations(model, x, batch: int = 256) -> dict[str, np.ndarray]:
    """Every layer of `features()`: conv maps reduced per channel by max over space."""
    import torch

    model.eval()
    out: dict[str, list] = {}
    with torch.no_grad():
        for i in range(0, len(x), batch):
            for name, value in model.features(x[i : i + batch]).items():
                reduced = value.amax((2, 3)) if value.ndim == 4 else value.flatten(1)
                out.setdefault(name, []).append(reduced.float())
    return {name: torch.cat(parts).numpy().astype(np.float64) for name, parts in out.items()}


def best_units(model, x, labels: np.ndarray, seed: int = 0) -> dict:
    """The best layer's figures (chosen on the selection half) and every layer's, scored as
    `catneuron neurons` scores them (`evals.neurons.selectivity.score_units`): one stratified split,
    the best unit, its threshold and sign picked on the selection half, figures on the
    test half (Le et al.'s figure: the best unit on the test half itself)."""
    from evals.features.datasets import split_indices
    from evals.neurons.selectivity import score_units

    y = labels.astype(np.int64)
    select, test = split_indices(y, 0.5, seed)
    layers = {}
    for name, units in unit_activations(model, x).items():
        live = np.flatnonzero(units.std(0) > 1e-9)
        if len(live) == 0:
            layers[name] = {"le": 0.5, "heldout": 0.5, "auroc": 0.5, "units": 0, "unit": None}
            continue
        scores = score_units(units[:, live], y, select, test)
        h = scores.headline()
        layers[name] = {
            "select_accuracy": float(scores.select_accuracy[scores.best_unit]),
            "le": h["le_best"],
            "heldout": h["best_heldout"],
            "auroc": h["best_auroc"],
            "units": int(len(live)),
            "unit": int(live[h["best_unit"]]),
            "chance": h["chance"],
        }
    # the layer too is chosen on the selection half, as `catneuron neurons` chooses it
    best = max(layers, key=lambda k: layers[k].get("select_accuracy", 0.0))
    return {"best_layer": best, **layers[best], "layers": layers}


def concept_scores(export: Path, concept: Path, seed: int = 0) -> dict:
    """The demo's headline when `catneuron neurons` is not installed: the best unit of an
    export on a two-class ImageFolder (`cat/`, `no_cat/`) beside the same architecture with
    random weights (seed `seed`) and chance. Images are preprocessed as model.json says,
    through `evals.features.datasets` (the loader's decoder and normalizer)."""
    import torch

    from evals.features.sources import open_dataset
    from pretrain import build_model, load_export

    model = load_export(export)
    dataset = open_dataset(str(concept))
    images, labels = [], []
    for batch in dataset.batches(model.export_spec["preprocess"], 128):
        keep = torch.as_tensor(batch["valid"], dtype=torch.bool)
        images.append(torch.as_tensor(batch["image"])[keep])
        labels.append(torch.as_tensor(batch["cls"])[keep])
    x = torch.cat(images)
    y = torch.cat(labels).numpy() == dataset.classes.index("cat")
    torch.manual_seed(seed)
    random_model = build_model(model.export_spec["name"], **model.export_spec["kwargs"]).eval()
    trained, random_weights = best_units(model, x, y), best_units(random_model, x, y)
    return {
        "scorer": "catneuron.ablation.concept_scores",
        "unit": f"{trained['best_layer']} #{trained['unit']}",
        "heldout": trained["heldout"],
        "auroc": trained["auroc"],
        "le": trained["le"],
        "random_heldout": random_weights["heldout"],
        "random_auroc": random_weights["auroc"],
        "random_le": random_weights["le"],
        "chance": trained["chance"],
        "images": int(len(y)),
        "layers": trained["layers"],
        "random_layers": random_weights["layers"],
    }


# --------------------------------------------------------------------------- training


def train_in_process(
    model, x, steps: int, lr: float, batch: int = 64, seed: int = 0, warmup: int = 20
) -> list[float]:
    """The trainer's stage protocol without DeepSpeed: per stage, frozen modules in eval
    mode, `prepare` under no_grad, AdamW on the stage's parameters, warmup + cosine."""
    import torch

    from pretrain.train import warmup_cosine

    generator = torch.Generator().manual_seed(seed)
    last = []
    for stage in model.stages():
        optimizer = torch.optim.AdamW(stage.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, steps, 0.1))
        model.eval()
        for module in stage.trainable:
            module.train()
        for _ in range(steps):
            idx = torch.randint(len(x), (batch,), generator=generator)
            with torch.no_grad():
                prepared = stage.prepare(x[idx])
            loss, _ = stage.loss(prepared, None)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        last.append(float(loss.detach()))
    model.eval()
    return last


def run_variant(variant: Variant, train_images: int, test_images: int, seed: int = 0) -> dict:
    import torch

    from pretrain.models import build_model

    start = time.perf_counter()
    size, eyed = variant.size, variant.clutter == "eyed"
    frames, _ = render_frames(
        train_images, TRAIN_SEED + seed * 2**20, variant.concept_fraction, size, eyed=eyed
    )
    if variant.test == "centred":
        test, labels = render_centred(test_images, TEST_SEED, size)
    else:
        test, labels = render_frames(test_images, TEST_SEED, 0.5, size, eyed=eyed)
    x, x_test = to_input(frames, variant.grayscale), to_input(test, variant.grayscale)
    torch.manual_seed(seed + 10_000)
    random_model = build_model(variant.model, **variant.kwargs)
    torch.manual_seed(seed)
    model = build_model(variant.model, **variant.kwargs)
    losses = train_in_process(model, x, variant.steps, variant.lr, seed=seed)
    row = {
        **asdict(variant),
        "trained": best_units(model, x_test, labels),
        "random": best_units(random_model, x_test, labels),
        "chance": row_chance(labels),
        "final_losses": losses,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return row


def row_chance(labels: np.ndarray) -> float:
    """The majority share of the test half (what `score_units` calls chance)."""
    from evals.features.datasets import split_indices

    _, test = split_indices(labels.astype(np.int64), 0.5, 0)
    share = float(labels[test].mean())
    return max(share, 1 - share)


def table(rows: list[dict]) -> str:
    """The markdown table of the README: trained beside random weights beside chance."""
    lines = [
        "| variant | layer | trained: Le / held-out / AUROC | random weights: Le / held-out / AUROC | chance |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        t, z = r["trained"], r["random"]
        lines.append(
            f"| {r['name']} | {t['best_layer']} | {t['le']:.3f} / {t['heldout']:.3f} / {t['auroc']:.3f} "
            f"| {z['le']:.3f} / {z['heldout']:.3f} / {z['auroc']:.3f} | {r['chance']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="catneuron demo --ablation",
        description="Train each ablation variant in-process and score its units against random weights.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--out", type=Path, default=Path("demo/ablation"), help="where ablation.json/.md go"
    )
    p.add_argument("--train-images", type=int, default=4000, help="training stills per variant")
    p.add_argument(
        "--test-images", type=int, default=600, help="held-out stills (half with a face)"
    )
    p.add_argument("--only", default=None, help="comma-separated row numbers to run (1-based)")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every variant's steps")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    variants = default_variants()
    if args.only:
        variants = [variants[int(i) - 1] for i in args.only.split(",")]
    for v in variants:
        v.steps = max(1, math.ceil(v.steps * args.steps_scale))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, variant in enumerate(variants, start=1):
        print(
            f"[{i}/{len(variants)}] {variant.name} ({variant.model}, {variant.steps} steps per stage)",
            flush=True,
        )
        row = run_variant(variant, args.train_images, args.test_images)
        t, z = row["trained"], row["random"]
        print(
            f"      {t['best_layer']}: held-out {t['heldout']:.3f}, AUROC {t['auroc']:.3f} "
            f"(random weights {z['heldout']:.3f} / {z['auroc']:.3f}, chance {row['chance']:.3f}; "
            f"{row['seconds']:.0f} s)",
            flush=True,
        )
        rows.append(row)
        tmp = args.out / ".ablation.json.tmp"
        tmp.write_text(json.dumps(rows, indent=2) + "\n")
        os.replace(tmp, args.out / "ablation.json")
    (args.out / "ablation.md").write_text(table(rows) + "\n")
    print(table(rows))
    print(f"ablation: {args.out / 'ablation.json'}, {args.out / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
