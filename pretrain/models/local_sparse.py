"""The "cat neuron" network of Le et al. 2012, "Building high-level features using large scale
unsupervised learning": three blocks of locally connected filters, L2 pooling and local
contrast normalization, each trained greedily as a reconstruction topographic ICA.

Per block, with x the block input and h = W1 x the filter responses:
  pooled_j = sqrt(eps + sum_{i in N(j)} h_i^2)      (L2 pooling, fixed uniform weights)
  loss     = ||W2 h - x||^2 + lambda * sum_j pooled_j
and the block output (the next block's input) is the local contrast normalization of the
pooled maps. The weights are untied: every output location has its own filters (W1 of
shape (locations, maps, patch)) and its own decoder (W2); the paper untied them so the
network could learn invariances other than translation. Both run as one unfold plus one
batched matmul, and the decoder's overlapping patches are summed back by `F.fold`.

Size. Untied weights grow with the number of locations. The paper's setting (200x200 RGB,
18x18 receptive fields, stride 1, 8 maps, 5x5 pooling at stride 1) has 2,584,343,232
parameters here (W1 and W2 of the three blocks: 520,820,928 + 1,142,802,432 +
920,719,872): 10.3 GB of fp32 weights, 18.3 GB to train its largest block with Adam
(weights, gradients, two moments), and the first block's unfolded input alone is 130 MB
per image. (The paper reports 1 billion connections for its variant.) With stride
(4, 2, 2) and fields (18, 10, 6) the same 200x200 input needs 37,754,624 parameters.
`footprint(**kwargs)` computes these figures without allocating anything. The defaults
are laptop-sized: 64x64 input, 6x6 fields at stride 2, 8 maps: 2,407,680 parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.losses import sum_squared_error
from pretrain.models import register
from pretrain.models.base import Autoencoder, Metrics, Stage, detached_metrics

#: Smallest divisor of the contrast normalization; pooled units are at least sqrt(eps) = 0.1.
LCN_FLOOR = 1e-2


class LocalSparseBlock(nn.Module):
    """One filtering / L2 pooling / contrast normalization block with its own decoder.

    `in_size` is fixed at construction because the weights are per location. Pixels
    beyond the last full receptive field (when `(in_size - field) % stride != 0`) are not
    seen by any filter, so the reconstruction target is the covered crop.
    """

    def __init__(
        self,
        in_channels: int,
        in_size: int,
        maps: int,
        field: int,
        stride: int,
        pool_size: int,
        lcn_size: int,
        sparsity_weight: float,
        eps: float,
    ) -> None:
        super().__init__()
        if field > in_size:
            raise ValueError(f"receptive field {field} is larger than the block input {in_size}")
        if pool_size % 2 == 0 or lcn_size % 2 == 0:
            raise ValueError("pool_size and lcn_size must be odd (centered neighbourhoods)")
        self.field, self.stride, self.pool_size = field, stride, pool_size
        self.sparsity_weight, self.eps = sparsity_weight, eps
        self.out_size = (in_size - field) // stride + 1
        self.covered = (self.out_size - 1) * stride + field
        locations, patch = self.out_size**2, in_channels * field * field
        # Responses start at unit variance for unit-variance input. A pixel is the sum of
        # (field / stride)^2 overlapping patch reconstructions; the decoder starts at a tenth
        # of the scale that would give them unit variance, so the first reconstruction is
        # close to zero rather than noise as large as the input.
        overlap = (field / stride) ** 2
        self.encode_weight = nn.Parameter(torch.randn(locations, maps, patch) / math.sqrt(patch))
        self.decode_weight = nn.Parameter(
            0.1 * torch.randn(locations, patch, maps) / math.sqrt(maps * overlap)
        )
        self.register_buffer("lcn_window", _gaussian_window(maps, lcn_size), persistent=False)

    def encode(self, x: Tensor) -> Tensor:
        """Untied filters: (B, C, H, W) -> (B, maps, out, out)."""
        patches = F.unfold(x[..., : self.covered, : self.covered], self.field, stride=self.stride)
        h = torch.einsum("bpl,lmp->bml", patches, self.encode_weight)
        return h.unflatten(2, (self.out_size, self.out_size))

    def decode(self, h: Tensor) -> Tensor:
        """W2 h: each location's patch, summed where patches overlap, over the covered crop."""
        patches = torch.einsum("bml,lpm->bpl", h.flatten(2), self.decode_weight)
        size = (self.covered, self.covered)
        return F.fold(patches, size, self.field, stride=self.stride)

    def pool(self, h: Tensor) -> Tensor:
        """sqrt(eps + sum of squares over a pool_size^2 window of the same map), same size."""
        k = self.pool_size
        squares = F.avg_pool2d(h.square(), k, stride=1, padding=k // 2, count_include_pad=True)
        return torch.sqrt(self.eps + squares * (k * k))

    def normalize(self, pooled: Tensor) -> Tensor:
        """Local contrast normalization (Jarrett et al. 2009): subtract the Gaussian-weighted
        mean over all maps of a neighbourhood, divide by the weighted standard deviation,
        floored at its mean over the image so flat regions are not blown up, and at
        `LCN_FLOOR` so that a flat image maps to zeros rather than to amplified rounding."""
        pad = self.lcn_window.shape[-1] // 2

        def local_mean(t: Tensor) -> Tensor:
            return F.conv2d(F.pad(t, (pad,) * 4, mode="replicate"), self.lcn_window)

        centered = pooled - local_mean(pooled)
        spread = local_mean(centered.square()).sqrt()
        floor = spread.mean(dim=(1, 2, 3), keepdim=True)
        return centered / torch.maximum(spread, floor).clamp_min(LCN_FLOOR)

    def output(self, x: Tensor) -> Tensor:
        """The block's output (next block's input), without the decoder."""
        return self.normalize(self.pool(self.encode(x)))

    def objective(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-image reconstruction SSE + lambda x summed pooled units (batch means)."""
        h = self.encode(x)
        pooled = self.pool(h)
        target = x[..., : self.covered, : self.covered]
        decoded = self.decode(h)
        recon = sum_squared_error(decoded, target).mean()
        sparsity = pooled.float().sum() / x.shape[0]
        parts = {"recon": recon, "sparsity": sparsity, "pooled": pooled, "decoded": decoded}
        return recon + self.sparsity_weight * sparsity, parts


def _gaussian_window(maps: int, size: int) -> Tensor:
    """(1, maps, size, size) Gaussian summing to 1 over maps and space (sigma = size / 4)."""
    offsets = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(offsets**2) / (2 * (size / 4) ** 2))
    window = torch.outer(g, g).expand(1, maps, size, size)
    return window / window.sum()


def _per_block(value: int | list[int], blocks: int, name: str) -> list[int]:
    values = [value] * blocks if isinstance(value, int) else list(value)
    if len(values) != blocks:
        raise ValueError(f"{name} has {len(values)} entries for {blocks} blocks")
    return values


@register("local_sparse")
class LocalSparseNet(Autoencoder):
    """Le et al. 2012: `blocks` greedy stages of locally connected reconstruction TICA.

    `maps`, `receptive_field` and `stride` take one value for all blocks or a list with
    one per block. Inputs must be `in_channels` x `input_size` x `input_size`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        input_size: int = 64,
        maps: int | list[int] = 8,
        receptive_field: int | list[int] = 6,
        stride: int | list[int] = 2,
        blocks: int = 3,
        pool_size: int = 5,
        lcn_size: int = 5,
        sparsity_weight: float = 0.1,
        eps: float = 0.01,
    ) -> None:
        super().__init__()
        self.in_channels, self.input_size = in_channels, input_size
        per_block = zip(
            _per_block(maps, blocks, "maps"),
            _per_block(receptive_field, blocks, "receptive_field"),
            _per_block(stride, blocks, "stride"),
            strict=True,
        )
        layers = []
        channels, size = in_channels, input_size
        for block_maps, field, block_stride in per_block:
            block = LocalSparseBlock(
                channels,
                size,
                block_maps,
                field,
                block_stride,
                pool_size,
                lcn_size,
                sparsity_weight,
                eps,
            )
            layers.append(block)
            channels, size = block_maps, block.out_size
        self.blocks = nn.ModuleList(layers)

    def _check_input(self, x: Tensor) -> None:
        expected = (self.in_channels, self.input_size, self.input_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"local_sparse was built for inputs {expected}, got {tuple(x.shape[1:])}"
            )

    def _input_of(self, index: int, x: Tensor) -> Tensor:
        """Run the blocks below `index`: what block `index` sees."""
        self._check_input(x)
        for block in self.blocks[:index]:
            x = block.output(x)
        return x

    def forward(self, x: Tensor, cond: Tensor | None = None) -> dict[str, Tensor]:
        """All blocks; per block its input, pooled maps, output and loss terms."""
        self._check_input(x)
        out: dict[str, Tensor] = {}
        total = x.new_zeros((), dtype=torch.float32)
        for i, block in enumerate(self.blocks, start=1):
            block_loss, parts = block.objective(x)
            total = total + block_loss
            out[f"block{i}_recon"], out[f"block{i}_sparsity"] = parts["recon"], parts["sparsity"]
            out[f"block{i}_pooled"] = parts["pooled"]
            if i == 1:
                out["recon"] = F.pad(parts["decoded"], _uncovered_pad(x, block.covered))
            x = block.normalize(parts["pooled"])
            out[f"block{i}"] = x
        out["loss"] = total
        return out

    def loss(self, x: Tensor, out: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        metrics = {"recon": out["block1_recon"]}
        for i in range(1, len(self.blocks) + 1):
            metrics[f"block{i}_recon"] = out[f"block{i}_recon"]
            metrics[f"block{i}_sparsity"] = out[f"block{i}_sparsity"]
        return out["loss"], detached_metrics(metrics)

    def features(self, x: Tensor, cond: Tensor | None = None) -> dict[str, Tensor]:
        """Per block the pooled units (`block<i>_pooled`, the paper's neurons) and their
        contrast-normalized maps (`block<i>`, the next block's input)."""
        self._check_input(x)
        features = {}
        for i, block in enumerate(self.blocks, start=1):
            pooled = block.pool(block.encode(x))
            x = block.normalize(pooled)
            features[f"block{i}_pooled"], features[f"block{i}"] = pooled, x
        return features

    def stages(self) -> list[Stage]:
        """One stage per block; its `prepare` runs the frozen blocks below it."""
        stages = []
        for index, block in enumerate(self.blocks):

            def prepare(x: Tensor, index: int = index) -> Tensor:
                return self._input_of(index, x)

            def loss(x: Tensor, cond: Tensor | None = None, block: LocalSparseBlock = block):
                block_loss, parts = block.objective(x)
                return block_loss, detached_metrics(
                    {"recon": parts["recon"], "sparsity": parts["sparsity"]}
                )

            stages.append(
                Stage(
                    name=f"block{index + 1}",
                    trainable=(block,),
                    prepare=prepare,
                    loss=loss,
                    frozen=tuple(self.blocks[:index]),
                )
            )
        return stages

    def filters(self) -> Tensor:
        """The first block's filters at the central location, as (maps, C, field, field)."""
        block = self.blocks[0]
        centre = block.encode_weight[block.encode_weight.shape[0] // 2].detach()
        return centre.unflatten(1, (self.in_channels, block.field, block.field))


def _uncovered_pad(x: Tensor, covered: int) -> tuple[int, int, int, int]:
    return (0, x.shape[-1] - covered, 0, x.shape[-2] - covered)


def footprint(**kwargs) -> dict[str, float]:
    """Parameters per block and fp32 bytes of a `LocalSparseNet(**kwargs)`, built on the meta
    device so the paper's 200x200 setting can be sized on a laptop. `train_bytes_largest_block`
    counts weights, gradients and Adam's two moments of the largest greedy stage."""
    with torch.device("meta"):
        model = LocalSparseNet(**kwargs)
    per_block = [sum(p.numel() for p in block.parameters()) for block in model.blocks]
    first = model.blocks[0]
    patch_floats = first.encode_weight.shape[2] * first.encode_weight.shape[0]
    return {
        **{f"block{i}_params": n for i, n in enumerate(per_block, start=1)},
        "params": sum(per_block),
        "weight_bytes": 4 * sum(per_block),
        "train_bytes_largest_block": 16 * max(per_block),
        "unfolded_input_bytes_per_image": 4 * patch_floats,
    }
