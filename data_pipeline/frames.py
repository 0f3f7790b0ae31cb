"""Frame samples to training tensors: JPEG decode, resize, crop, flip, normalize, batch.

Decoding runs inside the loader workers, one sample at a time, with Pillow: `draft()`
lets libjpeg decode straight at a reduced scale when the target is much smaller than
the stored frame, which is most of the cost saved. Batches stay uint8 until they reach
the consuming process (see `collate_frames`), where `PixelNormalizer` makes floats.
Random crops and flips draw from a generator seeded by (seed, epoch, key), so a
sample's augmentation does not depend on which worker decodes it or on how many
samples a resumed run skipped.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

Sample = dict[str, Any]


@dataclass(frozen=True)
class FrameDecoder:
    """Decodes the `jpg` of a webdataset sample into a uint8 (H, W, C) array."""

    resize: int | None = None
    crop: int | None = None
    random_crop: bool = False
    flip: bool = False
    grayscale: bool = False
    with_labels: bool = False
    seed: int = 0
    epoch: int = 0

    def _open(self, data: bytes) -> Image.Image:
        mode = "L" if self.grayscale else "RGB"
        image = Image.open(io.BytesIO(data))
        if self.resize is None:
            return _in_mode(image, mode)
        width, height = image.size
        scale = self.resize / min(width, height)
        size = (max(self.resize, round(width * scale)), max(self.resize, round(height * scale)))
        image.draft(mode, size)
        image = _in_mode(image, mode)
        return image if image.size == size else image.resize(size, Image.Resampling.BILINEAR)

    def _augment(self, image: Image.Image, key: str) -> Image.Image:
        # Seeding a generator from a string hashes it: only when something is random.
        rng = None
        if self.random_crop or self.flip:
            rng = random.Random(f"augment/{self.seed}/{self.epoch}/{key}")
        if self.crop is not None:
            width, height = image.size
            if self.crop > min(width, height):
                raise ValueError(f"crop {self.crop} is larger than frame {key} ({width}x{height})")
            if self.random_crop:
                left, top = rng.randint(0, width - self.crop), rng.randint(0, height - self.crop)
            else:
                left, top = (width - self.crop) // 2, (height - self.crop) // 2
            image = image.crop((left, top, left + self.crop, top + self.crop))
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def __call__(self, sample: Sample) -> Sample:
        key = sample["__key__"]
        if "jpg" not in sample:
            raise ValueError(f"{sample['__url__']}: sample {key} has no jpg member")
        image = self._augment(self._open(sample["jpg"]), key)
        array = np.asarray(image)
        frame = {"key": key, "image": array[..., None] if array.ndim == 2 else array}
        frame["valid"] = sample.get("__valid__", True)
        if self.with_labels:
            if "cls" not in sample:
                raise ValueError(f"{sample['__url__']}: sample {key} has no cls label")
            frame["cls"] = int(sample["cls"])
        return frame


def _in_mode(image: Image.Image, mode: str) -> Image.Image:
    """`image` decoded in `mode`: `convert` would copy a frame that already is in it."""
    if image.mode != mode:
        return image.convert(mode)
    image.load()
    return image


def collate_frames(frames: list[Sample]) -> dict[str, Any]:
    """Stacks decoded frames into a batch whose pixels are still uint8 (B, H, W, C).

    Batches cross from loader workers to the training process through shared memory;
    uint8 pixels are a quarter of the bytes of float32 ones, and that copy, not the
    arithmetic, is what a worker would otherwise spend most of its time on.
    """
    shapes = {f["image"].shape for f in frames}
    if len(shapes) > 1:
        raise ValueError(
            f"frames of different sizes {sorted(shapes)} in one batch: set resize and crop"
        )
    batch = {
        "image": torch.from_numpy(np.stack([f["image"] for f in frames])),
        "key": [f["key"] for f in frames],
        "valid": torch.tensor([f["valid"] for f in frames], dtype=torch.bool),
    }
    if "cls" in frames[0]:
        batch["cls"] = torch.tensor([f["cls"] for f in frames], dtype=torch.int64)
    return batch


class PixelNormalizer:
    """uint8 (B, H, W, C) pixels to float32 (B, C, H, W), scaled to [0, 1] then standardized.

    One fused pass: `pixels * (1 / (255 std)) - mean / std`, on whatever device the
    pixels are on, so a GPU trainer can move the small uint8 batch and normalize there.

    On the CPU the pass runs in NumPy, on the calling thread, not in torch: a batch is
    big enough for torch to fan the op out over its OpenMP pool, whose threads then
    spin-wait between batches on the very cores the loader workers decode on. On the
    2-core VM that cost a quarter of the throughput with one worker (bench/loader.py).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels: int) -> None:
        for name, values in (("mean", mean), ("std", std)):
            if len(values) not in (1, channels):
                raise ValueError(f"{name} has {len(values)} values for {channels}-channel frames")
        mean_ = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        std_ = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std_), -mean_ / std_

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.device.type == "cpu":
            chw = pixels.numpy().transpose(0, 3, 1, 2)
            images = np.empty(chw.shape, dtype=np.float32)
            np.multiply(chw, self.scale.numpy(), out=images)
            return torch.from_numpy(np.add(images, self.shift.numpy(), out=images))
        batch, height, width, channels = pixels.shape
        images = torch.empty(
            (batch, channels, height, width), dtype=torch.float32, device=pixels.device
        )
        scale, shift = self.scale.to(pixels.device), self.shift.to(pixels.device)
        torch.mul(pixels.permute(0, 3, 1, 2), scale, out=images)
        return images.add_(shift)
