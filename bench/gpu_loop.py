"""The in-process half of bench/gpu.sh: what a `catneuron train` log cannot tell.

    python -m bench.gpu_loop --config configs/vqvae2_256.yaml --out figures.json \
        [--profile profile.txt] [--steps 30] [key.sub=value ...]

One process, one rank (NCCL on a GPU, gloo on CPU), the run config's model and batch:

1. `matmul`: an 8192^3 bf16 matrix product, the machine's measured matrix ceiling
   (the H200's datasheet 989 TFLOP/s is the MFU denominator; this says how far off it is).
2. `engine`: the plain PyTorch loop of the same model, batch, optimizer and numerics
   (bf16 weights, fp32 master copies, AdamW, clipping, as DeepSpeed's bf16 mode does)
   beside the DeepSpeed engine, steps interleaved, on batches already on the device:
   the engine's overhead per step (target <= 5%), FLOPs per step from FlopCounterMode
   and the MFU of each.
3. `profile`: a torch.profiler summary of a few engine steps (where the time goes).
4. `loader`: the trainer's loader alone at the config's `num_workers`, batches delivered
   on the device: how many images/s it can feed, to set beside training's.
5. `features`: `model.features` forward in eval mode under no_grad (fp32; bf16 weights;
   bf16 autocast) beside the evals' extractor, `evals.features.iter_activations` over the
   shards ("not yet" while it is missing or a stub).

Every part is timed with the device synchronized around each step; figures are medians
after warm-up steps. A part that fails records its error and the others still run.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pretrain.config import TrainConfig, load_config, resolve_deepspeed
from pretrain.models import Autoencoder, Stage, build_model
from pretrain.monitor import peak_tflops

Figures = dict[str, Any]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], device: torch.device) -> float:
    """Seconds of one call, with the device drained before and after."""
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def matmul_ceiling(device: torch.device) -> Figures:
    """TFLOP/s of an 8192^3 bf16 product: 3 warm-ups, the mean of 10 (as KINDS.md measured)."""
    if device.type != "cuda":
        return {"skipped": "no GPU"}
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 10
    return {"tflops": 2 * n**3 / seconds / 1e12, "shape": [n, n, n]}


class PlainLoop:
    """The step a user would write without DeepSpeed, with DeepSpeed's numerics.

    In low precision the weights are cast like the engine casts them (the VQ codebooks
    refuse the cast and stay fp32), gradients are copied into fp32 master weights, and
    AdamW and clipping run on those; the updated masters are copied back.
    """

    def __init__(self, model: Autoencoder, stage: Stage, config: TrainConfig, dtype: torch.dtype):
        self.stage = stage
        self.params = stage.parameters()
        self.clip = float(config.deepspeed.get("gradient_clipping", 1.0))
        if dtype != torch.float32:
            model.to(dtype)
            self.masters = [p.detach().float().clone() for p in self.params]
        else:
            self.masters = self.params
        o = config.optimizer
        self.optimizer = torch.optim.AdamW(
            self.masters, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )

    def __call__(self, x: Tensor) -> None:
        with torch.no_grad():
            prepared = self.stage.prepare(x)
        loss, _ = self.stage.loss(prepared)
        loss.backward()
        if self.masters is not self.params:
            for master, p in zip(self.masters, self.params, strict=True):
                master.grad = p.grad.float() if p.grad is not None else None
                p.grad = None
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.masters, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.masters is not self.params:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.masters)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bench:
    """One rank's model, engine, plain loop and batches, shared by the parts below."""

    def __init__(self, config: TrainConfig, steps: int) -> None:
        from pretrain.train import FrameStream, build_engine, engine_dtype, init_distributed

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        self.on_gpu = torch.cuda.is_available()
        init_distributed(self.on_gpu)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if self.on_gpu
            else torch.device("cpu")
        )
        self.config, self.steps = config, steps
        self.ds_config = resolve_deepspeed(config, 1, self.on_gpu)
        self.dtype = engine_dtype(self.ds_config)
        self.memory_format = (
            torch.channels_last if config.run.channels_last else torch.contiguous_format
        )
        self.peak = peak_tflops(
            config.logging.peak_tflops, low_precision=self.dtype != torch.float32
        )

        stream = FrameStream(config, device=self.device, with_labels=False, epoch=0, samples=0)
        self.batches = [self._input(next(stream)["image"]) for _ in range(4)]
        self.batch_size = len(self.batches[0])

        torch.manual_seed(config.run.seed)
        template = build_model(config.model.name, **config.model.kwargs)
        if len(template.stages()) != 1:
            raise ValueError(
                f"{config.model.name}: the plain-loop comparison needs a one-stage model"
            )
        # As the trainer does: parameters stay contiguous (DeepSpeed `.view()`s them flat),
        # only the inputs are channels_last and convolutions carry the format on.
        self.fresh_model = lambda: copy.deepcopy(template).to(self.device)
        plain_model = self.fresh_model()
        self.plain = PlainLoop(plain_model, plain_model.stages()[0], config, self.dtype)
        engine_model = self.fresh_model()
        self.engine = build_engine(
            engine_model, engine_model.stages()[0], config, self.ds_config, steps
        )

    def _input(self, image: Tensor) -> Tensor:
        return image.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)

    def engine_step(self, x: Tensor) -> None:
        loss, _ = self.engine(x)
        self.engine.backward(loss)
        self.engine.step()

    def mfu(self, flops: float, seconds: float) -> float | None:
        return flops / seconds / 1e12 / self.peak if self.peak else None

    def compare(self, warmup: int) -> Figures:
        """Interleaved plain and engine steps, so that load from elsewhere hits both alike."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self.plain(self.batches[0])
        flops = counter.get_total_flops()
        times: dict[str, list[float]] = {"plain": [], "engine": []}
        for i in range(self.steps):
            x = self.batches[i % len(self.batches)]
            times["plain"].append(timed(functools.partial(self.plain, x), self.device))
            times["engine"].append(timed(functools.partial(self.engine_step, x), self.device))
        figures: Figures = {"flops_per_step": flops, "batch": self.batch_size, "steps": self.steps}
        for name, samples in times.items():
            step_s = statistics.median(samples[warmup:])
            figures[name] = {
                "step_ms": 1000 * step_s,
                "images_per_s": self.batch_size / step_s,
                "tflops": flops / step_s / 1e12,
                "mfu": self.mfu(flops, step_s),
            }
        figures["overhead"] = figures["engine"]["step_ms"] / figures["plain"]["step_ms"] - 1
        if self.on_gpu:
            figures["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return figures

    def profile(self, steps: int, path: Path | None) -> Figures:
        """Where a step's time goes: the top operators by self time on the device (CPU here)."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_gpu else [])
        sync(self.device)
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            for i in range(steps):
                self.engine_step(self.batches[i % len(self.batches)])
            sync(self.device)
        wall_ms = 1000 * (time.perf_counter() - start) / steps
        averages = prof.key_averages()
        key = "self_device_time_total" if self.on_gpu else "self_cpu_time_total"
        if self.on_gpu and not hasattr(averages[0], key):
            key = "self_cuda_time_total"  # older torch
        rows = sorted(averages, key=lambda e: getattr(e, key), reverse=True)
        busy_ms = sum(getattr(e, key) for e in averages) / 1000 / steps
        if path is not None:
            path.write_text(averages.table(sort_by=key, row_limit=30))
        top = [
            {
                "op": e.key,
                "ms_per_step": getattr(e, key) / 1000 / steps,
                "calls_per_step": e.count / steps,
            }
            for e in rows[:12]
        ]
        figures: Figures = {"steps": steps, "wall_ms_per_step": wall_ms, "top": top}
        if self.on_gpu:
            # Kernel time against wall time: the rest is the GPU waiting for the host.
            figures["device_busy_ms_per_step"] = busy_ms
            figures["device_idle_share"] = max(0.0, 1 - busy_ms / wall_ms)
        return figures

    def loader(self, batches: int, warmup: int) -> Figures:
        """The trainer's loader alone (its shipped workers), batches delivered on the device."""
        from pretrain.train import FrameStream

        stream = FrameStream(self.config, device=self.device, with_labels=False, epoch=0, samples=0)
        for _ in range(warmup):
            next(stream)
        sync(self.device)
        start = time.perf_counter()
        for _ in range(batches):
            image = next(stream)["image"]
        sync(self.device)
        seconds = time.perf_counter() - start
        return {
            "num_workers": self.config.data.num_workers,
            "batches": batches,
            "images_per_s": batches * len(image) / seconds,
        }

    def features(self, iterations: int, warmup: int) -> Figures:
        """`model.features` in eval mode under no_grad on a batch already on the device: fp32,
        and on a GPU bf16 weights and inputs, and fp32 weights under bf16 autocast (what the
        evals' extractor does); then the extractor itself, end to end from the shards."""
        figures: Figures = {"batch": self.batch_size}
        variants = {"fp32": (torch.float32, False)}
        if self.on_gpu:
            variants |= {"bf16": (torch.bfloat16, False), "autocast_bf16": (torch.float32, True)}
        for name, (dtype, autocast) in variants.items():
            model = self.fresh_model().to(dtype).eval()
            x = self.batches[0].to(dtype)
            forward = functools.partial(model.features, x)
            with torch.no_grad(), torch.autocast(self.device.type, enabled=autocast):
                samples = [timed(forward, self.device) for _ in range(warmup + iterations)]
            figures[f"bare_{name}_images_per_s"] = self.batch_size / statistics.median(
                samples[warmup:]
            )
        figures["extractor"] = self.extractor(images=self.batch_size * (warmup + iterations))
        return figures

    def extractor(self, images: int) -> Figures:
        """`evals.features.iter_activations` of a random-init source over the shards: images/s
        including reading, preprocessing and the copy of every layer back to the host."""
        try:
            from evals.features.extractor import iter_activations, random_init
            from evals.features.sources import open_dataset
        except ImportError as e:
            return {"status": f"not yet (evals.features.extractor does not import: {e})"}
        from pretrain.export import preprocess_spec

        c = self.config
        spec = {"name": c.model.name, "kwargs": c.model.kwargs, "preprocess": preprocess_spec(c)}
        try:
            source = random_init(spec, seed=0)
            dataset = open_dataset(str(c.data.source), labeled=False)
            batches = iter_activations(
                source, dataset, batch_size=self.batch_size, device=self.device, progress=False
            )
            next(batches)  # warm-up: the first batch pays for start-up
            sync(self.device)
            start, seen = time.perf_counter(), 0
            for batch in batches:
                seen += len(batch["key"])
                if seen >= images:
                    break
            sync(self.device)
            seconds = time.perf_counter() - start
        except NotImplementedError:
            return {"status": "not yet (evals.features.extractor is still a stub)"}
        if seen == 0:
            return {"status": "the shards gave the extractor a single batch: nothing timed"}
        return {"status": "ok", "images": seen, "images_per_s": seen / seconds}


