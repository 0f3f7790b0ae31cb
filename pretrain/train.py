"""What every rank runs: `python -m pretrain.train --config RUN.yaml [key.sub=value ...]`.

`catneuron train` starts this under the DeepSpeed launcher; users of the `deepspeed`
command can start it themselves (`deepspeed --module pretrain.train --config ...`).

The loop, top to bottom: join the process group, build the model, then walk its greedy
stages from where the run stands. Each stage gets its own DeepSpeed engine over that
stage's trainable parameters; the frozen predecessors run inside the engine's forward in
eval mode under no_grad. A step is `gradient_accumulation_steps` micro-batches. Every
`checkpoint.every` steps and at each stage end the engine is checkpointed on all ranks
and rank 0 writes an export.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import deepspeed
import deepspeed.comm
import deepspeed.ops
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from data_pipeline.keys import key_ids
from pretrain import checkpoint
from pretrain.checkpoint import TrainerState
from pretrain.config import ConfigError, TrainConfig, load_config, resolve_deepspeed
from pretrain.export import export_dir, preprocess_spec, write_export
from pretrain.models import Autoencoder, Stage, build_model
from pretrain.monitor import Monitor, metric_tag, peak_tflops
from pretrain.stop import EXIT_PREEMPTED, STOP_FILE, StopFlag, stopped_line


class NonFiniteLoss(RuntimeError):
    """The loss of some rank is inf or NaN: the run stops, keeping its last checkpoint."""


class Preempted(Exception):
    """A stop signal reached some rank: every rank saved at the same step and stops."""


class StageModule(nn.Module):
    """The module a stage's engine wraps: frozen `prepare`, then the stage's loss.

    Going through the engine's forward keeps DeepSpeed's hooks in play. The whole model
    is a submodule, so checkpoints hold every weight, frozen ones included; `train()`
    keeps everything but the trainable modules in eval mode.
    """

    def __init__(self, model: Autoencoder, stage: Stage):
        super().__init__()
        self.model = model
        self.stage = stage

    def train(self, mode: bool = True) -> StageModule:
        self.training = mode
        self.model.eval()
        for module in self.stage.trainable:
            module.train(mode)
        for module in self.stage.frozen:
            module.eval()
        return self

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        with torch.no_grad():
            prepared = self.stage.prepare(x)
        return self.stage.loss(prepared, cond)


class FrameStream:
    """Endless micro-batches for this rank, tracking the data position a checkpoint stores.

    The position is (epoch, samples this rank consumed in it); the loader skips those
    samples on resume, and every rank holds the same position because every rank runs
    the same number of steps.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        device: torch.device,
        with_labels: bool,
        epoch: int,
        samples: int,
    ):
        self.config, self.device, self.with_labels = config, device, with_labels
        self.epoch, self.samples = epoch, samples
        self._batches = None

    def _open(self):
        from data_pipeline.loader import frame_loader

        d = self.config.data
        loader = frame_loader(
            d.source,
            batch_size=d.batch_size,
            resize=d.resize,
            crop=d.crop,
            random_crop=d.random_crop,
            flip=d.flip,
            grayscale=d.grayscale,
            mean=d.mean,
            std=d.std,
            shuffle_buffer=d.shuffle_buffer,
            seed=self.config.run.seed,
            epoch=self.epoch,
            num_workers=d.num_workers,
            resampled=d.resampled,
            batches_per_epoch=d.batches_per_epoch,
            start_sample=self.samples,
            with_labels=self.with_labels,
            device=self.device,
        )
        return iter(loader)

    def __next__(self) -> dict[str, Any]:
        for _ in range(2):
            if self._batches is None:
                self._batches = self._open()
            batch = next(self._batches, None)
            if batch is not None:
                self.samples += len(batch["image"])
                return batch
            self.epoch, self.samples, self._batches = self.epoch + 1, 0, None
        raise RuntimeError(
            f"data.source '{self.config.data.source}' gives this rank no batch in an epoch"
        )


