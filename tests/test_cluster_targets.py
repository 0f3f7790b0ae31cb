"""Cluster refinement's targets (pretrain.models.cluster_targets) and the stage that uses them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cluster_support import free_port
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from stage_training import train_stage

from pretrain.models import build_model
from pretrain.models.cluster_targets import ClusterTargets


def blobs(
    n: int, dim: int = 12, centres: int = 4, seed: int = 0
) -> tuple[torch.Tensor, np.ndarray]:
    """`centres` well-separated Gaussian blobs of unequal size in `dim` dimensions."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 4, (centres, dim))
    labels = rng.choice(centres, n, p=np.arange(1, centres + 1) / sum(range(1, centres + 1)))
    return torch.tensor(means[labels] + rng.normal(0, 0.5, (n, dim)), dtype=torch.float32), labels


def test_assign_is_kmeans_on_the_standardized_whitened_normalized_features() -> None:
    x, truth = blobs(400)
    targets = ClusterTargets(12, 4, components=6)
    targets.fit(x, seed=0)
    # sklearn's own pipeline on the same numbers: the folded projection must agree with it
    data = x.double().numpy()
    standard = (data - data.mean(0)) / data.std(0)
    z = PCA(6, whiten=True, random_state=0).fit_transform(standard)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    expected = KMeans(4, n_init=4, random_state=0).fit(z).labels_
    assigned = targets.assign(x).numpy()
    assert (assigned == expected).mean() > 0.99
    # the blobs are recovered up to a renaming, and the weights undo their sizes
    pairs = {(int(a), int(t)) for a, t in zip(assigned, truth, strict=True)}
    assert len(pairs) == 4
    counts = np.bincount(assigned, minlength=4)
    assert np.allclose(targets.weight.numpy() * counts, 100.0, rtol=1e-5)


def test_a_channel_that_never_fires_is_not_blown_up() -> None:
    """A dead channel (no spread over the fitted frames) keeps a scale near the others', so
    a later response there stays a response of that size, not a millionfold one."""
    x, _ = blobs(400)
    x[:, 3] = 0.0
    targets = ClusterTargets(12, 4, components=6)
    targets.fit(x, seed=0)
    assert targets.scale[3] > 1e-3 * targets.scale.max()


def _fit_on_rank(rank: int, port: int, x: torch.Tensor, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    targets = ClusterTargets(12, 4, components=6)
    torch.manual_seed(rank)  # any stray draw would differ between the ranks
    targets.fit(x[rank::2].contiguous(), seed=0)
    results[rank] = {k: v.clone() for k, v in targets.state_dict().items()}
    dist.destroy_process_group()


def test_two_gloo_ranks_fit_one_clustering_on_their_frames_together() -> None:
    x, _ = blobs(400)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_fit_on_rank, args=(free_port(), x, results), nprocs=2)
        first, second = results[0], results[1]
    for name, value in first.items():
        assert torch.equal(value, second[name]), name
    # the same clustering as one process fitting every frame (gathered in rank order)
    alone = ClusterTargets(12, 4, components=6)
    alone.fit(torch.cat([x[0::2], x[1::2]]), seed=0)
    torch.testing.assert_close(first["centroids"], alone.centroids)


def test_cluster_stage_freezes_a_teacher_and_learns_its_clusters() -> None:
    """Two stages; the second fits targets from its frames, trains everything but the
    teacher, and its loss falls by more than half on frames that do cluster
    (a bright or dark square, high or low in the frame: a flip keeps its cluster)."""
    torch.manual_seed(0)
    model = build_model(
        "wta_conv_ae",
        in_channels=1,
        channels=[8, 16],
        strides=[2, 2],
        lifetime_k=0.25,
        cluster_k=4,
        cluster_pca=8,
        cluster_frames=128,
        cluster_shift=0,
    )
    wta, cluster = model.stages()
    assert [wta.name, cluster.name] == ["wta", "cluster"]
    teacher = {id(p) for p in model.teacher.parameters()}
    head = {id(p) for p in model.cluster_head.parameters()}
    assert not teacher & {id(p) for p in cluster.parameters()}
    assert not (teacher | head) & {id(p) for p in wta.parameters()}
    assert head <= {id(p) for p in cluster.parameters()}

    x = torch.zeros(256, 1, 32, 32)
    for i in range(256):
        row = 4 + 14 * (i % 2)
        x[i, 0, row : row + 10, 11:21] = 3.0 if i % 4 < 2 else -3.0
    x += 0.1 * torch.randn_like(x)
    batches = lambda step: (x[(step * 32) % 256 :][:32], None)  # noqa: E731
    train_stage(model, wta, batches, 30, 2e-3)

    frames = iter(x.split(32))
    cluster.setup(lambda: {"image": next(frames)})
    assert torch.equal(model.teacher[0][0].weight, model.layers[0][0].weight)
    frozen = model.teacher[0][0].weight.clone()
    losses = train_stage(model, cluster, batches, 60, 2e-3)
    # measured: 1.22 over the first 8 steps, 0.23 over the last 8
    assert np.mean(losses[-8:]) < 0.5 * np.mean(losses[:8]), losses
    assert torch.equal(model.teacher[0][0].weight, frozen)
    assert not torch.equal(model.layers[0][0].weight, frozen)


def test_bad_cluster_options_are_refused_with_a_message() -> None:
    with pytest.raises(ValueError, match="cluster_k must be 0"):
        build_model("wta_conv_ae", cluster_k=1)
    with pytest.raises(ValueError, match="cluster_frames >= cluster_k"):
        build_model("wta_conv_ae", cluster_k=16, cluster_frames=8)
