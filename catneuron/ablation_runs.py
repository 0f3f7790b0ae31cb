"""`catneuron demo --ablation`: every row of the ablation table through the real pipeline.

The in-process table (`catneuron.ablation`) is quick, but what a user gets is what the
pipeline gives: frames decoded from video and sharded on Ray, trained on DeepSpeed ranks,
scored by `catneuron neurons` on held-out stills. So each row here is a small demo run:
`catneuron synth` and `catneuron shard` once per data variant (clutter, the share of clips
with a face, the face's scale, the frame size: rows that agree share them), then
`catneuron train` with the row's model and `catneuron neurons` against the same
architecture with random weights. Each row lands in ablation.json as soon as it is done,
so an interrupted table keeps its finished rows and a rerun skips them (their runs' exports
and neuron metrics are on disk).

A row's figures: the headline unit of `catneuron neurons` (layer and unit picked on the
selection half, scored on the held-out half), beside the best random-weights unit over
all layers (the stricter baseline) and chance.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from catneuron import demo_steps


@dataclass
class Row:
    """One pipeline row: a model, its training and its data."""

    name: str
    model: str
    kwargs: dict
    steps: int | list[int] = 800  # per stage: one number for every stage, or one per stage
    lr: float = 1e-3
    size: int = 64
    grayscale: bool = True
    clutter: str = "eyed"
    clip_fraction: float = 0.5  # share of clips with the face (about half as many frames)
    face_scale: tuple[float, float] | None = None  # None: synth's default

    def total_steps(self) -> int:
        if isinstance(self.steps, list):
            return sum(self.steps)
        return self.steps * demo_steps.stage_count(self.model, self.kwargs)

    def data_key(self) -> str:
        scale = (
            "default" if self.face_scale is None else "-".join(f"{v:g}" for v in self.face_scale)
        )
        return f"{self.clutter}_clips{self.clip_fraction:g}_scale{scale}"


WTA = {"in_channels": 1, "channels": [32, 64, 64], "strides": [2, 2, 2], "lifetime_k": 0.3}
ROW_STAMP = "ablation_row.json"  # in a row's run directory: the settings it was started with
RECIPE = {
    **WTA,
    "channel_k": 8,
    "highpass": 9,
}  # configs/demo/small.yaml's model, less its stretch stage
DENSE = {"input_shape": [1, 32, 32], "hidden": [512, 64], "activation": "sigmoid"}


def default_rows() -> list[Row]:
    """The earlier recipe first; then one change per row from the demo's recipe (`RECIPE`,
    row 14) along the issue's axes (sparsity, pooling, 32 vs 64 px, colour, concept share
    and scale, clutter); then the other model families; then the two steps from the earlier
    recipe to the demo's; then the recipe with lifetime winners ranked by contrast; last
    the recipe followed by a stage of cluster refinement (DeepCluster)."""
    return [
        Row("wta_conv_ae 64 px gray, k 30% (the earlier recipe)", "wta_conv_ae", WTA),
        Row(
            "recipe without sparsity (same net, plain conv AE)",
            "wta_conv_ae",
            {**RECIPE, "lifetime_k": 1.0, "spatial": False, "channel_k": 0},
        ),
        Row(
            "recipe + L2 pooling (pairs) below the deepest layer",
            "wta_conv_ae",
            {**RECIPE, "l2_pool": 2},
        ),
        Row("recipe, lifetime k 10%", "wta_conv_ae", {**RECIPE, "lifetime_k": 0.1}),
        Row("recipe on 32 px frames", "wta_conv_ae", {**RECIPE, "highpass": 5}, size=32),
        Row("recipe in colour", "wta_conv_ae", {**RECIPE, "in_channels": 3}, grayscale=False),
        Row(
            "recipe, concept rare (face in 20% of clips)", "wta_conv_ae", RECIPE, clip_fraction=0.2
        ),
        Row(
            "recipe, larger faces (radius 16-24% of the frame)",
            "wta_conv_ae",
            RECIPE,
            face_scale=(0.16, 0.24),
        ),
        Row(
            "recipe, plain clutter (distractors without pupils)",
            "wta_conv_ae",
            RECIPE,
            clutter="plain",
        ),
        Row(
            "conv_ae end to end",
            "conv_ae",
            {"in_channels": 1, "channels": [16, 32, 64], "greedy": False},
            lr=2e-3,
        ),
        Row(
            "stacked_ae greedy + KL sparsity (the earlier demo recipe)",
            "stacked_ae",
            {**DENSE, "sparsity_target": 0.03, "sparsity_weight": 0.3, "fine_tune": False},
            steps=700,
            size=32,
        ),
        Row(
            "local_sparse (L2 pooling, LCN, greedy TICA)",
            "local_sparse",
            {
                "in_channels": 1,
                "input_size": 32,
                "maps": 8,
                "receptive_field": [6, 4, 3],
                "stride": [2, 1, 1],
            },
            steps=300,
            lr=2e-3,
            size=32,
        ),  # fmt: skip
        Row("k-sparse channels (8 per image)", "wta_conv_ae", {**WTA, "channel_k": 8}),
        Row("k-sparse channels + high-pass target (9x9): the demo's recipe", "wta_conv_ae", RECIPE),
        Row(
            "recipe, lifetime winners ranked by contrast (winner / the map's mean)",
            "wta_conv_ae",
            {**RECIPE, "lifetime_rank": "contrast"},
        ),
        Row(
            "recipe, then 150 steps of cluster refinement (DeepCluster, 16 k-means clusters)",
            "wta_conv_ae",
            {**RECIPE, "cluster_k": 16, "cluster_frames": 3072},
            steps=[800, 150],
        ),
        Row(
            "recipe, then 150 steps of stretch refinement (what comes and goes in a clip)",
            "wta_conv_ae",
            {**RECIPE, "stretch_keep": 0.25},
            steps=[800, 150],
        ),
    ]


ROW_COUNT = 17  # len(default_rows()), for checking --ablation-rows before anything loads


def row_config(row: Row, shards: Path, runs: Path, name: str) -> dict[str, Any]:
    """The demo's config with the row's model, input and schedule."""
    import yaml

    config = yaml.safe_load(demo_steps.demo_config("small.yaml").read_text())
    channels = 1 if row.grayscale else 3
    config["run"].update(name=name, output_dir=str(runs))
    config["data"].update(
        source=str(shards),
        resize=row.size,
        crop=row.size,
        grayscale=row.grayscale,
        mean=[0.5] * channels,
        std=[0.25] * channels,
    )
    config["model"] = {"name": row.model, "kwargs": row.kwargs}
    config["stages"] = {"steps": row.steps}
    config["optimizer"] = {"lr": row.lr}
    config["checkpoint"] = {"every": row.total_steps(), "keep_last": 1}
    config["logging"] = {"every": 50, "image_every": row.total_steps()}
    return config


def neuron_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """`catneuron neurons`' headline as an ablation row's `trained` / `random` / `chance`."""
    head = metrics["headline"]
    layers = metrics["layers"]
    random = {
        name: layer["selectivity"]["random"]
        for name, layer in layers.items()
        if "selectivity" in layer
    }
    best_random = max(random, key=lambda n: random[n]["best_heldout"])
    r = random[best_random]
    return {
        "trained": {
            "best_layer": head["layer"],
            "unit": head["unit_index"],
            "le": head["le_best"],
            "heldout": head["heldout"],
            "auroc": head["auroc"],
        },
        "random": {
            "best_layer": best_random,
            "le": max(v["le_best"] for v in random.values()),
            "heldout": r["best_heldout"],
            "auroc": r["best_auroc"],
        },
        "chance": head["chance"],
        "layers": {
            name: {
                "trained": {
                    k: layer["selectivity"]["trained"][k] for k in ("best_heldout", "best_auroc")
                },
                "random": {k: random[name][k] for k in ("best_heldout", "best_auroc")},
            }
            for name, layer in layers.items()
            if "selectivity" in layer
        },
    }


def run_row(row: Row, index: int, out: Path, base: argparse.Namespace) -> dict[str, Any]:
    """One row through synth, shard, train and neurons; its figures."""
    import yaml

    start = time.perf_counter()
    data = out / "data" / row.data_key()
    shards = data / f"shards_{row.size}px"
    logs = out / "logs" / f"row{index:02d}"
    args = argparse.Namespace(**{**vars(base), "size": row.size, "clutter": row.clutter})
    args.concept_fraction = row.clip_fraction
    args.face_scale = row.face_scale

    def say(step: int, text: str) -> None:
        print(f"      [{step}] {text}  ({time.perf_counter() - start:.0f} s)", flush=True)

    demo_steps.make_shards(args, data / "videos", shards, logs, say)
    name = f"row{index:02d}"
    runs = out / "runs"
    config = row_config(row, shards, runs, name)
    config_path = out / "configs" / f"{name}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    run = runs / name
    fresh_run(run, settings(row, base))
    say(3, f"training {row.model} ({row.steps} steps per stage, {base.ranks} ranks)")
    demo_steps.run_step(
        ["train", str(config_path), "--num-gpus", str(base.ranks)],
        logs / "train.log",
        demo_steps.trained_steps(run),
        row.total_steps(),
        "steps",
    )
    export = demo_steps.latest_export(run)
    concept = demo_steps.write_concept_set(
        data / f"concept_{row.size}px",
        base.eval_images,
        base.eval_seed,
        row.size,
        row.clutter == "eyed",
        row.face_scale,
    )
    say(4, f"scoring every unit on {base.eval_images} held-out stills")
    demo_steps.run_step(
        ["neurons", str(export), "--data", str(concept), "--concept", str(concept), "--quiet"],
        logs / "neurons.log",
    )
    from catneuron.report import METRICS, latest_eval

    metrics = json.loads((latest_eval(run, "neurons") / METRICS).read_text())
    return {
        **asdict(row),
        **neuron_figures(metrics),
        "pipeline": True,
        "settings": settings(row, base),
        "run": os.path.relpath(run, out),
        "seconds": round(time.perf_counter() - start, 1),
    }


def fresh_run(run: Path, wanted: dict[str, Any]) -> None:
    """Keep `run` (an interrupted run of this same row resumes) only if it was started with
    these settings; a run of a changed row, or of an older table, is removed, since the
    trainer refuses to resume a checkpoint written with another model section."""
    stamp = run / ROW_STAMP
    if run.exists() and (not stamp.is_file() or json.loads(stamp.read_text()) != wanted):
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(wanted, indent=2) + "\n")


def settings(row: Row, base: argparse.Namespace) -> dict[str, Any]:
    """What a finished row's figures depend on: a rerun keeps the row only if they agree."""
    keys = ("videos", "seed", "fps", "ranks", "eval_images", "eval_seed")
    return json.loads(json.dumps({**asdict(row), **{k: getattr(base, k) for k in keys}}))


