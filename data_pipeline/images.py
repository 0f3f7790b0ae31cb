"""Still images (files, in-memory arrays) to the loader's tensors, with the loader's own code.

Evals read ImageFolder directories and synthetic or bundled images besides shards, and
must hand the model exactly the pixels training gave it. So the deterministic part of
`data_pipeline.frames.FrameDecoder` (resize of the shorter side, centre crop, grayscale)
and `PixelNormalizer` are reused here, not rewritten: image files go through the very
decoder the loader runs on a shard's `jpg` bytes (JPEG `draft` included), in-memory
images through the same resize and crop steps. A `preprocess` dict is model.json's
(`resize`, `crop`, `grayscale`, `mean`, `std`); nothing here knows what a model is.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_pipeline.frames import FrameDecoder, PixelNormalizer, _in_mode, collate_frames

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PREPROCESS_KEYS = ("resize", "crop", "grayscale", "mean", "std")


def check_preprocess(preprocess: dict) -> dict:
    """`preprocess` with every key present (one-line ValueError naming the missing ones)."""
    missing = [k for k in PREPROCESS_KEYS if k not in preprocess]
    if missing:
        raise ValueError(f"preprocess spec lacks {', '.join(missing)}: got {preprocess}")
    return preprocess


def decoder_for(preprocess: dict) -> FrameDecoder:
    """The loader's decoder with training's deterministic settings (no random crop or flip)."""
    p = check_preprocess(preprocess)
    return FrameDecoder(resize=p["resize"], crop=p["crop"], grayscale=bool(p["grayscale"]))


def normalizer_for(preprocess: dict) -> PixelNormalizer:
    p = check_preprocess(preprocess)
    return PixelNormalizer(p["mean"], p["std"], channels=1 if p["grayscale"] else 3)


def decode_bytes(data: bytes, decoder: FrameDecoder, key: str) -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W, C), exactly as the loader decodes a shard's `jpg`."""
    return decoder({"__key__": key, "jpg": data, "__url__": key})["image"]


def prepare_array(image: np.ndarray | Image.Image, decoder: FrameDecoder, key: str) -> np.ndarray:
    """An in-memory RGB image -> uint8 (H, W, C) through the decoder's resize and crop.

    Equal to `decode_bytes` of the same image losslessly encoded (PNG), where `draft`
    does nothing; the test suite checks it.
    """
    if isinstance(image, np.ndarray) and _unchanged(image, decoder):
        return image  # what the steps below would return, without PIL's two copies
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    mode = "L" if decoder.grayscale else "RGB"
    pil = _in_mode(pil, mode)
    if decoder.resize is not None:
        width, height = pil.size
        scale = decoder.resize / min(width, height)
        size = (
            max(decoder.resize, round(width * scale)),
            max(decoder.resize, round(height * scale)),
        )
        if pil.size != size:
            pil = pil.resize(size, Image.Resampling.BILINEAR)
    array = np.asarray(decoder._augment(pil, key))  # the loader's crop, nothing re-implemented
    return array[..., None] if array.ndim == 2 else array


def _unchanged(image: np.ndarray, decoder: FrameDecoder) -> bool:
    """True when resize and crop would leave this RGB uint8 array as it is."""
    if decoder.grayscale or decoder.random_crop or decoder.flip:
        return False
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        return False
    height, width = image.shape[:2]
    if decoder.resize is not None and decoder.resize != min(height, width):
        return False
    return decoder.crop is None or decoder.crop == height == width


def collate(frames: list[dict[str, Any]], normalize: PixelNormalizer) -> dict[str, Any]:
    """Frames `{"image": uint8 HWC, "key", "valid", "cls"}` -> a normalized batch dict."""
    batch = collate_frames(frames)
    batch["image"] = normalize(batch["image"])
    return batch


def to_rgb(data: bytes) -> np.ndarray:
    """Encoded image bytes -> the uint8 (H, W, 3) RGB source image, for reports."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def unreadable_reason(path: Path) -> str | None:
    """None if `path` decodes as an image, else why not (one line).

    JPEGs are decoded at 1/8 scale (`draft`), which still reads every byte, so truncated
    or corrupt files fail here, at open, rather than in the middle of an extraction.
    """
    try:
        with Image.open(path) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... for bad files
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
    return None


def scan_image_folder(root: Path) -> tuple[list[str], list[Path], list[int]]:
    """(classes, files, labels) of `root/<class>/*.<image suffix>`, as torchvision orders them:
    classes sorted by name, files sorted by path within each class (files found recursively)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(
            p
            for p in (root / name).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        files += found
        labels += [label] * len(found)
    return classes, files, labels


class IndexedFrames(torch.utils.data.Dataset):
    """Map-style dataset of decoded frames: `load(i)` gives bytes or an array for sample i.

    For `torch.utils.data.DataLoader` with `collate_frames`, so loader workers can decode
    in parallel while the order stays the index order.
    """

    def __init__(
        self,
        indices: Sequence[int],
        load: Any,
        keys: Sequence[str],
        labels: np.ndarray,
        decoder: FrameDecoder,
    ) -> None:
        self.indices, self.load, self.keys, self.labels = list(indices), load, keys, labels
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.indices[position]
        key, item = self.keys[index], self.load(index)
        if isinstance(item, bytes):
            image = decode_bytes(item, self.decoder, key)
        else:
            image = prepare_array(item, self.decoder, key)
        return {"image": image, "key": key, "valid": True, "cls": int(self.labels[index])}
