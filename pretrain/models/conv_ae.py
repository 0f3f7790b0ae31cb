"""Convolutional autoencoder of strided blocks, greedy-stackable like `stacked_ae`.

Block k halves the sides (4x4 stride-2 conv, GroupNorm, activation) and has its own
decoder that doubles them back to block k-1's output. So block k can be trained alone,
as a shallow autoencoder of the frozen feature maps below it (stage k), and the decoders
chained in reverse make the full image decoder for the last, end-to-end stage. Block 1's
decoder is affine (pixels of any sign); deeper decoders end in GroupNorm + activation,
like the activations they reconstruct. Loss: mean squared error, plus the sparse and
denoising options of `stacked_ae` applied to each trained block's input and code.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.losses import SparseDenoising
from pretrain.models import register
from pretrain.models.base import Autoencoder, Metrics, Stage, detached_metrics, layer_depth
from pretrain.models.blocks import check_sides, down_block, up_block


class ConvAutoencoderBlock(nn.Module):
    """One greedy unit: a down block and the up block that inverts it."""

    def __init__(self, in_ch: int, out_ch: int, act: str, decoder: str, first: bool) -> None:
        super().__init__()
        self.encoder = down_block(in_ch, out_ch, act)
        self.decoder = up_block(out_ch, in_ch, act, decoder, last=first)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode(self, h: Tensor) -> Tensor:
        return self.decoder(h)


@register("conv_ae")
class ConvAutoencoder(Autoencoder):
    """`len(channels)` strided blocks; inputs of any size whose sides divide by 2^len(channels).

    Options as in `stacked_ae`: `activation` (`sigmoid` for KL sparsity, whose rho_hat is
    a channel's mean over batch and positions), `l1`, `sparsity_target`,
    `sparsity_weight`, `mask_prob`, `noise_std`, `greedy`, `fine_tune`; `decoder` is
    `transposed` (transposed convolutions) or `upsample` (nearest upsampling + 3x3 conv).
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: list[int] | tuple[int, ...] = (32, 64, 128),
        activation: str = "relu",
        decoder: str = "transposed",
        l1: float = 0.0,
        sparsity_target: float | None = None,
        sparsity_weight: float = 0.0,
        mask_prob: float = 0.0,
        noise_std: float = 0.0,
        greedy: bool = True,
        fine_tune: bool = True,
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("conv_ae needs at least one block (channels is empty)")
        if not (greedy or fine_tune):
            raise ValueError("conv_ae with greedy=False and fine_tune=False has no stage")
        self.regularizer = SparseDenoising(
            l1, sparsity_target, sparsity_weight, mask_prob, noise_std, activation
        )
        self.greedy, self.fine_tune = greedy, fine_tune
        sizes = [in_channels, *channels]
        self.blocks = nn.ModuleList(
            ConvAutoencoderBlock(c_in, c_out, activation, decoder, first=i == 0)
            for i, (c_in, c_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
        )

    def encode(self, x: Tensor, depth: int | None = None) -> list[Tensor]:
        """The maps of the first `depth` blocks (all by default)."""
        check_sides(x, len(self.blocks), "conv_ae")
        maps = []
        for block in self.blocks[:depth]:
            x = block.encode(x)
            maps.append(x)
        return maps

    def forward(self, x: Tensor, cond: Tensor | None = None) -> dict[str, Tensor]:
        """Every block's map (`block1`..., `z` = the deepest) and `recon`; corrupts in training."""
        maps = self.encode(self.regularizer.corrupt(x) if self.training else x)
        recon = maps[-1]
        for block in reversed(self.blocks):
            recon = block.decode(recon)
        out = {f"block{i}": h for i, h in enumerate(maps, start=1)}
        out["z"] = maps[-1]
        out["recon"] = recon
        return out

    def loss(self, x: Tensor, out: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        maps = [out[f"block{i}"] for i in range(1, len(self.blocks) + 1)]
        return self._objective(out["recon"], x, maps)

    def _objective(
        self, recon: Tensor, target: Tensor, maps: list[Tensor]
    ) -> tuple[Tensor, Metrics]:
        mse = F.mse_loss(recon.float(), target.float())
        sparsity, metrics = self.regularizer.penalty(maps)
        metrics["recon"] = mse.detach()
        return mse + sparsity, detached_metrics(metrics)

    def features(self, x: Tensor, cond: Tensor | None = None) -> dict[str, Tensor]:
        """`block1`...`blockN`: every encoder block's feature map (no corruption)."""
        return {f"block{i}": h for i, h in enumerate(self.encode(x), start=1)}

    def feature(self, x: Tensor, layer: str, cond: Tensor | None = None) -> Tensor:
        depth = layer_depth(layer, "block", len(self.blocks))
        return super().feature(x, layer) if depth is None else self.encode(x, depth)[-1]

    def stages(self) -> list[Stage]:
        stages = [self._block_stage(k) for k in range(len(self.blocks))] if self.greedy else []
        if self.fine_tune:
            stages.append(self.end_to_end_stage("fine_tune"))
        return stages

    def _block_stage(self, k: int) -> Stage:
        """Block k (0-based) reconstructs the frozen maps of blocks < k from a corrupted copy."""
        block = self.blocks[k]

        def prepare(x: Tensor) -> Tensor:
            check_sides(x, len(self.blocks), "conv_ae")
            for below in self.blocks[:k]:
                x = below.encode(x)
            return x

        def loss(h: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Metrics]:
            code = block.encode(self.regularizer.corrupt(h) if block.training else h)
            return self._objective(block.decode(code), h, [code])

        return Stage(
            name=f"block{k + 1}",
            trainable=(block,),
            prepare=prepare,
            loss=loss,
            frozen=tuple(self.blocks[:k]),
        )

    def filters(self) -> Tensor:
        """First convolution's kernels (out_channels, in_channels, 4, 4)."""
        return self.blocks[0].encoder[0].weight.detach()