def run_part(figures: Figures, name: str, part: Callable[[], Figures]) -> None:
    start = time.perf_counter()
    try:
        figures[name] = part()
    except Exception as e:  # one part failing must not cost the others' figures
        figures[name] = {
            "error": f"{type(e).__name__}: {e}",
            "trace": traceback.format_exc()[-3000:],
        }
    figures[name]["seconds"] = time.perf_counter() - start
    print(f"gpu_loop: {name} done in {figures[name]['seconds']:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_loop",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, required=True, help="run config YAML")
    parser.add_argument("--out", type=Path, required=True, help="figures JSON written here")
    parser.add_argument("--profile", type=Path, default=None, help="profiler table written here")
    parser.add_argument("--steps", type=int, default=30, help="interleaved steps per loop")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the medians")
    parser.add_argument(
        "--loader-batches", type=int, default=60, help="batches timed from the loader"
    )
    parser.add_argument("--profile-steps", type=int, default=5, help="engine steps profiled")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    figures: Figures = {"config": str(args.config), "overrides": args.overrides}
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    save = functools.partial(write_json, args.out, figures)
    run_part(figures, "matmul", lambda: matmul_ceiling(device))
    try:
        bench = Bench(config, args.steps)
    except Exception as e:
        figures["setup_error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
        save()
        print(f"gpu_loop: setup failed: {e}", file=sys.stderr)
        return 1
    figures["peak_tflops"] = bench.peak
    warmup = min(args.warmup, args.steps - 1)
    parts: dict[str, Callable[[], Figures]] = {
        "engine": lambda: bench.compare(warmup),
        "profile": lambda: bench.profile(args.profile_steps, args.profile),
        "loader": lambda: bench.loader(args.loader_batches, warmup=3),
        "features": lambda: bench.features(max(3, args.steps // 2), warmup=2),
    }
    for name, part in parts.items():
        run_part(figures, name, part)
        save()  # after every part: a run cut off at its timeout keeps what it measured
    import deepspeed.comm

    deepspeed.comm.destroy_process_group()
    return 0


def write_json(path: Path, figures: Figures) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(figures, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
