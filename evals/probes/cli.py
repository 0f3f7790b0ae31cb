"""`catneuron probe`: linear probes, kNN, k-means and fine-tuning of an export, in one report.

    catneuron probe RUN/exports/step_400 --data synth:cat --test-fraction 0.2
    catneuron probe RUN --train frames/train --test frames/test --solver lbfgs
    catneuron probe --watch RUN --data sklearn:digits --test-fraction 0.25 --finetune

One feature pass per source (`evals.features.extract`, cached under RUN/evals/cache, so
a second run extracts nothing) serves every eval; the same protocol runs on the export,
on the same architecture with random weights (seed 0), and on raw pixels at the model's
input size, beside chance (the majority class of the training set). Outputs:
RUN/evals/probe-<step>/{metrics.json, label_fraction.png} (built in a temporary
directory, then renamed), TensorBoard scalars in RUN/tb at the export's step, and a
table on the console. `--watch RUN` evaluates each export of RUN once, in step order,
as training writes them; an export whose metrics.json exists is done, so a restarted
watch redoes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.cli_help import HelpFormatter

PROG = "catneuron probe"
STEP_DIR = re.compile(r"^step_(\d+)$")


class ProbeInputError(ValueError):
    """A user mistake: one line `catneuron probe: <file>: <problem>`, exit 2."""


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Linear probe, kNN, k-means and (optionally) fine-tuning of an export on "
        "labeled data, beside random-init, raw-pixel and chance baselines.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "target", nargs="?", type=Path, default=None,
        help="an export (RUN/exports/step_N) or a run directory (its latest export)",
    )  # fmt: skip
    data = parser.add_argument_group("labeled data (DATA: shards, ImageFolder, synth:cat, "
                                     "synth:shapes, sklearn:digits)")  # fmt: skip
    data.add_argument("--train", default=None, help="training set DATA")
    data.add_argument("--test", default=None, help="test set DATA")
    data.add_argument("--data", default=None, help="one DATA split into train and test")
    data.add_argument("--test-fraction", type=float, default=0.2, help="with --data")
    data.add_argument("--split-seed", type=int, default=0, help="with --data")
    evals = parser.add_argument_group("evals")
    evals.add_argument("--layers", default=None, help="comma-separated (default: all)")
    evals.add_argument("--solver", choices=("grid", "lbfgs"), default="grid")
    evals.add_argument("--epochs", type=int, default=100, help="grid solver's epochs")
    evals.add_argument("--knn-k", type=int, default=20)
    evals.add_argument("--knn-t", type=float, default=0.07)
    evals.add_argument("--kmeans-init", type=int, default=10, help="k-means restarts")
    evals.add_argument("--label-fractions", type=_floats, default=[0.01, 0.1, 1.0])
    evals.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="label-fraction seeds")
    evals.add_argument("--finetune", action="store_true", help="also fine-tune the encoder")
    evals.add_argument("--finetune-steps", type=int, default=300)
    evals.add_argument("--finetune-lr", type=float, default=1e-3, help="encoder lr (head: 10x)")
    run = parser.add_argument_group("extraction and output")
    run.add_argument("--batch-size", type=int, default=64)
    run.add_argument("--num-workers", type=int, default=0, help="Ray extraction tasks")
    run.add_argument("--address", default=None, help="a running Ray cluster")
    run.add_argument(
        "--loader-workers", type=int, default=0, help="decoding processes inside each pass"
    )
    run.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    run.add_argument("--out", type=Path, default=None, help="default: RUN/evals/probe-<step>")
    run.add_argument("--cache", type=Path, default=None, help="default: RUN/evals/cache")
    watch = parser.add_argument_group("watching a run")
    watch.add_argument("--watch", type=Path, default=None, metavar="RUN",
                       help="evaluate every export of RUN once, in step order, as it appears")  # fmt: skip
    watch.add_argument("--poll", type=float, default=30.0, help="seconds between looks")
    watch.add_argument("--idle-exit", type=float, default=None,
                       help="stop after this many seconds without a new export (default: never)")  # fmt: skip
    return parser


# ----------------------------------------------------------------------------- inputs


def export_step(directory: Path) -> int:
    match = STEP_DIR.match(directory.name)
    return int(match.group(1)) if match else -1


def list_exports(run: Path) -> list[Path]:
    """Complete exports of a run in step order (a directory named step_N holding
    model.json; the trainer writes under a hidden temporary name, then renames)."""
    root = run / "exports"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted((p for p in found if (p / "model.json").is_file()), key=export_step)


def run_of(export: Path) -> Path | None:
    """RUN for RUN/exports/step_N, else None."""
    export = export.resolve()
    return export.parent.parent if export.parent.name == "exports" else None


def resolve_target(target: Path) -> Path:
    """An export directory: the target itself, or a run's latest export."""
    if not target.exists():
        raise ProbeInputError(f"{target}: no such file or directory")
    if target.is_file():
        target = target.parent
    if (target / "model.json").exists() or (target / "model.safetensors").exists():
        return target
    if STEP_DIR.match(target.name) and target.parent.name == "exports":
        return target  # load_export names the missing model.json
    if (target / "exports").is_dir():
        exports = list_exports(target)
        if not exports:
            raise ProbeInputError(f"{target / 'exports'}: no complete export (step_N/model.json)")
        return exports[-1]
    raise ProbeInputError(f"{target}: neither an export (model.json) nor a run (exports/)")


