"""Winner-take-all convolutional autoencoder (Makhzani and Frey, NIPS 2015).

Why this family exists: a cat-selective unit is a unit that fires for few inputs, and
the strongest for the right ones. WTA training enforces both by construction instead of
hoping a penalty finds them. During training the deepest feature map is made sparse in
two ways before the decoder sees it:

- spatial sparsity: per sample and channel only the largest activation survives (every
  other position is zeroed), so each channel must describe *one* thing somewhere in the
  frame: a detector that is position invariant, read out as the max over space;
- lifetime sparsity: per channel only the `lifetime_k` share of the batch with the
  largest winners keeps them, so a channel that fires for everything is not rewarded
  and each channel specialises to a minority of frames;
- with `lifetime_rank="contrast"` the batch is ranked by the winner over its channel's
  mean response in that frame instead: a texture lights a channel everywhere and ranks
  low, a face lights it in one place and ranks high, so textures train it less;
- optionally, channel sparsity (`channel_k`): per sample only the `channel_k` channels
  with the largest winners keep them (the k-sparse autoencoder's top-k, Makhzani and Frey
  2013, over the spatial winners), so an image is described by its few strongest things.

`cluster_k` adds a second stage, cluster refinement (DeepCluster, Caron et al. 2018):
the encoder as the first stage left it is frozen as a teacher, k-means groups the
training frames by the teacher's per-channel maxima of every layer, and the encoder then
learns to tell the groups apart from flipped and shifted frames through a linear head
on its deepest maxima, while it keeps the WTA reconstruction loss. See
`cluster_targets` for why.

`stretch_keep` adds a second stage instead, stretch refinement: the clips whose frames
split best into one stretch and the rest (something came and went) label their frames
"shown" and "not shown", the clips that change least label theirs "not shown", and the
encoder learns to tell them apart through a linear head on its deepest maxima, from
flipped and shifted frames, while it keeps the WTA loss. The labels come from the
frames' order in their clips (the sample keys), never from a label; see
`stretch_targets` for how and what it assumes.

`highpass` makes the target the input minus its local mean (a box blur of that side):
smooth shading then costs nothing to leave out, and the winners spend themselves on edges
and objects.

The decoder is one wide transposed convolution per encoder stride, so a surviving winner
must paint a whole patch (a face, not an edge) back at its place. At evaluation time
nothing is masked: `features` returns the dense ReLU maps of every layer and the neuron
analysis reduces a channel by its max over space, the quantity the training made
selective.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline.keys import clip_positions, key_ids
from pretrain.models import register
from pretrain.models.base import (
    Autoencoder,
    Metrics,
    Stage,
    detached_metrics,
    layer_depth,
)
from pretrain.models.blocks import check_sides, group_norm
from pretrain.models.cluster_targets import ClusterTargets
from pretrain.models.stretch_targets import UNLABELLED, StretchTargets


def spatial_winners(h: Tensor) -> Tensor:
    """Keep each (sample, channel)'s largest activation, zero the rest (ties keep all)."""
    peak = h.flatten(2).amax(2, keepdim=True).unsqueeze(-1)
    return h * (h >= peak)


def _largest_winners(h: Tensor, keep: int, dim: int, score: Tensor | None = None) -> Tensor:
    """Keep the winners that rank among the `keep` largest along `dim` of the (B, C)
    `score` (by default the peaks themselves)."""
    score = h.flatten(2).amax(2) if score is None else score  # (B, C)
    threshold = score.topk(keep, dim=dim).values.narrow(dim, keep - 1, 1)
    return h * (score >= threshold).to(h.dtype)[:, :, None, None]


def channel_winners(h: Tensor, k: int) -> Tensor:
    """Keep, per sample, the winners of the `k` channels whose winners are largest."""
    return _largest_winners(h, min(k, h.shape[1]), dim=1)