def ordered(results: dict[str, dict], rows: list[Row]) -> list[dict]:
    """Finished rows in the table's order."""
    return [results[r.name] for r in rows if r.name in results]


def main(base: argparse.Namespace, only: list[int] | None = None) -> int:
    """The table into `base.out`/ablation (ablation.json, ablation.md); finished rows kept."""
    from catneuron.ablation import table

    out = (base.out / "ablation").resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = default_rows()
    for row in rows:
        row.steps = base.steps or row.steps  # `--steps`: every row's steps per stage
    chosen = only or list(range(1, len(rows) + 1))
    done_path = out / "ablation.json"
    kept = json.loads(done_path.read_text()) if done_path.is_file() else []
    results = {r["name"]: r for r in kept if r.get("pipeline")}
    start = time.perf_counter()
    print(f"ablation: {len(chosen)} rows through the pipeline in {out}; logs in {out / 'logs'}")
    for k, index in enumerate(chosen, start=1):
        row = rows[index - 1]
        if row.name in results and results[row.name].get("settings") == settings(row, base):
            print(f"[{k}/{len(chosen)}] {row.name}: done before, kept", flush=True)
            continue
        print(f"[{k}/{len(chosen)}] {row.name} ({time.perf_counter() - start:.0f} s)", flush=True)
        result = run_row(row, index, out, base)
        t, z = result["trained"], result["random"]
        print(
            f"      {t['best_layer']} #{t['unit']}: held-out {t['heldout']:.3f}, AUROC "
            f"{t['auroc']:.3f} (random weights {z['heldout']:.3f} / {z['auroc']:.3f}, chance "
            f"{result['chance']:.3f}; {result['seconds']:.0f} s)",
            flush=True,
        )
        results[row.name] = result
        tmp = out / ".ablation.json.tmp"
        tmp.write_text(json.dumps(ordered(results, rows), indent=2) + "\n")
        os.replace(tmp, done_path)
    final = ordered(results, rows)
    (out / "ablation.md").write_text(table(final) + "\n")
    print(table(final))
    print(
        f"ablation done in {time.perf_counter() - start:.0f} s: {done_path}, {out / 'ablation.md'}"
    )
    return 0
