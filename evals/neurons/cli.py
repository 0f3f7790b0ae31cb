"""`catneuron neurons EXPORT|RUN --data DATA [--concept DATA]`: the cat-neuron analysis.

1. One streaming pass over `--data` (any number of shards; `--num-workers` Ray tasks
   each reduce a part, merged exactly): per unit of each layer its top-K inputs (a conv
   unit is a channel reduced over space by max or mean; the argmax location is kept),
   a quantile sketch, the mean and the active fraction; dead units are listed.
2. With `--concept` (two classes, e.g. `synth:cat`): every unit scored by
   `evals.neurons.selectivity` (Le et al.'s score, held-out accuracy, AUROC, chance), for the
   export and for the same architecture with random weights (`--random-seed`), from the
   shared feature cache (`evals.features.extract`); and every channel pooled with its
   `--group-size` most correlated channels on `--data` (`evals.neurons.groups`), beside it.
3. Optimal stimuli of the top units (`evals.neurons.stimulus`), receptive-field outlines at the
   argmax locations, and for a `synth:cat` concept the best units' invariance curves.
4. RUN/evals/neurons-<step>/{metrics.json, report.html, *.png} (written into a temporary
   directory, then renamed), and the same figures in the run's TensorBoard at the
   export's step: `eval/neurons/<layer>/best_heldout`, `.../best_auroc`, image grids.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.cli_help import HelpFormatter

DEFAULT_TOP = 9
DEFAULT_GROUP_SIZE = 4  # channels per grouped unit (evals.neurons.groups)
GROUP_FIT_FRAMES = 10_000  # groups are fitted on at most this many frames of --data, evenly spaced
STIMULUS_UNITS = 4


class NeuronsError(ValueError):
    """A usage error: one line, exit 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="catneuron neurons",
        description="Top-activating inputs, selectivity (trained vs random weights), optimal "
        "stimuli, invariance and an HTML report for every unit of an export's layers.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("export", type=Path, help="an export directory, or a run (its latest export)")
    p.add_argument(
        "--data", required=True, help="images for top-k (shards, ImageFolder, synth:...)"
    )
    p.add_argument("--layers", nargs="+", default=None, help="layers to analyse (default: all)")
    p.add_argument("--top", type=int, default=DEFAULT_TOP, help="K: top inputs kept per unit")
    p.add_argument("--concept", default=None, help="two-class set for selectivity (e.g. synth:cat)")
    p.add_argument(
        "--positive", default=None, help="the concept's class name (default: 'cat', else class 1)"
    )
    p.add_argument("--reduce", choices=("max", "mean"), default="max", help="conv units over space")
    p.add_argument("--num-workers", type=int, default=1, help="Ray tasks for the streaming pass")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local one)")
    p.add_argument(
        "--out", type=Path, default=None, help="output dir (default RUN/evals/neurons-<step>)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--show", type=int, default=24, help="units per layer shown in the grids")
    p.add_argument("--stimulus-units", type=int, default=STIMULUS_UNITS, help="per layer (0: none)")
    p.add_argument("--stimulus-steps", type=int, default=200, help="gradient ascent steps")
    p.add_argument("--jitter", type=int, default=1, help="stimulus: random shift per step, pixels")
    p.add_argument("--random-seed", type=int, default=0, help="seed of the random-weights baseline")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the selection/test split")
    p.add_argument(
        "--group-size",
        type=int,
        default=DEFAULT_GROUP_SIZE,
        help="with --concept: also score each channel pooled with its most correlated "
        "partners on --data (Coates et al. 2012; 0: off)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write to RUN/tb")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("top", "batch_size", "num_workers", "stimulus_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.group_size < 0:
        p.error("--group-size must be 0 (off) or more")
    return args


def resolve_export(path: Path) -> tuple[Path, Path | None]:
    """(export directory, run directory or None) for an export or a run directory."""
    if (path / "model.json").is_file():
        run = path.parent.parent if path.parent.name == "exports" else None
        return path, run
    exports = path / "exports"
    steps = []
    if exports.is_dir():
        for d in exports.glob("step_*"):
            if d.name.removeprefix("step_").isdigit() and (d / "model.json").is_file():
                steps.append((int(d.name.removeprefix("step_")), d))
    if not steps:
        if not path.exists():
            raise NeuronsError(f"{path}: no such file or directory")
        raise NeuronsError(f"{path}: neither an export (model.json) nor a run with exports/step_N")
    return max(steps)[1], path


# --------------------------------------------------------------------------- streaming


@dataclass
class _StreamJob:
    """`func(part, num_parts)` for `map_parts`: reduce one part to per-layer UnitStats."""

    source: object
    dataset: object
    layers: list[str]
    k: int
    reduce: str
    batch_size: int
    device: str | None
    progress: bool

    def __call__(self, part: int, num_parts: int) -> dict:
        from evals.features.extractor import iter_activations, unit_stats
        from evals.neurons.topk import ChunkedStats, KeyIndex

        index = KeyIndex(self.dataset.keys)
        states: dict[str, ChunkedStats] = {}
        spatial: dict[str, list[int] | None] = {}
        for batch in iter_activations(
            self.source,
            self.dataset,
            layers=self.layers,
            batch_size=self.batch_size,
            part=part,
            num_parts=num_parts,
            device=self.device,
            progress=self.progress,
            on_device=True,
        ):
            ids = index.ids(batch["key"])
            for name in self.layers:
                a = batch["acts"][name]
                stats = unit_stats(a)
                if name not in states:
                    states[name] = ChunkedStats(stats["unit_max"].shape[1], self.k, a.device)
                    spatial[name] = list(a.shape[-2:]) if a.ndim in (3, 4) else None
                values = stats["unit_max"] if self.reduce == "max" else stats["unit_mean"]
                locs = stats["unit_argmax"] if spatial[name] else None
                states[name].update(values, ids, locs)
        return {name: (s.flush().to("cpu"), spatial[name]) for name, s in states.items()}


def stream(args, source, dataset, layers: list[str]) -> tuple[dict, dict, float]:
    """(layer -> UnitStats, layer -> map size or None, seconds) over the whole of `dataset`."""
    from evals.features.extractor import map_parts

    job = _StreamJob(
        source,
        dataset,
        layers,
        args.top,
        args.reduce,
        args.batch_size,
        args.device,
        progress=not args.quiet and args.num_workers <= 1,
    )
    start = time.perf_counter()
    sizes = [
        b - a for a, b in (dataset.part_range(p, args.num_workers) for p in range(args.num_workers))
    ]
    parts = map_parts(job, args.num_workers, args.address, progress=not args.quiet, sizes=sizes)
    seconds = time.perf_counter() - start
    merged, spatial = {}, {}
    for part in parts:
        for name, (state, size) in part.items():
            if name in merged:
                merged[name].merge(state)
            else:
                merged[name], spatial[name] = state, size
    return merged, spatial, seconds


# --------------------------------------------------------------------------- concept


def positive_class(dataset, name: str | None) -> int:
    classes = list(dataset.classes)
    if len(classes) != 2:
        raise NeuronsError(
            f"{dataset.spec}: a concept needs exactly two classes, found {len(classes)} "
            f"({', '.join(classes[:6])})"
        )
    if name is not None:
        if name not in classes:
            raise NeuronsError(f"{dataset.spec}: no class {name!r}; classes: {', '.join(classes)}")
        return classes.index(name)
    return classes.index("cat") if "cat" in classes else 1


def concept_scores(args, source, data, layers: list[str], cache_root: Path) -> dict:
    """layer -> {"trained": LayerScores, "random": LayerScores, "values": (N, C), "labels",
    and with --group-size "groups": the grouped units' scores, groups fitted on `data`}."""
    import numpy as np

    from evals.features.datasets import split_indices
    from evals.features.extractor import extract, random_init
    from evals.features.sources import open_dataset
    from evals.neurons.selectivity import score_units

    concept = open_dataset(args.concept, labeled=True)
    positive = positive_class(concept, args.positive)
    common = {
        "layers": layers,
        "cache_root": cache_root,
        "batch_size": args.batch_size,
        "device": args.device,
        "progress": not args.quiet,
    }
    trained = extract(source, concept, **common)
    random_source = random_init(source, args.random_seed)
    random = extract(random_source, concept, **common)
    labels = (trained.labels == positive).astype(np.int64)
    select, test = split_indices(labels, 0.5, args.split_seed)
    kind = "unit_max" if args.reduce == "max" else "unit_mean"
    out = {}
    for name in layers:
        values = getattr(trained, kind)[name]
        out[name] = {
            "trained": score_units(values, labels, select, test),
            "random": score_units(getattr(random, kind)[name], labels, select, test),
            "values": values,
            "random_values": getattr(random, kind)[name],
            "labels": labels,
        }
    if args.group_size:
        grouped_scores(args, source, random_source, data, out, common, kind, select, test)
    return {
        "layers": out,
        "dataset": concept,
        "positive": concept.classes[positive],
        "keys": list(trained.keys),
        "test": np.asarray(test),
        "random_source": random_source,
    }


def grouped_scores(args, source, random_source, data, out, common, kind, select, test) -> None:
    """Add "groups" to each layer of `out` with at least --group-size channels: groups
    fitted on (at most GROUP_FIT_FRAMES of) the unlabeled `data` for each network, scored
    on the concept set. The streaming pass keeps only top-k state, so this is one more
    (cached) forward over those frames."""
    import numpy as np

    from evals.features.datasets import subset
    from evals.features.extractor import extract
    from evals.neurons.groups import fit_groups
    from evals.neurons.selectivity import score_units

    names = [n for n in out if out[n]["values"].shape[1] >= max(args.group_size, 2)]
    if not names:
        return
    if len(data) > GROUP_FIT_FRAMES:  # a correlation needs thousands, not all, of the frames
        positions = np.linspace(0, len(data) - 1, GROUP_FIT_FRAMES).round().astype(int)
        data = subset(data, positions, f"groups/{GROUP_FIT_FRAMES}")
    common = {**common, "layers": names}
    unlabeled = {"trained": extract(source, data, **common)}
    unlabeled["random"] = extract(random_source, data, **common)
    for name in names:
        layer, groups = out[name], {}
        for net, key in (("trained", "values"), ("random", "random_values")):
            fitted = fit_groups(getattr(unlabeled[net], kind)[name], args.group_size)
            groups[net] = score_units(fitted.values(layer[key]), layer["labels"], select, test)
            groups[f"{net}_members"] = fitted.members
        layer["groups"] = groups


# --------------------------------------------------------------------------- main


def fail(message: str) -> int:
    print(f"catneuron neurons: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from evals.features.datasets import DatasetError
    from evals.features.extractor import FeatureError
    from pretrain import ExportError

    try:
        return run(args)
    except (NeuronsError, DatasetError, FeatureError, ExportError) as e:
        return fail(str(e).splitlines()[0])
    except KeyboardInterrupt:
        print("catneuron neurons: interrupted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    from evals.features.extractor import check_layers, from_export
    from evals.features.sources import open_dataset
    from evals.neurons.analysis import analyse, write_outputs

    export, run_dir = resolve_export(args.export)
    source = from_export(export)
    layers = check_layers(source, args.layers)
    dataset = open_dataset(args.data, labeled=False)
    step = source.spec.get("step", 0)
    if args.out is not None:
        out = args.out
    elif run_dir is not None:
        out = run_dir / "evals" / f"neurons-{step}"
    else:
        out = Path(f"neurons-{step}")
    cache_root = (run_dir / "evals" / "cache") if run_dir is not None else out.parent / "cache"
    started = time.perf_counter()
    stats, spatial, stream_seconds = stream(args, source, dataset, layers)
    scores = concept_scores(args, source, dataset, layers, cache_root) if args.concept else None
    metrics, images, grids = analyse(args, source, dataset, layers, stats, spatial, scores)
    metrics["summary"].update(
        {
            "stream_seconds": round(stream_seconds, 3),
            "stream_images_per_s": round(len(dataset) / max(stream_seconds, 1e-9), 1),
            "seconds": round(time.perf_counter() - started, 3),
            "step": step,
        }
    )
    write_outputs(out, metrics, images)
    if run_dir is not None and not args.no_tensorboard:
        from evals.neurons.analysis import write_tensorboard

        write_tensorboard(run_dir / "tb", step, metrics, grids)
    head = metrics.get("headline")
    if head:
        print(
            f"neurons: best concept unit {head['unit']}: held-out {head['heldout']:.3f}, AUROC "
            f"{head['auroc']:.3f} (random weights {head['random_heldout']:.3f} / "
            f"{head['random_auroc']:.3f}, chance {head['chance']:.3f}): {head['verdict']}"
        )
    grouped = metrics.get("groups", {}).get("best")
    if grouped:
        print(
            f"neurons: best grouped unit {grouped['layer']} #{grouped['unit']} (channels "
            f"{', '.join(map(str, grouped['members']))}, pooled as on --data): held-out "
            f"{grouped['heldout']:.3f}, AUROC {grouped['auroc']:.3f} (random weights "
            f"{grouped['random_heldout']:.3f} / {grouped['random_auroc']:.3f})"
        )
    print(f"neurons: {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
