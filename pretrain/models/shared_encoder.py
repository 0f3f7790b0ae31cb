"""One encoder shared by several domains, one decoder per domain: the face-swap autoencoder.

Each sample carries a domain id (`cond`: which person, camera or video it comes from) and
is reconstructed by its own domain's decoder. The shared encoder must therefore describe
what the domains have in common (pose, expression, lighting), and each decoder learns to
render it in its domain's appearance. `swap(x, to_domain)` decodes with another domain's
decoder: a face of person A rendered as person B, as in the original deepfakes setup.
Loss: mean squared error of each sample against its own domain's reconstruction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.models import register
from pretrain.models.base import Autoencoder, Metrics, detached_metrics
from pretrain.models.blocks import check_sides, down_block, up_block


@register("shared_encoder")
class SharedEncoderAutoencoder(Autoencoder):
    """`num_domains` decoders over one encoder of `len(channels)` strided conv blocks.

    `decoder` is `transposed` or `upsample` (see `conv_ae`); inputs' sides must divide by
    2^len(channels). Trained end to end in one stage.
    """

    conditional = True

    def __init__(
        self,
        in_channels: int = 3,
        channels: list[int] | tuple[int, ...] = (32, 64, 128, 256),
        num_domains: int = 2,
        activation: str = "relu",
        decoder: str = "upsample",
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("shared_encoder needs at least one block (channels is empty)")
        if num_domains < 2:
            raise ValueError(f"shared_encoder needs num_domains >= 2, got {num_domains}")
        self.num_domains = num_domains
        sizes = [in_channels, *channels]
        self.encoder = nn.ModuleList(
            down_block(a, b, activation) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        ups = list(reversed(sizes))
        self.decoders = nn.ModuleList(
            nn.Sequential(
                *(
                    up_block(a, b, activation, decoder, last=i == len(channels) - 1)
                    for i, (a, b) in enumerate(zip(ups[:-1], ups[1:], strict=True))
                )
            )
            for _ in range(num_domains)
        )

    def encode(self, x: Tensor) -> list[Tensor]:
        check_sides(x, len(self.encoder), "shared_encoder")
        maps = []
        for block in self.encoder:
            x = block(x)
            maps.append(x)
        return maps

    def _domains(self, cond: Tensor | None, batch: int) -> Tensor:
        if cond is None:
            raise ValueError(
                "shared_encoder needs a domain id per sample: forward(x, cond=domains)"
            )
        if cond.shape != (batch,):
            raise ValueError(f"expected {batch} domain ids, got shape {tuple(cond.shape)}")
        if int(cond.min()) < 0 or int(cond.max()) >= self.num_domains:
            raise ValueError(
                f"domain ids must be in [0, {self.num_domains}), got {cond.unique().tolist()}"
            )
        return cond.long()

    def forward(self, x: Tensor, cond: Tensor | None = None) -> dict[str, Tensor]:
        """Decodes each sample with its own domain's decoder (`cond`: domain ids, (B,))."""
        domains = self._domains(cond, x.shape[0])
        maps = self.encode(x)
        z = maps[-1]
        recon = torch.zeros_like(x)
        # Each decoder sees only its own samples; a decoder with none in this batch gets no
        # gradient (DeepSpeed reduces a missing gradient as zeros, so ranks stay in step).
        for d, decoder in enumerate(self.decoders):
            index = (domains == d).nonzero().squeeze(1)
            if index.numel():
                recon = recon.index_copy(0, index, decoder(z[index]))
        out = {f"block{i}": h for i, h in enumerate(maps, start=1)}
        out["z"] = z
        out["recon"] = recon
        return out

    def swap(self, x: Tensor, to_domain: int) -> Tensor:
        """Reconstruct every sample of `x` with domain `to_domain`'s decoder."""
        if not 0 <= to_domain < self.num_domains:
            raise ValueError(f"to_domain must be in [0, {self.num_domains}), got {to_domain}")
        return self.decoders[to_domain](self.encode(x)[-1])

    def loss(self, x: Tensor, out: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        mse = F.mse_loss(out["recon"].float(), x.float())
        return mse, detached_metrics({"recon": mse.detach()})

    def features(self, x: Tensor, cond: Tensor | None = None) -> dict[str, Tensor]:
        """`block1`...`blockN` of the shared encoder (domain-independent, so `cond` is unused)."""
        return {f"block{i}": h for i, h in enumerate(self.encode(x), start=1)}

    def filters(self) -> Tensor:
        return self.encoder[0][0].weight.detach()
