"""Pseudo-labels from what comes and goes in a clip.

Why this exists: the cat face of a concept clip is shown for one stretch of its frames,
while its background and clutter stay (they move, scroll and turn, but are there in every
frame). So the clips whose frames split best into "this stretch" and "the rest" are the
clips where something came and went, and the stretch is when it was there. The
reconstruction loss alone never asks a unit to tell those frames apart; this stage does,
with labels that come from the video's order (the sample keys), never from a label.

How the labels are made, once, on rank 0, at the start of the stage:
1. every rank encodes its next frames with the encoder as the first stage left it, and
   the per-channel maxima of every layer, the frames' ids and their (clip, frame index)
   are all-gathered;
2. per clip, in frame order, the contiguous stretch whose mean feature vector differs
   most from the rest's (the split that explains the largest share of the clip's
   variance, least squares over every start and end);
3. the `keep` share of clips with the largest explained share are taken to show
   something for their stretch; which side is "shown" is the one that lies along the
   direction most of these clips' stretch-minus-rest differences share (the first
   singular vector of those differences, signed by the majority);
4. the `negatives` share of clips with the smallest explained share are taken to show
   nothing: all their frames are "off". Every other frame gets no label.
The labels live in buffers (frame ids sorted, their labels, class weights), so the other
ranks get them by broadcast, a checkpoint taken inside the stage resumes with the same
labels, and a batch looks its frames up by key id on the device.

What it assumes, said plainly: a clip shows the concept for one stretch, and the
concept is what changes most in the clips where anything does. `catneuron synth` makes
clips like that; real video has cuts and other things that come and go.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from pretrain.models.rank_zero_fit import fit_on_rank_zero

UNLABELLED = -1
_PAD = torch.iinfo(torch.int64).max  # sorts after every real id


def best_stretch(features: np.ndarray) -> tuple[float, int, int]:
    """(share of the variance explained, start, end) of the contiguous stretch [start,
    end) of `features` (T, D), in time order, that best splits from the other frames.

    Both parts keep at least 2 frames; the stretch may touch either end of the clip.
    """
    n = len(features)
    total = float(((features - features.mean(0)) ** 2).sum()) + 1e-12
    cumsum = np.concatenate([np.zeros((1, features.shape[1])), np.cumsum(features, 0)])
    whole = cumsum[-1]
    best = (0.0, 0, n)
    for start in range(n - 1):
        for end in range(start + 2, min(n, start + n - 2) + 1):
            inside = cumsum[end] - cumsum[start]
            outside = whole - inside
            m = end - start
            # between-part sum of squares of a two-part split
            gain = inside @ inside / m + outside @ outside / (n - m) - whole @ whole / n
            if gain > best[0]:
                best = (float(gain), start, end)
    return best[0] / total, best[1], best[2]


def stretch_labels(
    features: np.ndarray, clips: np.ndarray, frames: np.ndarray, keep: float, negatives: float
) -> np.ndarray:
    """Labels (N,) in {UNLABELLED, 0, 1} for frames with `features` (N, D) of clips
    `clips` (N,) at frame indices `frames` (N,): see the module's docstring."""
    std = features.std(0)
    standard = (features - features.mean(0)) / (np.maximum(std, 1e-2 * std.mean()) + 1e-12)
    found = []  # (explained share, frame rows in time order, inside mask, inside - outside)
    for clip in np.unique(clips):
        rows = np.flatnonzero(clips == clip)
        rows = rows[np.argsort(frames[rows], kind="stable")]
        if len(rows) < 4:
            continue  # too few frames to split into two parts of two
        share, start, end = best_stretch(standard[rows])
        inside = np.zeros(len(rows), bool)
        inside[start:end] = True
        difference = standard[rows][inside].mean(0) - standard[rows][~inside].mean(0)
        found.append((share, rows, inside, difference))
    labels = np.full(len(features), UNLABELLED, np.int64)
    if not found:
        return labels
    order = sorted(range(len(found)), key=lambda i: -found[i][0])
    n_keep = max(1, round(keep * len(found)))
    n_negative = min(round(negatives * len(found)), len(found) - n_keep)
    shown = [found[i] for i in order[:n_keep]]
    differences = np.stack([d for *_, d in shown])
    direction = np.linalg.svd(differences, full_matrices=False)[2][0]
    if (differences @ direction > 0).sum() * 2 < len(differences):
        direction = -direction
    for _, rows, inside, difference in shown:
        labels[rows] = inside if difference @ direction > 0 else ~inside
    for i in order[len(order) - n_negative :]:
        labels[found[i][1]] = 0
    return labels


class StretchTargets(nn.Module):
    """Per-frame labels for up to `capacity` frames, looked up by key id
    (`data_pipeline.keys.key_ids`), and the mean and scale of the features they were
    made from (for the head that learns them)."""

    def __init__(self, dim: int, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.register_buffer("ids", torch.full((capacity,), _PAD, dtype=torch.int64))
        self.register_buffer("labels", torch.full((capacity,), UNLABELLED, dtype=torch.int64))
        self.register_buffer("weight", torch.ones(2))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def lookup(self, ids: Tensor) -> Tensor:
        """(B,) labels of the frames `ids`; UNLABELLED for a frame the fit did not label."""
        position = torch.searchsorted(self.ids, ids).clamp_max(self.capacity - 1)
        return torch.where(self.ids[position] == ids, self.labels[position], UNLABELLED)

    @torch.no_grad()
    def fit(
        self,
        features: Tensor,
        ids: Tensor,
        clips: Tensor,
        frames: Tensor,
        keep: float,
        negatives: float,
    ) -> None:
        """All-gather every rank's frames, label them on rank 0, broadcast the buffers.
        Without a process group the fit is local."""
        parts = [features.float(), ids, clips, frames]
        fit_on_rank_zero(self, parts, lambda *a: self._fit_here(*a, keep, negatives))

    def _fit_here(
        self,
        features: np.ndarray,
        ids: np.ndarray,
        clips: np.ndarray,
        frames: np.ndarray,
        keep: float,
        negatives: float,
    ) -> None:
        ids, first = np.unique(ids, return_index=True)  # a frame read twice counts once
        first = first[: self.capacity]
        ids, features = ids[: self.capacity], features[first].astype(np.float64)
        labels = stretch_labels(features, clips[first], frames[first], keep, negatives)
        labelled = labels != UNLABELLED
        if not labelled.any() or labels[labelled].min() == labels[labelled].max():
            raise ValueError(
                f"no clip of {len(np.unique(clips[first]))} split into frames with and without "
                "something: the stretch stage needs clips of several frames each"
            )
        counts = np.bincount(labels[labelled], minlength=2)
        std = features.std(0)
        values = {
            "ids": np.concatenate([ids, np.full(self.capacity - len(ids), _PAD)]),
            "labels": np.concatenate([labels, np.full(self.capacity - len(ids), UNLABELLED)]),
            "weight": labelled.sum() / (2 * counts),
            "mean": features.mean(0),
            "scale": np.maximum(std, 1e-2 * std.mean()) + 1e-12,
        }
        for name, value in values.items():
            buffer = getattr(self, name)
            buffer.copy_(torch.as_tensor(value, dtype=buffer.dtype))
