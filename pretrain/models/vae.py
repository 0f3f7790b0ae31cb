"""Variational autoencoders (Kingma & Welling 2014): `vae` (with beta-VAE's `beta`) and `cvae`.

The encoder maps an image to the mean `mu` and log-variance `logvar` of a diagonal
Gaussian q(z|x); the decoder maps z to the parameters of p(x|z). Training minimizes the
negative ELBO per image, recon + beta * KL(q(z|x) || N(0, I)), with both terms summed
over the sample's pixels / latent dimensions and then averaged over the batch, as in the
paper (beta = 1 is the VAE; beta > 1 the beta-VAE of Higgins et al. 2017).

Likelihoods: `gaussian` (unit variance: the reconstruction term is the summed squared
error, up to the factor 1/2 and a constant) or `bernoulli` (the decoder emits logits and
the term is the binary cross-entropy to pixels in [0, 1], the paper's choice for MNIST).
`recon` is always an image: the mean of p(x|z) (sigmoid of the logits for Bernoulli).

`cvae` (Sohn et al. 2015) feeds the one-hot label to both encoder and decoder (as extra
input features for the MLP, as constant extra channels for the conv backbone), so
`sample(n, label)` draws images of a chosen class.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pretrain.losses import bernoulli_nll, gaussian_kl, sum_squared_error
from pretrain.models import register
from pretrain.models.base import Autoencoder, Metrics, detached_metrics
from pretrain.models.blocks import activation, check_sides, down_block, one_hot, up_block

BACKBONES = ("mlp", "conv")
LIKELIHOODS = ("gaussian", "bernoulli")


def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I): a sample whose gradient reaches mu and logvar."""
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


