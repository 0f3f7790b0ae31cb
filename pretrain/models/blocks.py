"""Building blocks shared by the convolutional and fully connected autoencoders.

Normalization is GroupNorm, never BatchNorm: DeepSpeed does not synchronize buffers
across ranks (PITFALLS.md), and GroupNorm has none, so every rank computes the same
function and a checkpoint does not depend on which rank saved it.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}

DECODER_MODES = ("transposed", "upsample")


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}'; choose from {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def group_norm(channels: int, max_groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= `max_groups` that divides `channels`."""
    return nn.GroupNorm(math.gcd(channels, max_groups), channels)


def down_block(in_ch: int, out_ch: int, act: str) -> nn.Sequential:
    """Halve the sides: 4x4 stride-2 convolution, GroupNorm, activation."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1), group_norm(out_ch), activation(act)
    )


def upsample_conv(in_ch: int, out_ch: int, mode: str) -> nn.Module:
    """Double the sides: a 4x4 stride-2 transposed convolution, or nearest upsampling + 3x3 conv.

    The second avoids the checkerboard artifacts of transposed convolutions (Odena et al.
    2016) at the cost of a convolution at the higher resolution.
    """
    if mode == "transposed":
        return nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1)
    if mode == "upsample":
        return nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        )
    raise ValueError(f"unknown decoder '{mode}'; choose from {', '.join(DECODER_MODES)}")


def up_block(in_ch: int, out_ch: int, act: str, mode: str, last: bool) -> nn.Sequential:
    """Mirror of `down_block`; the `last` one (to pixels) is affine, with no norm or activation."""
    if last:
        return nn.Sequential(upsample_conv(in_ch, out_ch, mode))
    return nn.Sequential(upsample_conv(in_ch, out_ch, mode), group_norm(out_ch), activation(act))


def check_sides(x: Tensor, depth: int, model: str) -> None:
    """Refuse inputs whose sides do not divide by 2^depth (a decoder could not restore them)."""
    multiple = 2**depth
    if x.ndim != 4 or x.shape[-1] % multiple or x.shape[-2] % multiple:
        raise ValueError(
            f"{model} with {depth} blocks needs (B, C, H, W) inputs with H and W divisible by "
            f"{multiple}, got shape {tuple(x.shape)}"
        )


def one_hot(labels: Tensor, num_classes: int, like: Tensor) -> Tensor:
    """Labels (B,) -> one-hot rows (B, num_classes) in `like`'s dtype and device."""
    if labels.ndim != 1 or labels.shape[0] != like.shape[0]:
        raise ValueError(f"expected one label per sample, got shape {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {labels.tolist()}")
    return nn.functional.one_hot(labels.long(), num_classes).to(like.dtype)
