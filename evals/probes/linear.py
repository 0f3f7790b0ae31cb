"""Linear probes on cached features: many SGD heads in one pass, or exact L-BFGS logistic regression.

Autoencoder features have wildly different scales per dimension, so a probe on raw
features looks broken (DINO #131, MAE #39). Both solvers therefore standardize first,
with the statistics of the training rows only, as a BatchNorm without affine in eval
mode would (MAE's and lightly's probe head).

- `grid_probe`: DINOv2's way. One linear head per (learning rate, weight decay) setting,
  all trained together by SGD with momentum and a cosine schedule over the same
  mini-batches (one data pass serves every head: the heads are one (D, H, C) tensor and
  one matmul). The head with the best top-1 on a validation split of the training set is
  reported on the test set; heads are not refit on train + validation (as DINOv2).
- `lbfgs_probe`: multinomial logistic regression with L2, solved to convergence with
  torch's L-BFGS in float64 (scikit-learn's objective: 0.5 ||W||^2 + C * sum of
  cross-entropies, intercept unpenalized); C chosen on the validation split, then refit
  on the whole training set at that C.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from evals.features.extractor import resolve_device
from evals.probes.classify import accuracies, as_labels, as_rows, topk_accuracy

LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)
INVERSE_REGULARIZATIONS = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)  # lbfgs' grid of C
MOMENTUM = 0.9
VAL_FRACTION = 0.2


@dataclass
class ProbeResult:
    """What a probe reports: test top-1 (top-5 when > 5 classes), the setting chosen on
    validation and every setting's validation score (the protocol, for metrics.json)."""

    top1: float
    top5: float | None
    val_top1: float | None
    setting: dict
    grid: list[dict] = field(default_factory=list)
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    solver: str = "grid"

    def to_dict(self) -> dict:
        return asdict(self)


def standardizer(stats_x: Tensor, eps: float = 1e-5) -> nn.BatchNorm1d:
    """A BatchNorm1d without affine, in eval mode, holding `stats_x`'s mean and (biased)
    variance: the fixed training statistics every later row is standardized with."""
    dtype = stats_x.dtype if stats_x.is_floating_point() else torch.float32
    x = stats_x.double()
    norm = nn.BatchNorm1d(x.shape[1], eps=eps, affine=False).to(stats_x.device, dtype)
    norm.running_mean.copy_(x.mean(0))
    norm.running_var.copy_(x.var(0, unbiased=False))
    return norm.eval()


def standardize(stats_x: Tensor, *arrays: Tensor) -> list[Tensor]:
    """`arrays` standardized by `stats_x`'s per-dimension mean and variance."""
    norm = standardizer(stats_x)
    with torch.no_grad():
        return [norm(a.to(norm.running_mean.dtype)).to(a.dtype) for a in arrays]


def stratified_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of round(n_c * fraction) rows per class (at least 1), chosen by a
    permutation seeded by (seed, class): the label-fraction subsets."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be within (0, 1], got {fraction}")
    if fraction == 1.0:
        return np.arange(len(labels))
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = max(1, round(len(members) * fraction))
        rng = np.random.default_rng([seed, int(c) + 1, 7])
        chosen.append(rng.permutation(members)[:n])
    return np.sort(np.concatenate(chosen))


def validation_split(labels: np.ndarray, seed: int, fraction: float = VAL_FRACTION):
    """(fit, val) positions, stratified (`evals.features.datasets.split_indices`); a class with one
    row stays in fit. Raises ValueError when no class has two rows."""
    from evals.features.datasets import split_indices

    fit, val = split_indices(labels, fraction, seed)
    if len(val) == 0:
        raise ValueError("too few training rows for a validation split (no class has two)")
    return fit, val


# ----------------------------------------------------------------------------- many SGD heads


class LinearHeads(nn.Module):
    """H linear heads over the same standardized input: logits (H, N, C) from one matmul."""

    def __init__(self, norm: nn.BatchNorm1d, num_heads: int, num_classes: int) -> None:
        super().__init__()
        dim = norm.num_features
        self.norm = norm
        self.num_heads, self.num_classes = num_heads, num_classes
        self.weight = nn.Parameter(torch.zeros(dim, num_heads * num_classes))
        self.bias = nn.Parameter(torch.zeros(num_heads * num_classes))

    def forward(self, x: Tensor) -> Tensor:
        z = self.norm(x)
        logits = torch.addmm(self.bias, z, self.weight)
        return logits.view(len(x), self.num_heads, self.num_classes).transpose(0, 1)


