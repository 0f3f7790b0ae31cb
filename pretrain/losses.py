"""Loss terms shared by the autoencoder families, and the sparse/denoising settings.

Normalization (so that weights mean the same across models):
- VAEs follow Kingma & Welling: every term is a per-sample *sum* over pixels or latent
  dimensions (`sum_squared_error`, `bernoulli_nll`, `gaussian_kl` return shape (B,)), and
  the model averages those over the batch. The ELBO then reads in nats per image.
- Plain autoencoders use the *mean* squared error over all elements, and the sparsity
  terms are means over hidden units, so a penalty weight does not depend on image size or
  layer width. (UFLDL sums both; multiply its `beta` by 2 to get ours for MSE.)

Terms that exponentiate or take logs run in fp32 whatever the input dtype: in bf16,
`exp(logvar)` and `log(rho_hat)` lose the digits that the loss differences live in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per sample, in closed form: shape (B,)."""
    mu, logvar = mu.float().flatten(1), logvar.float().flatten(1)
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)


def sum_squared_error(recon: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over each sample's elements: shape (B,)."""
    return (recon.float() - target.float()).pow(2).flatten(1).sum(1)


def bernoulli_nll(logits: Tensor, target: Tensor) -> Tensor:
    """-log p(target | logits) of independent Bernoulli pixels, summed per sample: shape (B,).

    Takes logits, not probabilities: `binary_cross_entropy_with_logits` never takes the
    log of a sigmoid that rounded to 0 or 1. Targets are pixel intensities in [0, 1].
    """
    nll = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    return nll.flatten(1).sum(1)


def l1_activation(h: Tensor) -> Tensor:
    """Mean absolute activation: the L1 sparsity penalty, averaged over units and batch."""
    return h.float().abs().mean()


def kl_sparsity(h: Tensor, rho: float) -> Tensor:
    """UFLDL sparsity: mean over units j of KL(Bernoulli(rho) || Bernoulli(rho_hat_j)).

    `h` is (B, units) or (B, channels, H, W) of activations in (0, 1) (sigmoid units);
    rho_hat_j is unit j's mean activation over the batch (and positions, for a channel).
    """
    rho_hat = h.float().transpose(0, 1).flatten(1).mean(1).clamp(1e-6, 1 - 1e-6)
    kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
    return kl.mean()


def l2_penalty(weights: Iterable[Tensor]) -> Tensor:
    """Half the summed squares of `weights`: the weight-decay term of UFLDL's cost."""
    return 0.5 * sum(w.float().pow(2).sum() for w in weights)


def mask_noise(x: Tensor, prob: float) -> Tensor:
    """Masking noise (Vincent et al. 2010): each element set to 0 with probability `prob`."""
    return x * (torch.rand_like(x) >= prob).to(x.dtype)


def gaussian_noise(x: Tensor, std: float) -> Tensor:
    """Additive isotropic Gaussian noise of standard deviation `std`."""
    return x + std * torch.randn_like(x)


@dataclass(frozen=True)
class SparseDenoising:
    """Sparsity and denoising settings of `stacked_ae` and `conv_ae` (all off by default).

    `l1` weighs the mean absolute activation; `sparsity_weight` weighs the KL sparsity
    penalty towards the target mean activation `sparsity_target` (rho; sigmoid units
    only). `mask_prob` and `noise_std` corrupt a layer's input during training (masking
    first, then Gaussian noise); the loss still compares with the clean input.
    """

    l1: float = 0.0
    sparsity_target: float | None = None
    sparsity_weight: float = 0.0
    mask_prob: float = 0.0
    noise_std: float = 0.0
    #: the hidden units' activation: KL sparsity needs sigmoid units (means in (0, 1))
    activation: str = "sigmoid"

    def __post_init__(self) -> None:
        if self.sparsity_target is not None and self.activation != "sigmoid":
            raise ValueError("KL sparsity (sparsity_target) needs activation='sigmoid'")
        if self.sparsity_target is not None and not 0.0 < self.sparsity_target < 1.0:
            raise ValueError(f"sparsity_target must be in (0, 1), got {self.sparsity_target}")
        if not 0.0 <= self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in [0, 1), got {self.mask_prob}")
        if self.noise_std < 0.0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")

    @property
    def uses_kl_sparsity(self) -> bool:
        return self.sparsity_target is not None and self.sparsity_weight > 0.0

    def corrupt(self, x: Tensor) -> Tensor:
        if self.mask_prob > 0.0:
            x = mask_noise(x, self.mask_prob)
        if self.noise_std > 0.0:
            x = gaussian_noise(x, self.noise_std)
        return x

    def penalty(self, hidden: Sequence[Tensor]) -> tuple[Tensor | float, dict[str, Tensor]]:
        """Weighted sparsity penalty summed over the `hidden` layers, and its unweighted terms."""
        total: Tensor | float = 0.0
        metrics: dict[str, Tensor] = {}
        if self.l1 > 0.0:
            l1 = torch.stack([l1_activation(h) for h in hidden]).sum()
            total = total + self.l1 * l1
            metrics["l1"] = l1.detach()
        if self.uses_kl_sparsity:
            rho = self.sparsity_target
            kl = torch.stack([kl_sparsity(h, rho) for h in hidden]).sum()
            total = total + self.sparsity_weight * kl
            metrics["sparsity"] = kl.detach()
        return total, metrics