@dataclass
class Data:
    """The labeled sets, opened once (a watch reuses them for every export)."""

    train: object  # EvalDataset
    test: object | None  # None: `train` is split by positions
    positions: tuple[np.ndarray, np.ndarray] | None
    test_fraction: float | None
    split_seed: int

    @property
    def classes(self) -> list[str]:
        return list(self.train.classes)

    def describe(self) -> dict:
        if self.test is None:
            train_idx, test_idx = self.positions
            return {
                "train": f"{self.train.spec} (1 - {self.test_fraction} split)",
                "test": f"{self.train.spec} ({self.test_fraction} split)",
                "test_fraction": self.test_fraction,
                "split_seed": self.split_seed,
                "fingerprints": {"data": self.train.fingerprint},
                "n_train": len(train_idx),
                "n_test": len(test_idx),
                "classes": self.classes,
                "skipped_unreadable": len(self.train.skipped),
            }
        return {
            "train": self.train.spec,
            "test": self.test.spec,
            "fingerprints": {"train": self.train.fingerprint, "test": self.test.fingerprint},
            "n_train": len(self.train),
            "n_test": len(self.test),
            "classes": self.classes,
            "skipped_unreadable": len(self.train.skipped) + len(self.test.skipped),
        }


def open_data(args: argparse.Namespace) -> Data:
    from evals.features.datasets import split_indices
    from evals.features.sources import open_dataset

    if args.data and (args.train or args.test):
        raise ProbeInputError("--data: give either --data or --train with --test, not both")
    if args.data:
        dataset = open_dataset(args.data, labeled=True)
        positions = split_indices(dataset.labels, args.test_fraction, args.split_seed)
        if len(np.unique(dataset.labels[positions[0]])) < 2:
            raise ProbeInputError(f"{args.data}: the training split holds only one class")
        return Data(dataset, None, positions, args.test_fraction, args.split_seed)
    if not (args.train and args.test):
        raise ProbeInputError("--train/--test: give both, or --data with --test-fraction")
    train = open_dataset(args.train, labeled=True)
    test = open_dataset(args.test, labeled=True)
    if list(train.classes) != list(test.classes):
        raise ProbeInputError(
            f"{args.test}: classes {test.classes} differ from --train {args.train}'s "
            f"{train.classes}"
        )
    return Data(train, test, None, None, args.split_seed)


def check_args(args: argparse.Namespace) -> None:
    if not all(0.0 < f <= 1.0 for f in args.label_fractions) or not args.label_fractions:
        raise ProbeInputError(f"--label-fractions: {args.label_fractions} must lie in (0, 1]")
    if not args.seeds:
        raise ProbeInputError("--seeds: give at least one seed")
    if args.knn_k < 1 or args.knn_t <= 0:
        raise ProbeInputError(f"--knn-k {args.knn_k} / --knn-t {args.knn_t}: need k >= 1, T > 0")
    if args.epochs < 1 or args.batch_size < 1 or args.kmeans_init < 1:
        raise ProbeInputError("--epochs, --batch-size and --kmeans-init must be positive")
    if args.data and not 0.0 < args.test_fraction < 1.0:
        raise ProbeInputError(f"--test-fraction: {args.test_fraction} must lie in (0, 1)")


# ----------------------------------------------------------------------------- one export


