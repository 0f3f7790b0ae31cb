"""The one interface every catneuron model keeps (see DESIGN.md, "Models").

The trainer, the greedy schedule and the evals never look inside a model: they call
`forward`, `loss`, `features` and `stages`, so that a new family needs no trainer change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

Metrics = dict[str, Tensor | float]
"""Loss terms for logging: detached 0-d tensors (on the model's device) or floats."""


@dataclass(frozen=True)
class Stage:
    """One step of greedy layer-wise training.

    `prepare` maps a raw input batch to this stage's input by running the frozen
    predecessors; the trainer calls it in eval mode under `torch.no_grad()`, so no
    activations are kept for backward. `loss` maps that prepared input (and the
    conditioning labels of conditional models) to `(loss, metrics)` and is the only
    part that builds a graph. Only the parameters of `trainable` get an optimizer.

    `setup`, if any, runs once when the stage starts fresh (not when a checkpoint taken
    inside the stage resumes it): it gets a callable returning this rank's next training
    batch (the loader's dict: `image` on the device, `key` the sample keys) and fits
    whatever the loss needs from the data (cluster targets, stretch labels), into buffers
    that checkpoints keep. It runs on every rank and may hold collectives.

    A `keyed` stage's loss gets the batch's key ids (`data_pipeline.keys.key_ids`, on the
    device) in place of `cond`: per-frame targets made by `setup` are looked up by them.
    """

    name: str
    trainable: tuple[nn.Module, ...]
    prepare: Callable[[Tensor], Tensor]
    loss: Callable[..., tuple[Tensor, Metrics]]
    frozen: tuple[nn.Module, ...] = field(default=())
    setup: Callable[[Callable[[], dict]], None] | None = None
    keyed: bool = False

    def parameters(self) -> list[nn.Parameter]:
        """The parameters of `trainable`, less those of `frozen` (a frozen part may sit
        inside a trainable module, as a teacher inside the model it teaches)."""
        skip = {id(p) for module in self.frozen for p in module.parameters()}
        seen: dict[int, nn.Parameter] = {}
        for module in self.trainable:
            for p in module.parameters():
                if id(p) not in skip:
                    seen.setdefault(id(p), p)
        return list(seen.values())


class Autoencoder(nn.Module):
    """Base class: subclasses implement `forward`, `loss` and `features`.

    `conditional` models (cvae, shared_encoder) take a per-sample integer `cond`
    (class label or domain id) in `forward`, `loss` and their stages; the trainer
    passes the batch's `cls` to them and to no one else.
    """

    conditional: bool = False
    #: set by `build_model`: {"name": registry name, "kwargs": constructor kwargs}
    spec: dict

    def forward(self, x: Tensor, cond: Tensor | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def loss(self, x: Tensor, out: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        raise NotImplementedError

    def features(self, x: Tensor, cond: Tensor | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def feature(self, x: Tensor, layer: str, cond: Tensor | None = None) -> Tensor:
        """`features(x)[layer]`. Why a method of its own: the optimal stimuli climb one
        layer hundreds of times, and a family whose layers run in order overrides this to
        stop at that layer (the same values, without the forward of the layers above)."""
        return self.features(x, cond)[layer]

    def stages(self) -> list[Stage]:
        """End to end by default: one stage over every parameter."""
        return [self.end_to_end_stage()]

    def end_to_end_stage(self, name: str = "end_to_end") -> Stage:
        def loss(x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Metrics]:
            return self.loss(x, self(x, cond) if self.conditional else self(x))

        return Stage(name=name, trainable=(self,), prepare=_identity, loss=loss)

    def filters(self) -> Tensor | None:
        """First-layer filters as an image batch (N, C, h, w) for TensorBoard, if any."""
        return None


def layer_depth(name: str, prefix: str, count: int) -> int | None:
    """3 for `prefix` + "3" when 1 <= 3 <= count; None for any other name."""
    tail = name.removeprefix(prefix)
    if tail == name or not tail.isdigit() or not 1 <= int(tail) <= count:
        return None
    return int(tail)


def _identity(x: Tensor) -> Tensor:
    return x


def detached_metrics(metrics: dict[str, Tensor | float]) -> Metrics:
    """Metrics for logging, detached and left where they are.

    Converting each to a Python float here would wait for the device on every
    micro-batch; the trainer sums them on the device and reads them once per logging
    interval. Call `float()` on a value to read it.
    """
    return {k: v.detach().float() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
