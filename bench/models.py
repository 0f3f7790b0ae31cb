"""Forward+backward images/s, parameters and peak memory of every registered model.

Each (model, size, variant) case runs in its own subprocess, so that peak memory is that
case's alone: on CUDA `torch.cuda.max_memory_allocated` (weights included), on CPU the
growth of the process's maximum resident set (`getrusage`) over its size once the model
and the batch exist, i.e. what the steps add (activations, gradients, workspace). A
step is the model's full loss (all greedy stages' objectives at once for stacked models)
and its backward; there is no optimizer step. Variants, combinable with `+`:
`fp32`; `bf16` (weights and inputs cast, as DeepSpeed's bf16 mode does); `autocast` (fp32
weights under bf16 autocast); `channels_last`; `compile` (torch.compile of the model).

    python -m bench.models --device cpu --sizes 64 128 --steps 2
    python -m bench.models --device cuda --variants fp32 bf16 bf16+channels_last bf16+compile
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

from pretrain.models import available_models, build_model
from pretrain.models.local_sparse import footprint

REPO = Path(__file__).resolve().parents[1]
VARIANT_FLAGS = ("bf16", "autocast", "channels_last", "compile")

#: kwargs that adapt each model to the image side; models not listed take any size as is.
SIZE_KWARGS: dict[str, Callable[[int], dict]] = {
    "stacked_ae": lambda side: {"input_shape": [3, side, side]},
    "vae": lambda side: {"input_shape": [3, side, side]},
    "cvae": lambda side: {"input_shape": [3, side, side]},
    "vqvae2": lambda side: {"levels": 3 if side >= 256 else 2},
    "local_sparse": lambda side: {"input_size": side},
}


@dataclass
class Case:
    model: str
    side: int
    variant: str
    device: str
    batch: int
    steps: int
    threads: int


@dataclass
class Result:
    params: int = 0
    images_per_s: float = 0.0
    peak_mb: float = 0.0
    note: str = ""


def parse_variant(variant: str) -> set[str]:
    flags = set() if variant == "fp32" else set(variant.split("+"))
    unknown = flags - set(VARIANT_FLAGS)
    if unknown:
        raise ValueError(
            f"unknown variant flag(s) {sorted(unknown)}; use fp32 or {'+'.join(VARIANT_FLAGS)}"
        )
    return flags


def run_case(case: Case) -> Result:
    """Build, warm up once (twice when compiled), then time `case.steps` steps."""
    torch.set_num_threads(case.threads)
    flags = parse_variant(case.variant)
    device = torch.device(case.device)
    model = build_model(case.model, **SIZE_KWARGS.get(case.model, lambda side: {})(case.side))
    params = sum(p.numel() for p in model.parameters())
    dtype = torch.bfloat16 if "bf16" in flags else torch.float32
    memory_format = torch.channels_last if "channels_last" in flags else torch.contiguous_format
    model = model.to(device=device, dtype=dtype, memory_format=memory_format).train()
    x = torch.randn(case.batch, 3, case.side, case.side, device=device, dtype=dtype)
    x = x.contiguous(memory_format=memory_format)
    cond = torch.zeros(case.batch, dtype=torch.long, device=device) if model.conditional else None
    forward = torch.compile(model) if "compile" in flags else model
    use_autocast = "autocast" in flags

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            out = forward(x, cond) if cond is not None else forward(x)
            loss, _ = model.loss(x, out)
        loss.backward()
        model.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rss_before = psutil.Process().memory_info().rss  # model and batch, before any step
    for _ in range(2 if "compile" in flags else 1):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(case.steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:  # ru_maxrss is in KiB on Linux: the high-water mark of the steps, warm-up included
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before, 0)
    return Result(params, case.batch * case.steps / elapsed, peak / 2**20)


def run_in_subprocess(case: Case, timeout: float) -> Result:
    command = [sys.executable, "-m", "bench.models", "--case", json.dumps(asdict(case))]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return Result(note=f"skipped: over {timeout:.0f} s")
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return Result(note=f"failed: {lines[-1] if lines else f'exit {done.returncode}'}")
    return Result(**json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="image sides")
    p.add_argument("--models", nargs="+", default=None, help="registry names (default: all)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per case")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument(
        "--variants", nargs="+", default=None, help="default: fp32 on CPU; all four on CUDA"
    )
    p.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="CPU threads per case"
    )
    p.add_argument(
        "--timeout", type=float, default=300, help="seconds per case before it is skipped"
    )
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    args = p.parse_args(argv)

    if args.case:
        print(json.dumps(asdict(run_case(Case(**json.loads(args.case))))))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.models: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    names = args.models or available_models()
    unknown = set(names) - set(available_models())
    if unknown:
        print(f"bench.models: unknown model(s) {sorted(unknown)}", file=sys.stderr)
        return 2
    variants = args.variants or (
        ["fp32"]
        if args.device == "cpu"
        else ["fp32", "autocast", "bf16", "channels_last", "compile"]
    )
    try:
        for variant in variants:
            parse_variant(variant)
    except ValueError as e:
        print(f"bench.models: {e}", file=sys.stderr)
        return 2

    print(
        f"device {args.device}, batch {args.batch}, {args.steps} timed steps, torch {torch.__version__}"
    )
    print(
        f"{'model':<16}{'side':>6}  {'variant':<22}{'params':>12}{'img/s':>10}{'peak MB':>10}  note"
    )
    for name in names:
        for side in args.sizes:
            for variant in variants:
                case = Case(name, side, variant, args.device, args.batch, args.steps, args.threads)
                r = run_in_subprocess(case, args.timeout)
                figures = (
                    f"{r.params:>12,}{r.images_per_s:>10.1f}{r.peak_mb:>10.0f}"
                    if not r.note
                    else " " * 32
                )
                print(f"{name:<16}{side:>6}  {variant:<22}{figures}  {r.note}", flush=True)
    if "local_sparse" in names:
        paper = footprint(input_size=200, receptive_field=18, stride=1)
        print(
            f"local_sparse at the paper's 200x200 / 18x18 / stride 1 (computed, not run): "
            f"{paper['params']:,} params, {paper['weight_bytes'] / 2**30:.1f} GiB fp32 weights, "
            f"{paper['train_bytes_largest_block'] / 2**30:.1f} GiB to train the largest block with Adam"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
