"""Training telemetry on rank 0: TensorBoard, a JSON-lines log beside it, one console line.

Tags follow DESIGN.md: `train/loss`, `train/<metric>`, `train/lr`, `stage`, `perf/...`,
and model metrics that already carry a namespace (`vq/<level>_perplexity`) verbatim.
Every other rank gets a Monitor that does nothing, so the training loop never asks
which rank it is on to log.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

# Peak dense bf16 TFLOPS of one device, for MFU; other devices need `logging.peak_tflops`.
_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def metric_tag(key: str) -> str:
    """Metrics with a namespace keep it (`vq/top_usage`); the rest go under `train/`."""
    return key if "/" in key else f"train/{key}"


def peak_tflops(configured: float | None, low_precision: bool) -> float | None:
    """The MFU denominator: the configured value, else a known GPU's bf16 peak, else none (CPU)."""
    if configured is not None:
        return configured
    if not (torch.cuda.is_available() and low_precision):
        return None
    name = torch.cuda.get_device_name()
    return next((tflops for model, tflops in _PEAK_BF16_TFLOPS.items() if model in name), None)


class Monitor:
    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        start_step: int,
        total_steps: int,
        mean: list[float],
        std: list[float],
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self._mean = torch.tensor(mean).view(1, -1, 1, 1)
        self._std = torch.tensor(std).view(1, -1, 1, 1)
        self._started = time.perf_counter()
        self._first_step: int | None = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            # A resumed run replaces what a crashed one logged after its last checkpoint.
            self.writer = SummaryWriter(
                str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None
            )
            self._jsonl = (run_dir / "log.jsonl").open("a")

    def scalars(self, step: int, values: dict[str, float], *, stage_name: str) -> None:
        """One logging interval: TensorBoard scalars, a log.jsonl record, a console line."""
        if not self.enabled:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._jsonl.flush()
        print(self._console_line(step, values, stage_name), flush=True)

    def _console_line(self, step: int, values: dict[str, float], stage_name: str) -> str:
        if self._first_step is None:
            self._first_step, self._started = step, time.perf_counter()
            eta = "?"
        else:
            per_step = (time.perf_counter() - self._started) / max(step - self._first_step, 1)
            eta = _duration(per_step * (self.total_steps - step))
        return (
            f"step {step}/{self.total_steps}  stage {int(values['stage'])} ({stage_name})  "
            f"loss {values['train/loss']:.5f}  lr {values['train/lr']:.2e}  "
            f"{values['perf/images_per_s']:.1f} img/s  {values['perf/step_ms']:.0f} ms/step  "
            f"data {100 * values['perf/data_wait_share']:.0f}%  eta {eta}"
        )

    def stage_started(self, step: int, stage: int, name: str) -> None:
        if self.enabled:
            self.writer.add_scalar("stage", stage, step)
            self.writer.add_text("stage_name", f"stage {stage}: {name}", step)
            print(f"stage {stage} ({name}) starts at step {step}", flush=True)

    def images(
        self, step: int, inputs: Tensor, outputs: dict[str, Tensor], filters: Tensor | None
    ) -> None:
        """Inputs beside reconstructions (pairs in a grid), first-layer filters, code histograms.
        A model that reconstructs something other than its input (wta_conv_ae's `highpass`)
        returns it as `target`, and that is shown beside the reconstruction instead."""
        if not self.enabled:
            return
        x = outputs.get("target", inputs)[:8].detach().float().cpu()
        recon = outputs["recon"][:8].detach().float().cpu().reshape(x.shape)
        pairs = torch.stack([x, recon], dim=1).flatten(0, 1)
        self.writer.add_images("images/input_recon", self._to_unit_range(pairs), step)
        if filters is not None:
            f = filters.detach().float().cpu()
            if f.shape[1] not in (1, 3):
                f = f[:, :1]
            lo = f.amin(dim=(1, 2, 3), keepdim=True)
            hi = f.amax(dim=(1, 2, 3), keepdim=True)
            self.writer.add_images("images/filters", (f - lo) / (hi - lo).clamp_min(1e-8), step)
        for key, codes in outputs.items():
            if key.startswith("codes_"):
                level = key.removeprefix("codes_")
                self.writer.add_histogram(f"vq/{level}_codes", codes.detach().flatten().cpu(), step)

    def _to_unit_range(self, images: Tensor) -> Tensor:
        if self._mean.shape[1] in (1, images.shape[1]):
            images = images * self._std + self._mean
        return images.clamp(0, 1)

    def finish(self, config: dict[str, Any], final: dict[str, float]) -> None:
        """Record the run's hyperparameters with its final metrics (TensorBoard's HPARAMS tab)."""
        if not self.enabled:
            return
        flat = {k: v for k, v in _flatten(config).items() if isinstance(v, (int, float, str, bool))}
        experiment, session_start, session_end = hparams(
            flat, {f"hparam/{k}": v for k, v in final.items()}
        )
        for summary in (experiment, session_start, session_end):
            self.writer.file_writer.add_summary(summary)
        for k, v in final.items():
            self.writer.add_scalar(f"hparam/{k}", v)
        self.close()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self._jsonl.close()
            self.enabled = False


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )
