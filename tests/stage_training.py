"""Training loops shared by the model tests: the trainer's stage protocol, without DeepSpeed.

`train_stage` does what `pretrain.train` does per step (frozen modules in eval mode,
`prepare` under no_grad, the stage loss, an optimizer over the stage's parameters only)
so that the tests exercise the same code path as a real run.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from pretrain.models import Autoencoder, Stage


def stage_mode(model: Autoencoder, stage: Stage) -> None:
    model.eval()
    for module in stage.trainable:
        module.train()


def train_stage(
    model: Autoencoder,
    stage: Stage,
    batches,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
) -> list[float]:
    """Run `steps` Adam steps on `stage`; `batches(step)` returns (x, cond). Returns the losses."""
    optimizer = torch.optim.AdamW(stage.parameters(), lr=lr, weight_decay=weight_decay)
    stage_mode(model, stage)
    losses = []
    for step in range(steps):
        x, cond = batches(step)
        with torch.no_grad():
            prepared = stage.prepare(x)
        loss, _ = stage.loss(prepared, cond)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def fixed_batch(x: Tensor, cond: Tensor | None = None):
    return lambda step: (x, cond)


def bf16_loss_gap(model: Autoencoder, x: Tensor, cond: Tensor | None = None) -> tuple[float, float]:
    """Eval-mode loss in fp32 and in bf16 (a cast copy), to check bf16 stays finite and close."""
    model.eval()
    low = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        full, _ = model.loss(x, model(x, cond))
        half, _ = low.loss(x.bfloat16(), low(x.bfloat16(), cond))
    return float(full), float(half)
