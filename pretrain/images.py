"""Image grids as PNG files: filters, samples and reconstructions (no torchvision here).

Filters have arbitrary scale and sign, so `save_filter_grid` maps each one on its own
symmetric range, zero to mid-gray: an edge detector then reads as a dark and a light
band whatever its norm. Images already in [0, 1] go through `save_image_grid` as they are.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _as_array(images: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {images.shape}")
    return images


def make_grid(
    images: torch.Tensor | np.ndarray, nrow: int | None = None, padding: int = 1
) -> np.ndarray:
    """Tile (N, C, H, W) images in [0, 1] into one uint8 (rows, cols, C) array.

    `nrow` images per row (default: a near-square grid); `padding` pixels of black between.
    """
    images = _as_array(images)
    n, c, h, w = images.shape
    per_row = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / per_row)
    grid = np.zeros((rows * (h + padding) + padding, per_row * (w + padding) + padding, c))
    for i, image in enumerate(images):
        top = padding + (i // per_row) * (h + padding)
        left = padding + (i % per_row) * (w + padding)
        grid[top : top + h, left : left + w] = image.transpose(1, 2, 0)
    return (np.clip(grid, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _save(grid: np.ndarray, path: str | Path, scale: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)
    return path


def save_image_grid(
    images: torch.Tensor | np.ndarray, path: str | Path, nrow: int | None = None, scale: int = 1
) -> Path:
    """Save images in [0, 1] (clipped) as one PNG grid; `scale` enlarges small images."""
    return _save(make_grid(images, nrow), path, scale)


def save_filter_grid(
    filters: torch.Tensor | np.ndarray, path: str | Path, nrow: int | None = None, scale: int = 4
) -> Path:
    """Save filters (N, C, h, w) as a PNG grid, each scaled by its own max |value| around gray.

    Filters with other than 1 or 3 input channels show their first channel.
    """
    if isinstance(filters, torch.Tensor):
        filters = filters.detach().float().cpu().numpy()
    filters = np.asarray(filters, dtype=np.float32)
    if filters.ndim == 4 and filters.shape[1] not in (1, 3):
        filters = filters[:, :1]
    peak = np.abs(filters).reshape(len(filters), -1).max(1).reshape(-1, 1, 1, 1)
    return _save(make_grid(0.5 + 0.5 * filters / np.maximum(peak, 1e-12), nrow), path, scale)
