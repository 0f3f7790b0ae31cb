"""Pseudo-labels from k-means over a frozen encoder's features (DeepCluster, Caron et al. 2018).

Why this exists: a unit selective for a concept is a unit whose input separates the
concept's frames from the rest, and the reconstruction loss alone does not ask for that.
k-means over an encoder's unlabeled frames finds groups of frames that already look alike
to it; training the encoder to tell those groups apart (through a linear head), while it
keeps reconstructing, sharpens the units that line up with a group. No label is read.

The clustering is fitted once, on rank 0, at the start of the stage that uses it, and
every number it needs afterwards (standardization, PCA whitening, centroids, class
weights) lives in buffers: the other ranks receive them by broadcast, checkpoints keep
them (a resumed stage assigns the same targets), and exports carry them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from pretrain.models.rank_zero_fit import fit_on_rank_zero


class ClusterTargets(nn.Module):
    """`clusters` k-means centroids in a standardized, PCA-whitened, L2-normalized space
    of `dim` input features; `assign(features)` is the index of the nearest centroid."""

    def __init__(self, dim: int, clusters: int, components: int) -> None:
        super().__init__()
        components = min(components, dim)
        self.clusters, self.components = clusters, components
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("projection", torch.zeros(dim, components))
        self.register_buffer("centroids", torch.zeros(clusters, components))
        self.register_buffer("weight", torch.ones(clusters))

    def embed(self, features: Tensor) -> Tensor:
        z = ((features.float() - self.mean) / self.scale) @ self.projection
        return nn.functional.normalize(z, dim=1)

    def assign(self, features: Tensor) -> Tensor:
        return torch.cdist(self.embed(features), self.centroids).argmin(1)

    @torch.no_grad()
    def fit(self, features: Tensor, seed: int) -> None:
        """Fit on rank 0 over every rank's `features` (N, dim), then share the buffers.

        Every rank passes its own frames' features; they are all-gathered (gloo and NCCL
        both have it), rank 0 alone runs PCA and k-means (sklearn, seeded), and the
        buffers are broadcast. Without a process group the fit is local.
        """
        fit_on_rank_zero(self, [features], lambda f: self._fit_here(f.astype(np.float64), seed))

    def _fit_here(self, features: np.ndarray, seed: int) -> None:
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA

        if len(features) < max(self.clusters, self.components):
            raise ValueError(
                f"clustering needs at least {max(self.clusters, self.components)} frames, got {len(features)}"
            )
        # A channel that never fires on these frames has no spread: dividing by its std
        # would turn the student's first small response there into a huge input.
        std = features.std(0)
        mean, scale = features.mean(0), np.maximum(std, 1e-2 * std.mean()) + 1e-12
        standard = (features - mean) / scale
        pca = PCA(self.components, whiten=True, random_state=seed).fit(standard)
        # PCA's whitened transform as one matrix (x - mean) @ projection: the PCA mean of
        # standardized features is 0 up to rounding, folded into `mean` below.
        projection = pca.components_.T / np.sqrt(pca.explained_variance_)
        mean = mean + scale * pca.mean_
        z = ((features - mean) / scale) @ projection
        z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-12
        labels = KMeans(self.clusters, n_init=4, random_state=seed).fit(z)
        counts = np.bincount(labels.labels_, minlength=self.clusters)
        for buffer, value in (
            (self.mean, mean),
            (self.scale, scale),
            (self.projection, projection),
            (self.centroids, labels.cluster_centers_),
            (self.weight, len(z) / (self.clusters * np.maximum(counts, 1))),
        ):
            buffer.copy_(torch.as_tensor(value, dtype=buffer.dtype))
