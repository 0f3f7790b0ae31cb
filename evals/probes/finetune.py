"""Fine-tuning: the encoder unfrozen at a small learning rate, a linear head on top.

The semi-supervised comparison of the greedy-pretraining literature (Bengio et al. 2007,
Erhan et al. 2010): the same architecture, the same labeled fraction, the same number of
steps, started once from the pretrained export and once from random initialization.

The head is BatchNorm without affine (in training mode here, since the features move)
and a linear layer over the layer's features pooled as the probes pool them
(`evals.features.pool`: global mean and max and a 2x2 grid for maps). The model stays in
eval mode while its weights train: normalization statistics and VQ codebooks must not
update from a few labeled images (vqvae2 updates codebooks on every training-mode
forward), and no model here uses dropout.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from evals.features.datasets import EvalDataset
from evals.features.extractor import FeatureSource, check_layers, pool, resolve_device
from evals.probes.classify import accuracies


def load_images(
    dataset: EvalDataset, preprocess: dict, batch_size: int = 256
) -> tuple[Tensor, Tensor]:
    """Every image of `dataset` preprocessed as `preprocess` says, in the dataset's key
    order (rows placed by key, padding dropped): (float32 (N, C, H, W), int64 (N,))."""
    position = {key: i for i, key in enumerate(dataset.keys)}
    images: Tensor | None = None
    labels = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.int64).clone()
    seen = torch.zeros(len(dataset), dtype=torch.bool)
    for batch in dataset.batches(preprocess, batch_size):
        valid = batch["valid"].bool()
        rows = torch.tensor(
            [position[k] for k, v in zip(batch["key"], valid.tolist(), strict=True) if v]
        )
        if len(rows) == 0:
            continue
        x = batch["image"][valid]
        if images is None:
            images = torch.empty((len(dataset), *x.shape[1:]), dtype=torch.float32)
        images[rows] = x.float()
        seen[rows] = True
    if images is None or not bool(seen.all()):
        raise RuntimeError(f"{dataset.spec}: the loader did not yield every sample once")
    return images, labels


class _Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, layer: str, dim: int, num_classes: int) -> None:
        super().__init__()
        self.encoder, self.layer = encoder, layer
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(pool(self.encoder.features(x)[self.layer]))


def finetune(
    source: FeatureSource,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    *,
    layer: str | None = None,
    steps: int = 300,
    lr: float = 1e-3,
    head_lr: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict:
    """Fine-tune a copy of `source.model` with a linear head on `layer` (default: the last
    of `features()`) for `steps` Adam steps (encoder `lr`, head `head_lr`, both cosine-
    decayed) on (train_x, train_y); {"top1", "top5", "layer", "steps", ...} on the test set.
    `source` is left untouched. Seeded: the head's init and the batch order."""
    dev = resolve_device(device)
    (name,) = check_layers(source, [layer]) if layer else check_layers(source, None)[-1:]
    encoder = copy.deepcopy(source.model).to(dev).eval()
    train_x, train_y = train_x.to(dev), train_y.to(dev)
    with torch.no_grad():
        dim = pool(encoder.features(train_x[:2])[name]).shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _Classifier(encoder, name, dim, num_classes).to(dev)
    model.head.train()
    optimizer = torch.optim.Adam(
        [
            {"params": [p for p in encoder.parameters() if p.is_floating_point()], "lr": lr},
            {"params": model.head.parameters(), "lr": head_lr},
        ]
    )
    for p in encoder.parameters():
        p.requires_grad_(True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    generator = torch.Generator().manual_seed(seed)
    n = len(train_x)
    order: Sequence[int] = []
    cursor = 0
    for _ in range(steps):
        if cursor >= len(order):
            order, cursor = torch.randperm(n, generator=generator).tolist(), 0
        rows = order[cursor : cursor + min(batch_size, n)]
        cursor += len(rows)
        if len(rows) < 2 <= n:  # BatchNorm needs two rows: top up from a fresh order
            order, cursor = torch.randperm(n, generator=generator).tolist(), 0
            rows = order[: min(batch_size, n)]
            cursor = len(rows)
        loss = nn.functional.cross_entropy(model(train_x[rows]), train_y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.head.eval()
    with torch.no_grad():
        logits = torch.cat([model(test_x[i : i + 512].to(dev)) for i in range(0, len(test_x), 512)])
    top1, top5 = accuracies(logits, test_y.to(dev), num_classes)
    return {
        "top1": top1,
        "top5": top5,
        "layer": name,
        "steps": steps,
        "lr": lr,
        "head_lr": head_lr,
        "batch_size": batch_size,
        "n_train": n,
        "seed": seed,
    }