def fit_heads(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    settings: list[tuple[float, float]],
    *,
    epochs: int = 100,
    batch_size: int = 256,
    seed: int = 0,
    stats_x: Tensor | None = None,
) -> LinearHeads:
    """Train one head per (lr, weight decay) on (x, y) together: the same shuffled
    mini-batches, the sum of per-head mean cross-entropies (so heads do not interact),
    SGD with momentum 0.9 and a per-head cosine-decayed learning rate.

    Weights start at 0 (DINOv2 draws them at std 0.01; zero makes the probe
    deterministic and changes nothing at convergence). `stats_x` (default x) gives the
    standardization statistics, e.g. every training row's features when only a fraction
    is labeled."""
    device = x.device
    stats = x if stats_x is None else stats_x.to(x.dtype)
    heads = LinearHeads(standardizer(stats), len(settings), num_classes)
    heads = heads.to(device)
    lrs = torch.tensor([lr for lr, _ in settings], device=device).repeat_interleave(num_classes)
    wds = torch.tensor([wd for _, wd in settings], device=device).repeat_interleave(num_classes)
    buffers = [torch.zeros_like(p) for p in (heads.weight, heads.bias)]
    n = len(x)
    batch_size = min(batch_size, n)
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(1, epochs * steps_per_epoch)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            logits = heads(x[rows])  # (H, B, C)
            target = y[rows].repeat(len(settings))
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, num_classes), target, reduction="sum"
            ) / len(rows)
            heads.zero_grad(set_to_none=False)
            loss.backward()
            scale = 0.5 * (1.0 + math.cos(math.pi * step / total))
            with torch.no_grad():
                for param, buf in zip((heads.weight, heads.bias), buffers, strict=True):
                    grad = param.grad
                    if param is heads.weight:  # decay weights, never biases
                        grad = grad + wds * param
                    buf.mul_(MOMENTUM).add_(grad)
                    param.sub_(scale * lrs * buf)
            step += 1
    return heads.eval()


