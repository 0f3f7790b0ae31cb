"""Sample keys (`<video_id>_<frame_index:07d>`, DESIGN "Shards") as parts and as integers.

A training stage that learns from a clip's order (which frames of one video come before
which) reads it from the keys alone: the frames' pixels say nothing about their clip.
Integer ids let such a stage keep per-frame targets in tensor buffers, which collectives
can share, checkpoints keep and a batch can look up on the device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def parse_key(key: str) -> tuple[str, int]:
    """(video_id, frame_index) of a sample key; ValueError naming the key otherwise."""
    video, sep, frame = key.rpartition("_")
    if not sep or not video or not frame.isdigit():
        raise ValueError(f"sample key {key!r} is not <video_id>_<frame_index>")
    return video, int(frame)


def stable_id(text: str) -> int:
    """A 63-bit integer of `text` that is the same in every process and on every machine
    (Python's `hash` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def key_ids(keys: Sequence[str]) -> torch.Tensor:
    """int64 (B,): `stable_id` of each key, for looking a batch up in per-frame buffers."""
    return torch.tensor([stable_id(k) for k in keys], dtype=torch.int64)


def clip_positions(keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 (B,) each: `stable_id` of each key's video and its frame index."""
    parts = [parse_key(k) for k in keys]
    return (
        torch.tensor([stable_id(v) for v, _ in parts], dtype=torch.int64),
        torch.tensor([f for _, f in parts], dtype=torch.int64),
    )
