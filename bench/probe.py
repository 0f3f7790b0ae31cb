"""Probe benchmarks: feature extraction against a bare forward loop, and the grid probe
against scikit-learn's LogisticRegression on the same cached features.

    python bench/probe.py                      # configs/conv_ae.yaml's model, digits at 64 px
    python bench/probe.py --config configs/tiny/conv_ae.yaml --repeats 3

Extraction: the model of `--config` (random weights, written as a real export) over
scikit-learn's 1797 digits upscaled to the config's input size. Printed images/s of
(a) `model.features(x)` in eval mode under no_grad over batches decoded and normalized
beforehand (the floor: forward only), (b) the same loop decoding as it goes
(`EvalDataset.batches`, then forward), (c) `evals.features.extract` into a fresh cache
(decode, forward, pooling, unit statistics, .npy files, index). The issue's target is
c/a >= 0.9; c/b isolates what the cache adds to a decoding loop. Best of `--repeats`,
taken in turns.

Probe: the cached pooled features of the last layer; our grid of lr x weight decay
(28 heads, one pass) against 28 scikit-learn LogisticRegression fits (lbfgs, one C
each, logspace over the lbfgs probe's range), both on standardized features, plus our
L-BFGS probe. Seconds and test top-1.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml


def _best(times: list[float]) -> float:
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/conv_ae.yaml")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="cProfile one more extraction and print its N largest functions by own time",
    )  # fmt: skip
    parser.add_argument("--extract-only", action="store_true", help="skip the probe part")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from evals.features.datasets import split_indices
    from evals.features.extractor import extract, from_export
    from evals.features.sources import open_dataset
    from evals.probes.linear import INVERSE_REGULARIZATIONS, grid_probe, lbfgs_probe, standardize
    from pretrain import build_model
    from pretrain.export import write_export

    config = yaml.safe_load(Path(args.config).read_text())
    data, model_cfg = config["data"], config["model"]
    side = data.get("crop") or data.get("resize")
    preprocess = {
        "resize": data.get("resize"),
        "crop": data.get("crop"),
        "grayscale": bool(data.get("grayscale", False)),
        "mean": list(data.get("mean", [0.5])),
        "std": list(data.get("std", [0.25])),
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench-probe-"))
    torch.manual_seed(0)
    model = build_model(model_cfg["name"], **model_cfg["kwargs"])
    export = write_export(
        model.state_dict(), model.spec, tmp / "exports" / "step_0",
        stage=0, step=0, config_hash="bench", preprocess=preprocess,
    )  # fmt: skip
    source = from_export(export)
    dataset = open_dataset(f"sklearn:digits?size={side}")
    n = len(dataset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = source.model.to(device).eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    decoded = [b["image"] for b in dataset.batches(preprocess, args.batch_size)]
    print(
        f"model {model_cfg['name']} {model_cfg['kwargs']} from {args.config}; "
        f"{n} digits at {side} px; device {device}; torch threads {torch.get_num_threads()}"
    )

    def forward_only() -> float:
        start = time.perf_counter()
        with torch.no_grad(), autocast:
            for x in decoded:
                out = net.features(x.to(device, non_blocking=True))
        if device.type == "cuda":
            torch.cuda.synchronize()
        del out
        return time.perf_counter() - start

    def decode_forward() -> float:
        start = time.perf_counter()
        with torch.no_grad(), autocast:
            for batch in dataset.batches(preprocess, args.batch_size):
                out = net.features(batch["image"].to(device, non_blocking=True))
        if device.type == "cuda":
            torch.cuda.synchronize()
        del out
        return time.perf_counter() - start

    def extraction(k: int) -> float:
        start = time.perf_counter()
        extract(
            source, dataset, cache_root=tmp / f"cache{k}", batch_size=args.batch_size,
            progress=False, device=device,
        )  # fmt: skip
        return time.perf_counter() - start

    import os

    def serial_extraction(k: int) -> float:
        os.environ["CATNEURON_FEATURES_SERIAL"] = "1"
        try:
            return extraction(100 + k)
        finally:
            del os.environ["CATNEURON_FEATURES_SERIAL"]

    forward_only()  # warm up (allocator, kernels)
    times: dict[str, list[float]] = {"a": [], "b": [], "c": [], "d": []}
    for k in range(args.repeats):
        times["a"].append(forward_only())
        times["b"].append(decode_forward())
        times["c"].append(extraction(k))
        times["d"].append(serial_extraction(k))
    rate = {key: n / _best(v) for key, v in times.items()}
    print(f"\nextraction, images/s (best of {args.repeats})")
    print(f"  (a) forward only, pre-decoded   {rate['a']:10.1f}")
    print(f"  (b) decode + forward            {rate['b']:10.1f}")
    print(f"  (c) extract (+ pool, cache)     {rate['c']:10.1f}")
    print(f"  (d) extract, serial (before)    {rate['d']:10.1f}")
    print(
        f"  c/a = {rate['c'] / rate['a']:.2f} (target >= 0.9)   c/b = {rate['c'] / rate['b']:.2f}"
        f"   d/a = {rate['d'] / rate['a']:.2f}   c/d = {rate['c'] / rate['d']:.2f}"
    )

    print(f"  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.profile:
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        extraction(args.repeats)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.profile)
        print("\ncProfile of one extraction (by own time):")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip()))
    if args.extract_only:
        return
    feats = extract(source, dataset, cache_root=tmp / "cache0", progress=False)
    assert not feats.extracted
    layer = feats.layers[-1]
    x, y = feats.pooled[layer], feats.labels
    train, test = split_indices(y, 0.25, 0)
    print(
        f"\nprobe on cached {layer} features: {x.shape[1]} dims, {len(train)} train / {len(test)} test"
    )
    start = time.perf_counter()
    grid = grid_probe(x[train], y[train], x[test], y[test], 10, device=device)
    t_grid = time.perf_counter() - start
    settings = len(grid.grid)
    start = time.perf_counter()
    lbfgs = lbfgs_probe(x[train], y[train], x[test], y[test], 10, device=device)
    t_lbfgs = time.perf_counter() - start

    from sklearn.linear_model import LogisticRegression

    z_train, z_test = (
        a.numpy()
        for a in standardize(
            torch.as_tensor(x[train]).double(),
            torch.as_tensor(x[train]).double(),
            torch.as_tensor(x[test]).double(),
        )
    )
    cs = np.logspace(
        np.log10(min(INVERSE_REGULARIZATIONS)), np.log10(max(INVERSE_REGULARIZATIONS)), settings
    )
    start = time.perf_counter()
    best = 0.0
    for c in cs:
        fit = LogisticRegression(C=float(c), max_iter=100).fit(z_train, y[train])
        best = max(best, fit.score(z_test, y[test]))
    t_sklearn = time.perf_counter() - start
    print(f"  grid probe, {settings} heads, one pass ({grid.setting['epochs']} epochs)"
          f"   {t_grid:7.2f} s   top-1 {grid.top1:.3f}")  # fmt: skip
    print(f"  sklearn LogisticRegression x {settings} C values      "
          f"   {t_sklearn:7.2f} s   best test top-1 {best:.3f} (chosen on test: optimistic)")  # fmt: skip
    print(f"  our L-BFGS probe, {len(INVERSE_REGULARIZATIONS)} C + refit"
          f"                {t_lbfgs:7.2f} s   top-1 {lbfgs.top1:.3f}")  # fmt: skip
    print(f"  sklearn / grid = {t_sklearn / t_grid:.1f}x")


if __name__ == "__main__":
    main()