def _head_scores(heads: LinearHeads, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per head: top-1 accuracy and mean cross-entropy on (x, y)."""
    with torch.no_grad():
        logits = heads(x)
        correct = (logits.argmax(-1) == y).float().mean(1)
        losses = torch.stack(
            [nn.functional.cross_entropy(logits[h], y) for h in range(heads.num_heads)]
        )
    return correct, losses


def grid_probe(
    train_x: np.ndarray | Tensor,
    train_y: np.ndarray | Tensor,
    test_x: np.ndarray | Tensor,
    test_y: np.ndarray | Tensor,
    num_classes: int,
    *,
    learning_rates: tuple[float, ...] = LEARNING_RATES,
    weight_decays: tuple[float, ...] = WEIGHT_DECAYS,
    epochs: int = 100,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> ProbeResult:
    """The grid of lr x weight decay trained together on a stratified 80% of the training
    rows, the best head by validation top-1 (then lower validation loss, then the grid's
    order) evaluated on the test rows."""
    dev = resolve_device(device)
    x, y = as_rows(train_x, dev), as_labels(train_y, dev)
    fit, val = validation_split(y.cpu().numpy(), seed)
    settings = [(lr, wd) for lr in learning_rates for wd in weight_decays]
    heads = fit_heads(
        x[fit], y[fit], num_classes, settings, epochs=epochs, batch_size=batch_size, seed=seed
    )
    val_acc, val_loss = _head_scores(heads, x[val], y[val])
    ranking = sorted(
        range(len(settings)), key=lambda h: (-float(val_acc[h]), float(val_loss[h]), h)
    )
    best = ranking[0]
    with torch.no_grad():
        logits = heads(as_rows(test_x, dev))[best]
    ty = as_labels(test_y, dev)
    lr, wd = settings[best]
    top1, top5 = accuracies(logits, ty, num_classes)
    return ProbeResult(
        top1=top1,
        top5=top5,
        val_top1=float(val_acc[best]),
        setting={"lr": lr, "weight_decay": wd, "epochs": epochs, "batch_size": batch_size},
        grid=[
            {"lr": s[0], "weight_decay": s[1], "val_top1": float(val_acc[h])}
            for h, s in enumerate(settings)
        ],
        n_train=len(fit),
        n_val=len(val),
        n_test=len(ty),
        solver="grid",
    )


def head_accuracy(
    train_x: np.ndarray | Tensor,
    train_y: np.ndarray | Tensor,
    test_x: np.ndarray | Tensor,
    test_y: np.ndarray | Tensor,
    num_classes: int,
    setting: dict,
    *,
    stats_x: np.ndarray | Tensor | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> tuple[float, float | None]:
    """(top-1, top-5 or None) of one head with a fixed `setting` (lr, weight_decay, epochs,
    batch_size) trained on every given training row: the label-fraction runs, whose
    setting was chosen on the full-label validation split."""
    dev = resolve_device(device)
    x, y = as_rows(train_x, dev), as_labels(train_y, dev)
    heads = fit_heads(
        x,
        y,
        num_classes,
        [(setting["lr"], setting["weight_decay"])],
        epochs=setting["epochs"],
        batch_size=setting["batch_size"],
        seed=seed,
        stats_x=None if stats_x is None else as_rows(stats_x, dev),
    )
    with torch.no_grad():
        logits = heads(as_rows(test_x, dev))[0]
    return accuracies(logits, as_labels(test_y, dev), num_classes)


# ----------------------------------------------------------------------------- exact L-BFGS


def logistic_regression(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    C: float,
    *,
    max_iter: int = 1000,
    tol: float = 1e-6,
    init: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression minimizing 0.5 ||W||^2 + C * sum_i CE_i (scikit-
    learn's objective, intercept not penalized), by L-BFGS with a strong-Wolfe line search
    in float64. Returns (W (D, C), b (C,)). The objective is divided by C * N for the
    solver (same minimum, better conditioned). `init` warm-starts a path of C."""
    x = x.double()
    n, dim = x.shape
    weight = torch.zeros(dim, num_classes, dtype=torch.float64, device=x.device)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=x.device)
    if init is not None:
        weight.copy_(init[0])
        bias.copy_(init[1])
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 2,
        tolerance_grad=tol,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )
    penalty = 1.0 / (2.0 * C * n)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(torch.addmm(bias, x, weight), y)
        loss = loss + penalty * (weight * weight).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def lbfgs_probe(
    train_x: np.ndarray | Tensor,
    train_y: np.ndarray | Tensor,
    test_x: np.ndarray | Tensor,
    test_y: np.ndarray | Tensor,
    num_classes: int,
    *,
    Cs: tuple[float, ...] = INVERSE_REGULARIZATIONS,
    seed: int = 0,
    max_iter: int = 100,
    device: str | torch.device | None = None,
) -> ProbeResult:
    """C chosen by validation top-1 (ties: the smaller C) on a stratified 80/20 split of the
    training rows, along a warm-started path (each fit at most `max_iter` L-BFGS
    iterations, as scikit-learn's default: nearly separable data at large C converges
    slowly, and the last digits of the optimum do not change a top-1); then refit on every training row at that C
    (standardized by every training row) and scored on the test rows."""
    dev = resolve_device(device)
    x, y = as_rows(train_x, dev, torch.float64), as_labels(train_y, dev)
    fit, val = validation_split(y.cpu().numpy(), seed)
    fit_x, val_x = standardize(x[fit], x[fit], x[val])
    grid, init = [], None
    for C in sorted(Cs):
        init = logistic_regression(fit_x, y[fit], num_classes, C, max_iter=max_iter, init=init)
        acc = topk_accuracy(torch.addmm(init[1], val_x, init[0]), y[val], 1)
        grid.append({"C": C, "val_top1": acc})
    best = max(grid, key=lambda g: (g["val_top1"], -g["C"]))
    all_x, tx = standardize(x, x, as_rows(test_x, dev, torch.float64))
    weight, bias = logistic_regression(all_x, y, num_classes, best["C"], max_iter=max_iter)
    logits = torch.addmm(bias, tx, weight)
    ty = as_labels(test_y, dev)
    top1, top5 = accuracies(logits, ty, num_classes)
    return ProbeResult(
        top1=top1,
        top5=top5,
        val_top1=best["val_top1"],
        setting={"C": best["C"], "refit": "all training rows"},
        grid=grid,
        n_train=len(fit),
        n_val=len(val),
        n_test=len(ty),
        solver="lbfgs",
    )