def lifetime_winners(h: Tensor, k: float, score: Tensor | None = None) -> Tensor:
    """Keep, per channel, the winners of the `k` share of the batch that rank highest, by
    `score` (B, C) or else by the winners themselves.

    `h` is already spatially sparse; at least one sample per channel survives, so every
    channel gets a gradient on every step (no unit dies from the mask alone).
    """
    return _largest_winners(h, max(1, round(k * h.shape[0])), dim=0, score=score)


def contrast(winners: Tensor, dense: Tensor) -> Tensor:
    """(B, C): each winner over its channel's mean response in the same frame (no gradient:
    a ranking)."""
    with torch.no_grad():
        return winners.flatten(2).amax(2) / dense.mean((2, 3)).add(1e-3)


class L2Pool(nn.Module):
    """sqrt of the sum of squares over groups of `group` adjacent channels (Le et al.'s L2
    pooling across filters): a unit answers an edge of either polarity, so a face drawn
    lighter or darker than its background reaches the layers above as the same shape."""

    def __init__(self, group: int) -> None:
        super().__init__()
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        return x.view(b, c // self.group, self.group, h, w).pow(2).sum(2).add(1e-6).sqrt()


@register("wta_conv_ae")
class WTAConvAutoencoder(Autoencoder):
    """`len(channels)` conv layers (5x5; `strides` per layer), ReLU, WTA-sparse deepest map.

    `lifetime_k` is the share of a batch each deepest channel may fire for (Makhzani's
    5%); `lifetime_k=1.0` and `spatial=False` turn the sparsity off (a plain conv
    autoencoder of the same shape, for ablations). Inputs: sides divisible by the
    product of the strides.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: list[int] | tuple[int, ...] = (32, 64, 64),
        strides: list[int] | tuple[int, ...] = (2, 2, 2),
        kernel: int = 5,
        lifetime_k: float = 0.05,
        spatial: bool = True,
        norm: bool = True,
        l2_pool: int = 1,
        channel_k: int = 0,
        highpass: int = 0,
        lifetime_rank: str = "peak",
        cluster_k: int = 0,
        cluster_pca: int = 64,
        cluster_frames: int = 4096,
        cluster_shift: int = 6,
        cluster_recon: float = 1.0,
        cluster_seed: int = 0,
        stretch_keep: float = 0.0,
        stretch_negatives: float = 0.25,
        stretch_frames: int = 4096,
        stretch_shift: int = 6,
        stretch_recon: float = 1.0,
    ) -> None:
        super().__init__()
        if not channels or len(channels) != len(strides):
            raise ValueError("wta_conv_ae needs one stride per layer (channels and strides)")
        if not 0.0 < lifetime_k <= 1.0:
            raise ValueError(f"lifetime_k must be in (0, 1], got {lifetime_k}")
        if l2_pool < 1:
            raise ValueError(f"l2_pool must be >= 1 (1: plain ReLU), got {l2_pool}")
        if channel_k < 0:
            raise ValueError(f"channel_k must be >= 0 (0: off), got {channel_k}")
        if highpass < 0 or (highpass and highpass % 2 == 0):
            raise ValueError(f"highpass must be 0 (off) or an odd side, got {highpass}")
        if lifetime_rank not in ("peak", "contrast"):
            raise ValueError(f"lifetime_rank must be 'peak' or 'contrast', got {lifetime_rank!r}")
        if cluster_k == 1 or cluster_k < 0:
            raise ValueError(f"cluster_k must be 0 (off) or >= 2 clusters, got {cluster_k}")
        if cluster_k and (cluster_pca < 1 or cluster_frames < cluster_k or cluster_shift < 0):
            raise ValueError(
                "cluster refinement needs cluster_pca >= 1, cluster_frames >= cluster_k "
                f"and cluster_shift >= 0, got {cluster_pca}, {cluster_frames}, {cluster_shift}"
            )
        if not 0.0 <= stretch_keep < 1.0 or not 0.0 <= stretch_negatives <= 1.0 - stretch_keep:
            raise ValueError(
                "stretch refinement needs 0 <= stretch_keep < 1 and 0 <= stretch_negatives "
                f"<= 1 - stretch_keep, got {stretch_keep} and {stretch_negatives}"
            )
        if stretch_keep and (cluster_k or stretch_frames < 8 or stretch_shift < 0):
            raise ValueError(
                "stretch refinement goes without cluster_k, with stretch_frames >= 8 and "
                f"stretch_shift >= 0, got cluster_k {cluster_k}, {stretch_frames}, {stretch_shift}"
            )
        self.lifetime_k, self.spatial, self.lifetime_rank = lifetime_k, spatial, lifetime_rank
        self.channel_k, self.highpass = channel_k, highpass
        self.total_stride = 1
        layers: list[nn.Module] = []
        sizes = [in_channels, *channels]
        for i, (c_in, c_out, s) in enumerate(zip(sizes[:-1], sizes[1:], strides, strict=True)):
            self.total_stride *= s
            group = l2_pool if i < len(channels) - 1 else 1
            width = c_out * group
            layers.append(
                nn.Sequential(
                    nn.Conv2d(c_in, width, kernel, stride=s, padding=kernel // 2),
                    group_norm(width) if norm else nn.Identity(),
                    L2Pool(group) if group > 1 else nn.ReLU(),
                )
            )
        self.layers = nn.ModuleList(layers)
        # A winner paints a patch about as wide as its receptive field: one transposed conv
        # per encoder layer, the last one affine (pixels of any sign).
        decoder: list[nn.Module] = []
        for i, (c_in, c_out, s) in enumerate(
            zip(sizes[:0:-1], sizes[-2::-1], strides[::-1], strict=True)
        ):
            k = 2 * s if s > 1 else kernel  # output side exactly s * input side
            conv = nn.ConvTranspose2d(c_in, c_out, k, stride=s, padding=(k - s) // 2)
            decoder.append(conv if i == len(channels) - 1 else nn.Sequential(conv, nn.ReLU()))
        self.decoder = nn.ModuleList(decoder)
        self.cluster_k = cluster_k
        if cluster_k:
            self.cluster_frames, self.cluster_shift = cluster_frames, cluster_shift
            self.cluster_recon, self.cluster_seed = cluster_recon, cluster_seed
            # The teacher: a frozen copy of the encoder, filled in when the stage starts.
            self.teacher = copy.deepcopy(self.layers).requires_grad_(False)
            self.targets = ClusterTargets(sum(channels), cluster_k, cluster_pca)
            self.cluster_head = nn.Linear(channels[-1], cluster_k)
        self.stretch_keep = stretch_keep
        if stretch_keep:
            self.stretch_negatives, self.stretch_shift = stretch_negatives, stretch_shift
            self.stretch_recon = stretch_recon
            self.stretch = StretchTargets(sum(channels), stretch_frames)
            self.stretch_head = nn.Linear(channels[-1], 2)

    def encode(
        self, x: Tensor, depth: int | None = None, layers: nn.ModuleList | None = None
    ) -> list[Tensor]:
        """The maps of the first `depth` layers (all by default), of the encoder or of
        `layers` of the same shape (the cluster stage's teacher)."""
        check_sides(x, 0, "wta_conv_ae")
        if x.shape[-1] % self.total_stride or x.shape[-2] % self.total_stride:
            raise ValueError(
                f"wta_conv_ae needs sides divisible by {self.total_stride}, got {tuple(x.shape)}"
            )
        maps = []
        for layer in (self.layers if layers is None else layers)[:depth]:
            x = layer(x)
            maps.append(x)
        return maps

    def sparsify(self, h: Tensor) -> Tensor:
        dense = h
        if self.spatial:
            h = spatial_winners(h)
        if self.channel_k:
            h = channel_winners(h, self.channel_k)
        if self.lifetime_k < 1.0:
            score = contrast(h, dense) if self.lifetime_rank == "contrast" else None
            h = lifetime_winners(h, self.lifetime_k, score)
        return h

    def decode(self, code: Tensor) -> Tensor:
        for layer in self.decoder:
            code = layer(code)
        return code

    def forward(self, x: Tensor, cond: Tensor | None = None) -> dict[str, Tensor]:
        """Every layer's dense map (`layer1`...), `z` (the deepest), `code` (its sparse
        version: sparse in training only), `recon`, and with `highpass` the `target`."""
        maps = self.encode(x)
        code = self.sparsify(maps[-1]) if self.training else maps[-1]
        out = {f"layer{i}": h for i, h in enumerate(maps, start=1)}
        out.update(z=maps[-1], code=code, recon=self.decode(code))
        if self.highpass:  # what `recon` reconstructs, for the monitor's input/recon pairs
            out["target"] = self.target(x)
        return out

    def target(self, x: Tensor) -> Tensor:
        """What the decoder reconstructs: the input, or with `highpass` its detail alone."""
        if not self.highpass:
            return x
        pad = self.highpass // 2
        blur = F.avg_pool2d(F.pad(x, (pad,) * 4, mode="replicate"), self.highpass, stride=1)
        return x - blur

    def loss(self, x: Tensor, out: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        target = out["target"] if "target" in out else self.target(x)
        mse = F.mse_loss(out["recon"].float(), target.float())
        with torch.no_grad():
            active = (out["code"] > 0).float().flatten(2).amax(2).mean()  # share of (B, C) firing
        return mse, detached_metrics({"recon": mse, "active": active})

    def stages(self) -> list[Stage]:
        """WTA reconstruction alone; with `cluster_k` (`stretch_keep`), then cluster
        (stretch) refinement."""
        wta = self.end_to_end_stage("wta")
        if self.stretch_keep:
            return [
                Stage(wta.name, (self,), wta.prepare, wta.loss, frozen=(self.stretch_head,)),
                Stage(
                    "stretch",
                    (self,),
                    prepare=wta.prepare,
                    loss=self.stretch_loss,
                    setup=self.fit_stretch,
                    keyed=True,
                ),
            ]
        if not self.cluster_k:
            return [self.end_to_end_stage()]
        return [
            Stage(
                wta.name, (self,), wta.prepare, wta.loss, frozen=(self.teacher, self.cluster_head)
            ),
            Stage(
                "cluster",
                (self,),
                prepare=wta.prepare,
                loss=self.cluster_loss,
                frozen=(self.teacher,),
                setup=self.fit_clusters,
            ),
        ]

    @torch.no_grad()
    def maxima(self, x: Tensor, layers: nn.ModuleList | None = None) -> Tensor:
        """(B, sum of channels): every layer's per-channel max over space, of the encoder
        or of `layers` (the cluster stage's teacher)."""
        return torch.cat([h.amax((2, 3)) for h in self.encode(x, layers=layers)], 1).float()

    def flipped_and_shifted(self, x: Tensor, shift: int) -> Tensor:
        """Half the batch mirrored, then all of it rolled by one random offset of up to
        `shift` px: the views the refinement heads learn from."""
        flip = torch.rand(len(x), device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if shift:
            dy, dx = torch.randint(-shift, shift + 1, (2,)).tolist()
            x = torch.roll(x, (dy, dx), (2, 3))
        return x

    @staticmethod
    def head_logits(deepest: Tensor, head: nn.Linear, mean: Tensor, scale: Tensor) -> Tensor:
        """float (B, classes): `head` over the deepest map's per-channel maxima,
        standardized by the last `channels` entries of `mean` and `scale`."""
        d = deepest.shape[1]
        standard = (deepest.amax((2, 3)).float() - mean[-d:]) / scale[-d:]
        return head(standard.to(head.weight.dtype)).float()

    def fit_clusters(self, next_batch: Callable[[], dict]) -> None:
        """Freeze the encoder as the teacher and fit k-means to its view of about
        `cluster_frames` training frames (split over the ranks)."""
        self.teacher.load_state_dict(self.layers.state_dict())
        self.teacher.eval()
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        maxima, seen = [], 0
        while seen * world < self.cluster_frames:
            batch = self.maxima(next_batch()["image"], self.teacher)
            maxima.append(batch)
            seen += len(batch)
        self.targets.fit(torch.cat(maxima), self.cluster_seed)

    def cluster_loss(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Metrics]:
        """Cross-entropy of the head on the deepest maxima of a flipped and shifted frame
        against the teacher's cluster of the frame as it is (clusters weighted by the
        inverse of their size), plus `cluster_recon` times the WTA reconstruction loss."""
        target = self.targets.assign(self.maxima(x, self.teacher))
        x = self.flipped_and_shifted(x, self.cluster_shift)
        out = self(x)
        logits = self.head_logits(
            out["z"], self.cluster_head, self.targets.mean, self.targets.scale
        )
        ce = F.cross_entropy(logits, target, weight=self.targets.weight)
        recon, metrics = self.loss(x, out)
        return ce + self.cluster_recon * recon, {**metrics, "cluster_ce": ce.detach()}

    @torch.no_grad()
    def fit_stretch(self, next_batch: Callable[[], dict]) -> None:
        """Label about `stretch_frames` training frames (split over the ranks) by what
        comes and goes in their clips, as the encoder sees them now."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        share = self.stretch.capacity // world
        maxima, ids, clips, frames, seen = [], [], [], [], 0
        while seen < share:
            batch = next_batch()
            x = batch["image"]
            maxima.append(self.maxima(x))
            clip, frame = clip_positions(batch["key"])
            ids.append(key_ids(batch["key"]))
            clips.append(clip)
            frames.append(frame)
            seen += len(x)
        device = maxima[0].device
        self.stretch.fit(
            torch.cat(maxima)[:share],
            *(torch.cat(part)[:share].to(device) for part in (ids, clips, frames)),
            self.stretch_keep,
            self.stretch_negatives,
        )

    def stretch_loss(self, x: Tensor, ids: Tensor) -> tuple[Tensor, Metrics]:
        """Cross-entropy of the head on the deepest maxima of a flipped and shifted frame
        against its frame's stretch label (classes weighted by the inverse of their size;
        unlabelled frames left out), plus `stretch_recon` times the WTA loss."""
        labels = self.stretch.lookup(ids)
        x = self.flipped_and_shifted(x, self.stretch_shift)
        out = self(x)
        logits = self.head_logits(
            out["z"], self.stretch_head, self.stretch.mean, self.stretch.scale
        )
        known = labels != UNLABELLED
        target = labels.clamp_min(0)
        weight = self.stretch.weight[target] * known
        per_frame = F.cross_entropy(logits, target, reduction="none")
        ce = (per_frame * weight).sum() / weight.sum().clamp_min(1e-6)  # 0 with none known
        recon, metrics = self.loss(x, out)
        extra = {"stretch_ce": ce.detach(), "labelled": known.float().mean()}
        return ce + self.stretch_recon * recon, {**metrics, **extra}

    def features(self, x: Tensor, cond: Tensor | None = None) -> dict[str, Tensor]:
        """`layer1`...`layerN`: every layer's dense ReLU map (nothing masked); with
        `stretch_keep` also `head`, (B, 1): the stretch head's one top unit (its
        "shown" logit minus its "not shown" logit), a linear unit over the deepest maxima."""
        maps = self.encode(x)
        features = {f"layer{i}": h for i, h in enumerate(maps, start=1)}
        if self.stretch_keep:
            features["head"] = self.stretch_unit(maps[-1])
        return features

    def stretch_unit(self, deepest: Tensor) -> Tensor:
        """(B, 1): the stretch head's "shown" minus "not shown" logit of a deepest map."""
        logits = self.head_logits(deepest, self.stretch_head, self.stretch.mean, self.stretch.scale)
        return logits[:, 1:] - logits[:, :1]

    def feature(self, x: Tensor, layer: str, cond: Tensor | None = None) -> Tensor:
        depth = layer_depth(layer, "layer", len(self.layers))
        return super().feature(x, layer) if depth is None else self.encode(x, depth)[-1]

    def filters(self) -> Tensor:
        """First convolution's kernels (out_channels, in_channels, k, k)."""
        return self.layers[0][0].weight.detach()
