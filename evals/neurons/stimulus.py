"""Inputs that drive units: the optimal stimulus, and receptive fields, by gradients.

Optimal stimulus (Le et al. 2012, section 4.3): the input x of fixed L2 norm that
maximizes a unit, x* = argmax_x f(x) subject to ||x||_2 = r, found by projected gradient
ascent: a step along the normalized gradient, then back onto the sphere, with an
optional random shift of the input by up to `jitter` pixels each step (a common trick
that keeps the stimulus from exploiting single pixels; the last fifth of the steps run
without it). Inputs live in the model's input space (after the export's mean/std), and
r is the norm of the unit's best real input in that space, so that the two activations
compare inputs of the same "energy": the real input is itself a point on the sphere.

Receptive field of a convolutional unit at a map location: where the gradient of that
location (summed over channels, so that a dead channel does not hide it) with respect to
the input is at least `RF_FRACTION` of its largest value, over two random inputs: the
effective receptive field, from the model itself, for convolutions, locally connected
layers and pooling alike. The fraction matters because normalization over the map
(GroupNorm, contrast normalization) makes every location depend a little on every pixel:
the exact support would always be the whole image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

RF_FRACTION = 0.1


def input_shape_of(preprocess: dict) -> tuple[int, int, int]:
    """(channels, side, side) of the model's input under an export's preprocessing."""
    side = int(preprocess.get("crop") or preprocess["resize"])
    return (1 if preprocess.get("grayscale") else 3, side, side)


def reduce_units(activation: Tensor, reduce: str) -> Tensor:
    """(B, C, H, W) -> (B, C) by max or mean over space, (B, H, W) as one channel, (B, D)
    unchanged: the value a unit is ranked by, differentiably."""
    a = activation.float()
    if a.ndim == 3:
        a = a.unsqueeze(1)
    if a.ndim == 2:
        return a
    flat = a.flatten(2)
    if reduce == "max":
        return flat.amax(2)
    if reduce == "mean":
        return flat.mean(2)
    raise ValueError(f"reduce must be max or mean, got {reduce!r}")


def unit_values(model: nn.Module, layer: str, x: Tensor, units: Tensor, reduce: str) -> Tensor:
    """(B,) the activation of unit `units[i]` of `layer` on input `x[i]`."""
    reduced = reduce_units(model.feature(x, layer), reduce)
    return reduced.gather(1, units.view(-1, 1)).squeeze(1)


@dataclass
class Stimulus:
    """Per optimized unit: the input (U, C, H, W) on its sphere, its activation, the
    radius, the activation at the random start and the step count."""

    images: Tensor
    activation: Tensor
    radius: Tensor
    start_activation: Tensor
    steps: int


def optimal_stimulus(
    model: nn.Module,
    layer: str,
    units: Sequence[int],
    input_shape: Sequence[int],
    radius: Tensor,
    *,
    reduce: str = "max",
    steps: int = 200,
    lr: float = 0.1,
    jitter: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    fallback: Tensor | None = None,
) -> Stimulus:
    """Projected gradient ascent for each of `units` (one batch row each, independent,
    as every model's features are per sample in eval mode).

    `radius` (U,) is the L2 norm every stimulus keeps; `lr` the step as a fraction of
    the radius, decayed by a cosine to 1% of it. The best iterate (activation without
    jitter) is returned. A unit with no gradient at its random start (a ReLU unit whose
    bias keeps it off) starts instead from its row of `fallback` (e.g. its best real
    input), projected onto the sphere. Raises RuntimeError if the layer is not
    differentiable.
    """
    model = model.eval().to(device)
    u = len(units)
    unit_index = torch.as_tensor(list(units), dtype=torch.int64, device=device)
    radius = radius.to(device, torch.float32).view(-1)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((u, *input_shape), generator=generator).to(device)
    x = _project(x, radius)
    if fallback is not None:
        x.requires_grad_(True)
        with torch.enable_grad():
            values = unit_values(model, layer, x, unit_index, reduce)
            if values.requires_grad:
                (grad,) = torch.autograd.grad(values.sum(), x)
                stuck = grad.flatten(1).norm(dim=1) == 0
                x = x.detach()
                x[stuck] = _project(fallback.to(device, torch.float32)[stuck], radius[stuck])
        x = x.detach()
    best_x, best_value, start_value = x.clone(), None, None
    for step in range(steps + 1):
        x.requires_grad_(True)
        shift = (0, 0)
        if jitter and step < 0.8 * steps:
            shift = tuple(
                int(s) for s in torch.randint(-jitter, jitter + 1, (2,), generator=generator)
            )
        moved = torch.roll(x, shifts=shift, dims=(-2, -1)) if shift != (0, 0) else x
        with torch.enable_grad():
            values = unit_values(model, layer, moved, unit_index, reduce)
            if not values.requires_grad:
                raise RuntimeError(f"layer {layer} is not differentiable with respect to the input")
            (grad,) = torch.autograd.grad(values.sum(), x)
        with torch.no_grad():
            if shift == (0, 0):
                value = values.detach()
            else:
                value = unit_values(model, layer, x, unit_index, reduce)
            if start_value is None:
                start_value, best_value = value.clone(), value.clone()
            better = value > best_value
            best_value = torch.where(better, value, best_value)
            best_x[better] = x.detach()[better]
            if step == steps:
                break
            size = lr * 0.5 * (1 + math.cos(math.pi * step / steps)) * 0.99 + lr * 0.01
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * len(input_shape))
            x = _project(x.detach() + size * radius.view_as(norm) * grad / norm, radius)
    return Stimulus(best_x, best_value, radius, start_value, steps)


def _project(x: Tensor, radius: Tensor) -> Tensor:
    """x scaled onto the sphere of `radius` (per row)."""
    norm = x.flatten(1).norm(dim=1).clamp_min(1e-12)
    return x * (radius / norm).view(-1, *[1] * (x.ndim - 1))


def receptive_fields(
    model: nn.Module,
    layer: str,
    locations: Sequence[tuple[int, int]],
    input_shape: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    draws: int = 2,
    seed: int = 0,
) -> dict[tuple[int, int], tuple[int, int, int, int] | None]:
    """(row, col) of `layer`'s map -> the input box (x0, y0, x1, y1), half-open, that the
    location sees; None where the gradient is zero everywhere. One backward for all."""
    wanted = sorted(set((int(r), int(c)) for r, c in locations))
    if not wanted:
        return {}
    model = model.eval().to(device)
    generator = torch.Generator().manual_seed(seed)
    magnitude = torch.zeros((len(wanted), *input_shape[-2:]))
    rows = torch.tensor([r for r, _ in wanted], device=device)
    cols = torch.tensor([c for _, c in wanted], device=device)
    for _ in range(draws):
        x = torch.randn((len(wanted), *input_shape), generator=generator).to(device)
        x.requires_grad_(True)
        with torch.enable_grad():
            a = model.feature(x, layer).float()
            if a.ndim == 3:
                a = a.unsqueeze(1)
            if a.ndim != 4:
                raise RuntimeError(f"layer {layer} has no spatial map")
            picked = a[torch.arange(len(wanted), device=device), :, rows, cols]
            (grad,) = torch.autograd.grad(picked.sum(), x)
        magnitude += grad.abs().sum(1).cpu()
    peak = magnitude.flatten(1).amax(1).view(-1, 1, 1)
    support = (magnitude >= RF_FRACTION * peak) & (peak > 0)
    boxes: dict[tuple[int, int], tuple[int, int, int, int] | None] = {}
    for i, location in enumerate(wanted):
        ys, xs = torch.nonzero(support[i], as_tuple=True)
        if len(ys) == 0:
            boxes[location] = None
        else:
            boxes[location] = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return boxes
