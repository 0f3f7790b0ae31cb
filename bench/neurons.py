"""Benchmark: the neuron analysis' streaming pass against the bare forward of the same model.

    python bench/neurons.py [--images 4096] [--batch-size 64] [--device cpu]

For each model, the same decoded, normalized images (held in memory, so decoding is out
of both figures) go through (a) `model.features(x)` alone and (b) the streaming pass of
`catneuron neurons`: the same forward, then per layer the reduction over space
(`evals.features.extractor.unit_stats`) and `evals.neurons.topk.ChunkedStats` (top-K, sketch,
sums, updated once per chunk of 1,024 inputs as `catneuron neurons` does).
The two are timed batch by batch, interleaved, so that load from other processes hits
both alike. Prints images/s of each and their ratio (target >= 0.9), then the state's
size and the process RSS after 1x, 2x and 4x the inputs (flat: state is O(units x K)).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import psutil  # noqa: E402
import torch  # noqa: E402

from evals.features.extractor import unit_stats  # noqa: E402
from evals.neurons.topk import ChunkedStats, UnitStats  # noqa: E402
from pretrain import build_model  # noqa: E402

MODELS = {
    "stacked_ae (demo: 3x32x32 -> 512 -> 128)": (
        "stacked_ae",
        {"input_shape": [3, 32, 32], "hidden": [512, 128], "activation": "sigmoid"},
        32,
    ),
    "conv_ae [16, 32, 64] at 64x64": ("conv_ae", {"channels": [16, 32, 64]}, 64),
}


def run(model, batches, k, device, chunk=1024):
    states: dict[str, ChunkedStats] = {}
    bare = stream = 0.0
    for i, x in enumerate(batches):
        ids = torch.arange(i * len(x), (i + 1) * len(x))
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.features(x)
        sync()
        t1 = time.perf_counter()
        with torch.no_grad():
            feats = model.features(x)
        for name, a in feats.items():
            stats = unit_stats(a)
            if name not in states:
                states[name] = ChunkedStats(stats["unit_max"].shape[1], k, a.device, chunk)
            locs = stats["unit_argmax"] if a.ndim == 4 else None
            states[name].update(stats["unit_max"], ids, locs)
        if i == len(batches) - 1:
            for state in states.values():
                state.flush()
        sync()
        t2 = time.perf_counter()
        bare += t1 - t0
        stream += t2 - t1
    return bare, stream, {name: s.state for name, s in states.items()}


def state_bytes(states: dict[str, UnitStats]) -> int:
    return sum(
        t.numel() * t.element_size()
        for s in states.values()
        for t in (s.top_values, s.top_ids, s.top_locs, s.top_order, s.sketch, s.total)
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--top", type=int, default=9)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    device = torch.device(args.device)
    process = psutil.Process()
    print(
        f"device {device}, {torch.get_num_threads()} threads, batch {args.batch_size}, K {args.top}"
    )
    for label, (name, kwargs, side) in MODELS.items():
        torch.manual_seed(0)
        model = build_model(name, **kwargs).eval().to(device)
        n_batches = args.images // args.batch_size
        batch = torch.randn(args.batch_size, 3, side, side, device=device)
        # distinct inputs per batch without holding them all: a cheap shift of one batch
        batches = [batch.roll(i, dims=3) * (1 + 0.01 * i) for i in range(n_batches)]
        run(model, batches[:2], args.top, device)  # warm-up
        bare, stream, states = run(model, batches, args.top, device)
        images = n_batches * args.batch_size
        print(
            f"{label}: bare forward {images / bare:.0f} img/s, streaming pass "
            f"{images / stream:.0f} img/s, ratio {bare / stream:.3f} (target >= 0.9)"
        )
        for factor in (1, 2, 4):
            _, _, states = run(model, batches * factor, args.top, device)
            print(
                f"  {images * factor:6d} inputs: state {state_bytes(states) / 2**20:.2f} MiB, "
                f"RSS {process.memory_info().rss / 2**20:.0f} MiB, "
                f"count {next(iter(states.values())).count}"
            )


if __name__ == "__main__":
    main()