@register("vae")
class VAE(Autoencoder):
    """VAE over images of `input_shape` (C, H, W) with an `mlp` or `conv` backbone.

    `hidden`: MLP layer widths (encoder order; the decoder mirrors them). `channels`: conv
    block widths (each halves the sides, so H and W must divide by 2^len(channels)).
    `latent_dim`, `beta`, `likelihood` (`gaussian` | `bernoulli`), `activation`.
    In training mode z is sampled; in eval mode z = mu, so reconstructions are deterministic.
    `num_classes` is cvae's (use `cvae`, which sets `conditional`).
    """

    def __init__(
        self,
        input_shape: list[int] | tuple[int, ...] = (3, 64, 64),
        backbone: str = "conv",
        latent_dim: int = 32,
        hidden: list[int] | tuple[int, ...] = (512, 256),
        channels: list[int] | tuple[int, ...] = (32, 64, 128, 256),
        activation: str = "relu",
        beta: float = 1.0,
        likelihood: str = "gaussian",
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone '{backbone}'; choose from {', '.join(BACKBONES)}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(
                f"unknown likelihood '{likelihood}'; choose from {', '.join(LIKELIHOODS)}"
            )
        if num_classes and not self.conditional:
            raise ValueError("num_classes is for the conditional model: use 'cvae'")
        if len(input_shape) != 3:
            raise ValueError(f"input_shape must be [C, H, W], got {list(input_shape)}")
        self.input_shape = tuple(input_shape)
        self.backbone, self.likelihood = backbone, likelihood
        self.latent_dim, self.beta, self.num_classes = latent_dim, beta, num_classes
        if backbone == "mlp":
            self._build_mlp(list(hidden), activation)
        else:
            self._build_conv(list(channels), activation)

    def _build_mlp(self, hidden: list[int], act: str) -> None:
        if not hidden:
            raise ValueError("the mlp backbone needs at least one hidden width")
        sizes = [math.prod(self.input_shape) + self.num_classes, *hidden]
        self.encoder = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), activation(act))
            for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        width = hidden[-1]
        back = [self.latent_dim + self.num_classes, *reversed(hidden)]
        layers: list[nn.Module] = []
        for a, b in zip(back[:-1], back[1:], strict=True):
            layers += [nn.Linear(a, b), activation(act)]
        layers.append(nn.Linear(hidden[0], math.prod(self.input_shape)))
        self.decoder = nn.Sequential(*layers)
        self._heads(width)

    def _build_conv(self, channels: list[int], act: str) -> None:
        if not channels:
            raise ValueError("the conv backbone needs at least one block (channels is empty)")
        c, h, w = self.input_shape
        depth = len(channels)
        if h % 2**depth or w % 2**depth:
            raise ValueError(
                f"vae conv backbone with {depth} blocks needs H and W divisible by {2**depth}, "
                f"got input_shape {list(self.input_shape)}"
            )
        sizes = [c + self.num_classes, *channels]
        self.encoder = nn.ModuleList(
            down_block(a, b, act) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.bottom_shape = (channels[-1], h // 2**depth, w // 2**depth)
        ups = [*reversed(channels), c]
        self.decoder = nn.Sequential(
            nn.Linear(self.latent_dim + self.num_classes, math.prod(self.bottom_shape)),
            nn.Unflatten(1, self.bottom_shape),
            activation(act),
            *(
                up_block(a, b, act, "transposed", last=i == depth - 1)
                for i, (a, b) in enumerate(zip(ups[:-1], ups[1:], strict=True))
            ),
        )
        self._heads(math.prod(self.bottom_shape))

    def _heads(self, width: int) -> None:
        self.to_mu = nn.Linear(width, self.latent_dim)
        self.to_logvar = nn.Linear(width, self.latent_dim)

    def _check_input(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{self._registry_name} was built for inputs {list(self.input_shape)}, got {list(x.shape[1:])}"
            )
        if self.backbone == "conv":
            check_sides(x, len(self.encoder), self._registry_name)

    @property
    def _registry_name(self) -> str:
        return "cvae" if self.conditional else "vae"

    def _condition(self, cond: Tensor | None, like: Tensor) -> Tensor | None:
        if not self.conditional:
            return None
        if cond is None:
            raise ValueError("cvae needs the class labels: forward(x, cond=labels)")
        return one_hot(cond, self.num_classes, like)

    def encode(self, x: Tensor, cond: Tensor | None = None) -> tuple[list[Tensor], Tensor, Tensor]:
        """Every encoder layer's activation, then mu and logvar."""
        self._check_input(x)
        label = self._condition(cond, x)
        if self.backbone == "mlp":
            h = x.flatten(1)
            if label is not None:
                h = torch.cat([h, label], 1)
        else:
            h = x
            if label is not None:
                h = torch.cat([h, label[:, :, None, None].expand(-1, -1, *x.shape[2:])], 1)
        activations = []
        for layer in self.encoder:
            h = layer(h)
            activations.append(h)
        flat = h.flatten(1)
        return activations, self.to_mu(flat), self.to_logvar(flat)

    def decode_logits(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        """The decoder's raw output in image shape: the mean (gaussian) or logits (bernoulli)."""
        label = self._condition(cond, z)
        if label is not None:
            z = torch.cat([z, label], 1)
        return self.decoder(z).view(z.shape[0], *self.input_shape)

    def _mean(self, raw: Tensor) -> Tensor:
        return torch.sigmoid(raw) if self.likelihood == "bernoulli" else raw

    def forward(self, x: Tensor, cond: Tensor | None = None) -> dict[str, Tensor]:
        _, mu, logvar = self.encode(x, cond)
        z = reparameterize(mu, logvar) if self.training else mu
        raw = self.decode_logits(z, cond)
        out = {"recon": self._mean(raw), "mu": mu, "logvar": logvar, "z": z}
        if self.likelihood == "bernoulli":
            out["recon_logits"] = raw
        return out

    def loss(self, x: Tensor, out: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        """Negative ELBO per image (beta-weighted KL), averaged over the batch."""
        if self.likelihood == "bernoulli":
            low, high = float(x.min()), float(x.max())
            if low < 0.0 or high > 1.0:
                raise ValueError(
                    f"bernoulli likelihood needs pixels in [0, 1], got range [{low:.3g}, {high:.3g}]"
                )
            recon = bernoulli_nll(out["recon_logits"], x)
        else:
            recon = sum_squared_error(out["recon"], x)
        kl = gaussian_kl(out["mu"], out["logvar"])
        loss = (recon + self.beta * kl).mean()
        metrics = {"recon": recon.mean(), "kl": kl.mean(), "elbo": -(recon + kl).mean()}
        return loss, detached_metrics(metrics)

    def features(self, x: Tensor, cond: Tensor | None = None) -> dict[str, Tensor]:
        """Every encoder layer (`layer1`... for mlp, `block1`... for conv) and `mu`."""
        activations, mu, _ = self.encode(x, cond)
        prefix = "layer" if self.backbone == "mlp" else "block"
        feats = {f"{prefix}{i}": h for i, h in enumerate(activations, start=1)}
        feats["mu"] = mu
        return feats

    @torch.no_grad()
    def sample(self, n: int, label: int | None = None) -> Tensor:
        """`n` images decoded from z ~ N(0, I) (of class `label` for cvae): means of p(x|z)."""
        param = self.to_mu.weight
        z = torch.randn(n, self.latent_dim, device=param.device, dtype=param.dtype)
        cond = None
        if self.conditional:
            if label is None:
                raise ValueError("cvae.sample needs the class: sample(n, label)")
            cond = torch.full((n,), int(label), dtype=torch.long, device=param.device)
        return self._mean(self.decode_logits(z, cond))

    def filters(self) -> Tensor:
        """Conv: the first kernels; MLP: the first layer's rows as images (label inputs dropped)."""
        first = self.encoder[0][0].weight.detach()
        if self.backbone == "conv":
            return first[:, : self.input_shape[0]]
        return first[:, : math.prod(self.input_shape)].reshape(first.shape[0], *self.input_shape)


@register("cvae")
class CVAE(VAE):
    """Conditional VAE: `forward(x, cond=labels)`; `sample(n, label)`. Takes `vae`'s options."""

    conditional = True

    def __init__(self, num_classes: int = 10, **vae_options) -> None:
        if num_classes < 2:
            raise ValueError(f"cvae needs num_classes >= 2, got {num_classes}")
        super().__init__(num_classes=num_classes, **vae_options)