@dataclass
class Split:
    """One source's pooled features for one layer, split into train and test."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def _features(source, data: Data, layers, args, cache_root: Path) -> tuple[dict, dict]:
    """layer -> Split, and the cache record {layer: key, ..., extracted: bool}."""
    from evals.features.extractor import extract

    common = dict(
        layers=layers,
        cache_root=cache_root,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        address=args.address,
        device=args.device,
        loader_workers=args.loader_workers,
    )
    if data.test is None:
        whole = extract(source, data.train, **common)
        train, test = (whole.subset(p) for p in data.positions)
        record = {"data": dict(whole.cache_keys), "extracted": whole.extracted}
    else:
        train = extract(source, data.train, **common)
        test = extract(source, data.test, **common)
        record = {
            "train": dict(train.cache_keys),
            "test": dict(test.cache_keys),
            "extracted": train.extracted or test.extracted,
        }
    splits = {
        layer: Split(train.pooled[layer], train.labels, test.pooled[layer], test.labels)
        for layer in train.layers
    }
    return splits, record


def _evaluate_layer(split: Split, num_classes: int, args) -> dict:
    from evals.probes.clustering import cluster_eval
    from evals.probes.knn import knn_eval
    from evals.probes.linear import grid_probe, lbfgs_probe

    seed = args.seeds[0]
    try:
        if args.solver == "lbfgs":
            probe = lbfgs_probe(
                split.train_x, split.train_y, split.test_x, split.test_y, num_classes,
                seed=seed, device=args.device,
            )  # fmt: skip
        else:
            probe = grid_probe(
                split.train_x, split.train_y, split.test_x, split.test_y, num_classes,
                epochs=args.epochs, seed=seed, device=args.device,
            )  # fmt: skip
    except ValueError as e:  # too few training rows for a validation split
        raise ProbeInputError(f"--train: {e}") from None
    knn = knn_eval(
        split.train_x, split.train_y, split.test_x, split.test_y, num_classes,
        k=args.knn_k, temperature=args.knn_t, device=args.device,
    )  # fmt: skip
    both_x = np.concatenate([split.train_x, split.test_x])
    both_y = np.concatenate([split.train_y, split.test_y])
    kmeans = cluster_eval(both_x, both_y, n_init=args.kmeans_init, seed=seed, device=args.device)
    return {
        "dim": int(split.train_x.shape[1]),
        "probe": probe.to_dict(),
        "knn": knn,
        "kmeans": kmeans,
    }


def _chance(train_y: np.ndarray, test_y: np.ndarray, num_classes: int) -> dict:
    counts = np.bincount(train_y, minlength=num_classes)
    order = np.argsort(-counts, kind="stable")
    return {
        "majority_class": int(order[0]),
        "top1": float(np.mean(test_y == order[0])),
        "top5": float(np.mean(np.isin(test_y, order[:5]))) if num_classes > 5 else None,
    }


def _point(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}


def _label_fractions(results: dict, splits: dict, layer: str, num_classes: int, args) -> dict:
    """Per source, per fraction: one head at the setting chosen on the full-label
    validation split, trained on a stratified fraction of the training labels (at least
    one per class) standardized by every training row's features (unlabeled features
    are available in the semi-supervised setting), for each seed."""
    from evals.probes.linear import head_accuracy, stratified_fraction

    curves: dict[str, dict] = {}
    for name, split_by_layer in splits.items():
        use = "pixels" if name == "pixels" else layer
        split = split_by_layer[use]
        probe = results[name]["layers"][use]["probe"]
        setting = probe["setting"] if args.solver == "grid" else _grid_setting_for(args)
        curve = {}
        for fraction in args.label_fractions:
            values = []
            for seed in args.seeds:
                rows = stratified_fraction(split.train_y, fraction, seed)
                top1, _ = head_accuracy(
                    split.train_x[rows], split.train_y[rows], split.test_x, split.test_y,
                    num_classes, setting, stats_x=split.train_x, seed=seed, device=args.device,
                )  # fmt: skip
                values.append(top1)
            curve[f"{fraction:g}"] = _point(values)
        curves[name] = curve
    return {
        "layer": layer,
        "fractions": list(args.label_fractions),
        "seeds": list(args.seeds),
        "protocol": "one head at the lr/weight decay chosen on the full-label validation split "
        "(grid solver; lbfgs: lr 0.1, no decay), trained on a stratified fraction of the "
        "training labels, standardized with every training row",
        "curves": curves,
    }


def _grid_setting_for(args) -> dict:
    return {"lr": 0.1, "weight_decay": 0.0, "epochs": args.epochs, "batch_size": 256}


def _finetune(source, data: Data, layer: str, num_classes: int, args) -> dict:
    import torch

    from evals.features.extractor import random_init
    from evals.probes.finetune import finetune, load_images
    from evals.probes.linear import stratified_fraction

    if data.test is None:
        x, y = load_images(data.train, source.preprocess)
        (tr, te) = (torch.as_tensor(p) for p in data.positions)
        train_x, train_y, test_x, test_y = x[tr], y[tr], x[te], y[te]
    else:
        train_x, train_y = load_images(data.train, source.preprocess)
        test_x, test_y = load_images(data.test, source.preprocess)
    sources = {"export": source, "random_init": random_init(source, seed=0)}
    curves: dict[str, dict] = {name: {} for name in sources}
    for fraction in args.label_fractions:
        runs: dict[str, list[float]] = {name: [] for name in sources}
        for seed in args.seeds:
            rows = torch.as_tensor(stratified_fraction(train_y.numpy(), fraction, seed))
            for name, src in sources.items():
                result = finetune(
                    src, train_x[rows], train_y[rows], test_x, test_y, num_classes,
                    layer=layer, steps=args.finetune_steps, lr=args.finetune_lr,
                    head_lr=10 * args.finetune_lr, seed=seed, device=args.device,
                )  # fmt: skip
                runs[name].append(result["top1"])
        for name in sources:
            curves[name][f"{fraction:g}"] = _point(runs[name])
    return {
        "layer": layer,
        "fractions": list(args.label_fractions),
        "seeds": list(args.seeds),
        "steps": args.finetune_steps,
        "lr": args.finetune_lr,
        "head_lr": 10 * args.finetune_lr,
        "curves": curves,
    }


def evaluate(export: Path, data: Data, args: argparse.Namespace) -> tuple[dict, Path]:
    """Every eval of one export; returns (metrics, output directory). Raises
    ProbeInputError / ExportError / FeatureError for user mistakes, before writing."""
    from evals.features.extractor import (
        check_layers,
        from_export,
        pixels,
        pooling_spec,
        random_init,
    )

    started = time.time()
    source = from_export(export)
    spec = source.spec
    layers = check_layers(source, args.layers.split(",") if args.layers else None)
    step = spec.get("step") if spec.get("step") is not None else export_step(export)
    run = run_of(export)
    if args.out is not None:
        out = args.out if not args.watch else args.out / f"probe-{step}"
    elif run is not None:
        out = run / "evals" / f"probe-{step}"
    else:
        raise ProbeInputError(f"{export}: not inside a run (RUN/exports/step_N); give --out")
    cache_root = args.cache or (run / "evals" / "cache" if run else out.parent / "cache")
    sources = {
        "export": source,
        "random_init": random_init(source, seed=0),
        "pixels": pixels(source.preprocess),
    }
    num_classes = len(data.classes)
    results: dict[str, dict] = {}
    splits: dict[str, dict] = {}
    for name, src in sources.items():
        use = ["pixels"] if name == "pixels" else layers
        splits[name], record = _features(src, data, use, args, cache_root)
        results[name] = {
            "name": src.name,
            "weights_hash": src.weights_hash,
            "cache": record,
            "layers": {
                layer: _evaluate_layer(splits[name][layer], num_classes, args) for layer in use
            },
        }
    first = splits["export"][layers[0]]
    chance = _chance(first.train_y, first.test_y, num_classes)
    best_layer = max(
        layers,
        key=lambda lay: (results["export"]["layers"][lay]["probe"]["val_top1"], -layers.index(lay)),
    )
    label_fraction = _label_fractions(results, splits, best_layer, num_classes, args)
    finetune = None
    if args.finetune:
        finetune = _finetune(source, data, layers[-1], num_classes, args)
    best = results["export"]["layers"][best_layer]
    metrics = {
        "export": str(export),
        "step": step,
        "stage": spec.get("stage"),
        "model": {"name": spec["name"], "kwargs": spec["kwargs"]},
        "data": data.describe(),
        "protocol": {
            "solver": args.solver,
            "grid": {
                "learning_rates": list(_grid_values("LEARNING_RATES")),
                "weight_decays": list(_grid_values("WEIGHT_DECAYS")),
                "epochs": args.epochs,
                "batch_size": 256,
                "optimizer": "SGD momentum 0.9, cosine schedule, zero init",
            },
            "lbfgs": {"Cs": list(_grid_values("INVERSE_REGULARIZATIONS")), "refit": True},
            "selection": "best validation top-1 on a stratified 20% of the training set",
            "standardization": "BatchNorm without affine, training-set statistics",
            "knn": {"k": args.knn_k, "temperature": args.knn_t, "metric": "cosine"},
            "kmeans": {
                "k": num_classes,
                "n_init": args.kmeans_init,
                "on": "train + test",
                "standardized": True,
            },  # fmt: skip
            "seeds": list(args.seeds),
            "random_init_seed": 0,
            "preprocess": source.preprocess,
            "pooling": pooling_spec(),
        },
        "sources": results,
        "chance": chance,
        "label_fraction": label_fraction,
        "finetune": finetune,
        "headline": {
            "layer": best_layer,
            "top1": best["probe"]["top1"],
            "random_init_top1": results["random_init"]["layers"][best_layer]["probe"]["top1"],
            "pixels_top1": results["pixels"]["layers"]["pixels"]["probe"]["top1"],
            "chance_top1": chance["top1"],
            "knn_top1": best["knn"]["top1"],
            "kmeans_nmi": best["kmeans"]["nmi"],
        },
        "seconds": round(time.time() - started, 2),
    }
    return metrics, out


def _grid_values(name: str) -> tuple[float, ...]:
    from evals.probes import linear

    return getattr(linear, name)


def write_outputs(metrics: dict, out: Path) -> None:
    """label_fraction.png and metrics.json into a temporary sibling of `out`, TensorBoard
    scalars into the run's tb/ at the export's step, then the directory renamed to `out`
    (its metrics.json is what marks the export done for --watch)."""
    from evals.io import build_dir, replace_dir, write_json
    from evals.probes.report import plot_label_fractions, write_scalars

    build = build_dir(out)
    try:
        plot_label_fractions(build / "label_fraction.png", metrics)
        run = run_of(Path(metrics["export"]))
        if run is not None:
            metrics["tensorboard"] = {"dir": str(run / "tb"), "step": metrics["step"]}
            metrics["tensorboard"]["scalars"] = write_scalars(
                run / "tb", int(metrics["step"]), metrics
            )
        write_json(build / "metrics.json", metrics)
        replace_dir(build, out)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def probe_once(export: Path, data: Data, args: argparse.Namespace) -> Path:
    from evals.probes.report import table

    metrics, out = evaluate(export, data, args)
    write_outputs(metrics, out)
    print(table(metrics))
    print(f"-> {out / 'metrics.json'}")
    return out


def done(run: Path, export: Path, args: argparse.Namespace) -> bool:
    """An export is done once its probe directory holds metrics.json."""
    from pretrain import read_export_spec

    try:
        step = read_export_spec(export).get("step")
    except ValueError:
        step = None
    step = export_step(export) if step is None else step
    base = args.out if args.out is not None else run / "evals"
    return (base / f"probe-{step}" / "metrics.json").is_file()


def watch(run: Path, data: Data, args: argparse.Namespace) -> int:
    """Evaluate each export of `run` once, in step order; poll for new ones until
    `--idle-exit` seconds pass without one (forever by default) or Ctrl-C."""
    from evals.features.extractor import FeatureError
    from pretrain import ExportError

    if not run.is_dir():
        raise ProbeInputError(f"{run}: no such run directory")
    idle_since = time.monotonic()
    failed: set[Path] = set()
    while True:
        todo = [e for e in list_exports(run) if e not in failed and not done(run, e, args)]
        for export in todo:
            try:
                probe_once(export, data, args)
            except (ExportError, FeatureError) as e:
                print(f"{PROG}: {e}", file=sys.stderr)
                failed.add(export)  # retried by the next watch, not by this one
            idle_since = time.monotonic()
        if args.idle_exit is not None and time.monotonic() - idle_since >= args.idle_exit:
            return 0
        pause = args.poll if args.idle_exit is None else min(args.poll, args.idle_exit)
        time.sleep(max(0.0, pause))


def _cluster(args: argparse.Namespace):
    """With --num-workers > 1, one Ray session for every extraction of the command (the
    three sources, every export of a watch), rather than a cluster started per pass."""
    if args.num_workers <= 1:
        return contextlib.nullcontext()
    from data_pipeline.ray_cluster import ray_session

    return ray_session(args.address, num_cpus=min(args.num_workers, os.cpu_count() or 1))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from evals.features.datasets import DatasetError
    from evals.features.extractor import FeatureError
    from pretrain import ExportError

    try:
        check_args(args)
        if args.watch is None and args.target is None:
            raise ProbeInputError("give an export or run, or --watch RUN")
        if args.watch is not None and args.target is not None:
            raise ProbeInputError(f"{args.target}: give either a target or --watch RUN")
        export = None if args.watch is not None else resolve_target(args.target)
        if export is not None:
            from pretrain import load_export

            load_export(export)  # a missing or corrupt export fails before the data opens
        data = open_data(args)
        with _cluster(args):
            if args.watch is not None:
                return watch(args.watch, data, args)
            probe_once(export, data, args)
        return 0
    except (ProbeInputError, DatasetError, FeatureError, ExportError, ConnectionError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