def init_distributed(on_gpu: bool) -> None:
    """Join the process group (gloo on CPU) that the launcher's environment describes.

    On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op on first use (minutes
    on a fresh machine); it only serves `inference_all_reduce`, never training, so it is
    marked unavailable in DeepSpeed's op table (the dict is meant to be edited).
    """
    if not on_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    if on_gpu:
        torch.cuda.set_device(int(deepspeed.comm.get_local_rank()))


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """LR multiplier: linear warmup from 0, then cosine down to `min_lr_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_engine(
    model: Autoencoder, stage: Stage, config: TrainConfig, ds_config: dict, steps: int
):
    trainable = {id(p) for p in stage.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    o = config.optimizer
    optimizer = torch.optim.AdamW(
        stage.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(config.schedule.warmup_steps, steps, config.schedule.min_lr_ratio)
    )
    engine, *_ = deepspeed.initialize(
        model=StageModule(model, stage),
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=ds_config,
    )
    if config.run.compile:
        engine.compile()
    return engine


def engine_dtype(ds_config: dict) -> torch.dtype:
    if ds_config["bf16"].get("enabled"):
        return torch.bfloat16
    if ds_config["fp16"].get("enabled"):
        return torch.float16
    return torch.float32


NO_STEP = float("inf")


class Interval:
    """Loss, metrics and timings accumulated between two log lines on this rank.

    Losses and metrics stay on the device as tensors, and so does the first step whose
    loss was not finite: a training step never waits for the device. The host reads
    them once per interval (`first_bad_step`, `summary`), with one all-reduce each, so
    every rank learns of a bad loss at the same step and they stop together.
    """

    def __init__(self, device: torch.device) -> None:
        self.seconds = self.data_wait = 0.0
        self.steps = self.images = 0
        self.metric_sums: dict[str, Tensor] = {}
        self.bad_step = torch.full((), NO_STEP, dtype=torch.float64, device=device)

    def add_micro_batch(
        self, loss: Tensor, metrics: dict[str, Tensor | float], weight: float, step: int
    ) -> None:
        loss = loss.detach().float()
        self.bad_step = torch.where(
            torch.isfinite(loss), self.bad_step, self.bad_step.clamp(max=step)
        )
        for key, value in {"loss": loss, **metrics}.items():
            tag = metric_tag(key)
            self.metric_sums[tag] = self.metric_sums.get(tag, 0.0) + value * weight

    def first_bad_step(self) -> int | None:
        """The first step of this interval with a non-finite loss on any rank (a collective)."""
        bad = self.bad_step.clone()
        dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        value = bad.item()
        return None if value == NO_STEP else int(value)

    def summary(self, flops_per_step: float | None, peak: float | None) -> dict[str, float]:
        """Metrics averaged over steps and ranks (a collective), and this rank's perf figures."""
        keys = sorted(self.metric_sums)
        device = self.bad_step.device
        means = torch.stack(
            [torch.as_tensor(self.metric_sums[k], device=device).double() for k in keys]
        )
        means /= self.steps
        dist.all_reduce(means)
        values = dict(zip(keys, (means / dist.get_world_size()).tolist(), strict=True))
        step_s = self.seconds / self.steps
        values.update(
            {
                "perf/images_per_s": self.images / self.seconds,
                "perf/step_ms": 1000 * step_s,
                "perf/data_wait_ms": 1000 * self.data_wait / self.steps,
                "perf/data_wait_share": self.data_wait / self.seconds,
            }
        )
        if torch.cuda.is_available():
            values["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if flops_per_step:
            values["perf/tflops"] = flops_per_step / step_s / 1e12
            if peak:
                values["perf/mfu"] = values["perf/tflops"] / peak
        return values


def on_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """A loader batch with its images on the device in the training dtype (for setups)."""
    return {**batch, "image": batch["image"].to(device, dtype)}


def train_step(
    engine,
    data: FrameStream,
    interval: Interval,
    step: int,
    dtype: torch.dtype,
    memory_format,
    count_flops: bool,
) -> tuple[Tensor, Tensor | None, float | None]:
    """One optimizer step over `gradient_accumulation_steps` micro-batches, with no host sync.

    Returns the last micro-batch (for image logs) and, if asked, the FLOPs of the step
    measured by FlopCounterMode on its first micro-batch (it does not change the numbers).
    """
    accumulation = engine.gradient_accumulation_steps()
    model: Autoencoder = engine.module.model
    flops = None
    for micro in range(accumulation):
        wait_start = time.perf_counter()
        batch = next(data)
        interval.data_wait += time.perf_counter() - wait_start
        x = (
            batch["image"]
            .to(engine.device, dtype, non_blocking=True)
            .contiguous(memory_format=memory_format)
        )
        cond = None
        if model.conditional:
            cond = batch["cls"].to(engine.device)
        elif engine.module.stage.keyed:  # per-frame targets made by the stage's setup
            cond = key_ids(batch["key"]).to(engine.device)
        counter = FlopCounterMode(display=False) if count_flops and micro == 0 else None
        with counter or contextlib.nullcontext():
            loss, metrics = engine(x, cond)
            engine.backward(loss)
        if counter is not None:
            flops = counter.get_total_flops() * accumulation
        engine.step()
        interval.add_micro_batch(loss, metrics, 1 / accumulation, step)
        interval.images += len(x) * dist.get_world_size()
    interval.steps += 1
    return x, cond, flops


def train(config: TrainConfig, stop: StopFlag | None = None) -> None:
    """Train to the end, or raise `Preempted` after saving at the step a stop signal reached."""
    stop = stop or StopFlag(config.run_dir / STOP_FILE)
    on_gpu = torch.cuda.is_available()
    init_distributed(on_gpu)
    if dist.get_rank() == 0 and stop.stop_file is not None:
        stop.stop_file.unlink(missing_ok=True)  # a stop already served
    dist.barrier()
    stop.prepare_group()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    ds_config = resolve_deepspeed(config, world_size, on_gpu)
    dtype = engine_dtype(ds_config)
    memory_format = torch.channels_last if config.run.channels_last else torch.contiguous_format
    peak = peak_tflops(config.logging.peak_tflops, low_precision=dtype != torch.float32)

    # Same initial weights on every rank (DeepSpeed broadcasts rank 0's anyway), own noise per rank.
    torch.manual_seed(config.run.seed)
    # Parameters stay contiguous, and only activations are channels_last (the input is
    # converted in `train_step`; convolutions propagate the format). DeepSpeed broadcasts
    # and flattens parameters through `.view()`s that a channels_last weight cannot take
    # (`_broadcast_model` fails on 2+ ranks), and ZeRO's flat buffers would undo it anyway.
    model = build_model(config.model.name, **config.model.kwargs).to(device)
    torch.manual_seed(config.run.seed + rank)
    np.random.seed(config.run.seed + rank)
    stages = model.stages()
    stage_steps = config.steps_per_stage(len(stages))

    # Where the run stands: a fresh start, or the latest checkpoint.
    run_dir, checkpoint_dir = config.run_dir, config.run_dir / "checkpoints"
    say = functools.partial(print, file=sys.stderr, flush=True) if rank == 0 else _silent
    found = checkpoint.find_resumable(checkpoint_dir, say) if config.checkpoint.resume else None
    last_tag, resume, unreadable = found if found else (None, None, [])
    if resume and resume.config["model"] != config.to_dict()["model"]:
        raise ConfigError(
            f"{checkpoint_dir / last_tag}: this run was started with another 'model' section"
        )
    start = resume or TrainerState(
        config.to_dict(), stage=0, stage_step=0, global_step=0, epoch=0, samples=0
    )
    if rank == 0:
        resumed = f", resuming from {last_tag}" if resume else ""
        print(
            f"{config.model.name}: {len(stages)} stage(s), {sum(stage_steps)} steps on {world_size} rank(s){resumed}"
        )

    with_labels = model.conditional or config.data.with_labels
    data = FrameStream(
        config, device=device, with_labels=with_labels, epoch=start.epoch, samples=start.samples
    )
    monitor = Monitor(
        run_dir,
        enabled=rank == 0,
        start_step=start.global_step,
        total_steps=sum(stage_steps),
        mean=config.data.mean,
        std=config.data.std,
    )
    global_step, final_metrics = start.global_step, {}
    recipe = config.recipe_hash()

    for stage_index in range(start.stage, len(stages)):
        stage, steps = stages[stage_index], stage_steps[stage_index]
        engine = build_engine(model, stage, config, ds_config, steps)
        stage_step = 0
        if resume is not None:
            state = checkpoint.load(engine, checkpoint_dir, last_tag)
            checkpoint.restore_rng_state(state.rng, rank)
            stage_step, resume = state.stage_step, None
            dist.barrier()  # every rank has read its files before the bad ones move
            if rank == 0:
                checkpoint.set_aside(checkpoint_dir, unreadable)
        if stage_step == 0 and stage.setup is not None:
            started = time.perf_counter()
            stage.setup(lambda: on_device(next(data), device, dtype))
            say(
                f"stage {stage_index} ({stage.name}): set up in {time.perf_counter() - started:.1f}s"
            )
        if stage_step < steps:
            monitor.stage_started(global_step, stage_index, stage.name)
        flops_per_step, interval = None, Interval(device)

        while stage_step < steps:
            step_start = time.perf_counter()
            x, cond, flops = train_step(
                engine,
                data,
                interval,
                global_step + 1,
                dtype,
                memory_format,
                flops_per_step is None,
            )
            flops_per_step = flops_per_step or flops
            interval.seconds += time.perf_counter() - step_start
            stage_step, global_step = stage_step + 1, global_step + 1

            preempted = stop.agreed()  # one tiny gloo all-reduce: no device sync
            stopping = global_step == config.run.stop_after_step or preempted
            logging_now = global_step % config.logging.every == 0 or stage_step == steps
            saving_now = (
                global_step % config.checkpoint.every == 0 or stage_step == steps or stopping
            )
            if logging_now or saving_now:  # never log or checkpoint a diverged model
                bad_step = interval.first_bad_step()
                if bad_step is not None:
                    kept = (
                        f"the last good checkpoint is {last_tag}"
                        if last_tag
                        else "no checkpoint was written yet"
                    )
                    raise NonFiniteLoss(
                        f"non-finite loss at stage {stage_index} ({stage.name}) step {bad_step}: stopping; {kept}"
                    )
            if logging_now:
                values = interval.summary(flops_per_step, peak)
                values.update({"train/lr": engine.get_lr()[0], "stage": float(stage_index)})
                monitor.scalars(global_step, values, stage_name=stage.name)
                final_metrics, interval = {"loss": values["train/loss"]}, Interval(device)
            if config.logging.image_every and global_step % config.logging.image_every == 0:
                log_images(monitor, global_step, engine, x, cond)

            if saving_now:
                state = TrainerState(
                    config.to_dict(),
                    stage_index,
                    stage_step,
                    global_step,
                    data.epoch,
                    data.samples,
                    checkpoint.gather_rng_states(),
                )
                last_tag = checkpoint.save(
                    engine, checkpoint_dir, state, config.checkpoint.keep_last
                )
                weights = checkpoint.full_precision_weights(model)  # a collective
                if rank == 0:
                    out_dir = export_dir(run_dir, global_step)
                    write_export(
                        weights,
                        model.spec,
                        out_dir,
                        stage=stage_index,
                        step=global_step,
                        config_hash=recipe,
                        preprocess=preprocess_spec(config),
                    )
            if stopping:
                monitor.close()
                if preempted:
                    dist.barrier()  # the export is written: the ranks exit together
                    if rank == 0:
                        say(stopped_line(global_step, stop.signum, last_tag))
                    raise Preempted(last_tag)
                return
    monitor.finish(config.to_dict(), final_metrics)


def _silent(*_: object, **__: object) -> None:
    """`print` on ranks other than 0."""


def log_images(monitor: Monitor, step: int, engine, x: Tensor, cond: Tensor | None) -> None:
    """A no-grad forward of the whole model on every rank (a model may hold collectives), logged on rank 0."""
    model: Autoencoder = engine.module.model
    model.eval()
    with torch.no_grad():
        outputs = model(x[:8], cond[:8]) if cond is not None else model(x[:8])
    engine.module.train(True)
    monitor.images(step, x, outputs, model.filters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.train",
        description="One training rank (started by the DeepSpeed launcher).",
    )
    parser.add_argument("--config", required=True, type=Path, help="run config YAML")
    parser.add_argument(
        "overrides", nargs="*", help="key.sub=value overrides (values parsed as YAML)"
    )
    parser.add_argument(
        "--local_rank", type=int, default=None, help="set by the DeepSpeed launcher; unused"
    )
    args = parser.parse_args(argv)
    stop = StopFlag().install()  # first: a signal from here on stops at a step boundary
    try:
        config = load_config(args.config, args.overrides)
        stop.stop_file = config.run_dir / STOP_FILE
        train(config, stop)
    except Preempted:
        return EXIT_PREEMPTED
    except (ConfigError, NonFiniteLoss) as e:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"catneuron train: {e}", file=sys.stderr, flush=True)
        # 3, not 1: a crashed rank exits 1, and `--max-restarts` retries that but never this
        return 2 if isinstance(e, ConfigError) else 3
    finally:
        stop.ignore()  # a signal resent while this process exits must not kill it mid-exit
        if dist.is_initialized():
            deepspeed.comm.destroy_process_group()
    return 0


if __name__ == "__main__":
    # Out without the interpreter's teardown: once the process group is gone and every file
    # is closed, C++ destructors of gloo's threads at exit can still abort a finished rank
    # ("terminate called without an active exception"), turning a clean run into a crash.
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
