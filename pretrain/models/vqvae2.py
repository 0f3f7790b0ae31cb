"""Hierarchical VQ-VAE-2 (Razavi et al. 2019) with EMA codebooks that stay in sync across ranks.

Levels, bottom first: the bottom encoder maps the image to 1/4 of its side, each further
level halves that again (2 levels: 1/4 and 1/8; 3 levels: 1/4, 1/8, 1/16). Quantization
runs top-down: a level's codes are chosen from its own encoding concatenated with a
decoding of the level above, so the bottom codes spend their capacity on what the top
codes could not say. The decoder sees every level's quantized map upsampled to the bottom
resolution, which is why `decode_codes` needs nothing but the codes.

The codebooks are not parameters: they follow an exponential moving average of the
encodings assigned to them (van den Oord et al. 2017, appendix). Two traps decide whether
that works at scale (PITFALLS.md, "VQ-VAE"): DeepSpeed never synchronizes buffers, so the
per-batch counts and sums are all-reduced before every update; and codebook arithmetic in
bf16 collapses usage, so the quantizer keeps its buffers and its distances in fp32 even
after `module.bfloat16()`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.models import register
from pretrain.models.base import Autoencoder, Metrics, detached_metrics

LEVEL_NAMES = {2: ("bottom", "top"), 3: ("bottom", "middle", "top")}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizerEMA(nn.Module):
    """Nearest-code quantizer whose codebook is an EMA of the encodings it is assigned.

    Buffers (all float32 whatever the module's dtype):
    `embed` (K, D) the codebook; `cluster_size` (K) the EMA count of encodings per code;
    `embed_sum` (K, D) the EMA sum of those encodings. After each training batch
    `embed = embed_sum / smoothed(cluster_size)`, with Laplace smoothing
    `(n_k + eps) / (n + K eps) * n` so that a code with no members does not divide by zero.
    The counts start at one (with `embed_sum = embed`) so an unused code keeps its vector
    instead of decaying towards the origin.

    A code whose EMA count falls below `dead_threshold` is dead: it is restarted at a random
    encoding of the current batch. With `kmeans_init` the first training batch sets the
    codebook by k-means. Restart candidates and k-means come from rank 0, and every
    collective depends only on synced state, so all ranks call the same ones.

    A training forward never waits for the GPU (no `.item()`, no boolean-mask indexing,
    no `bincount`, whose CUDA kernel reads its maximum back to size the output): restart
    candidates for every code ride in the one all-reduce of counts and sums, and dead
    codes take them through `torch.where`. Only the k-means initialization reads the
    `initialized` buffer back, once per module: a Python-side flag remembers the answer
    until a state dict is loaded.
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_threshold: float = 1.0,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.num_codes, self.dim = num_codes, dim
        self.decay, self.eps = decay, eps
        self.dead_threshold = dead_threshold
        self.kmeans_iters = kmeans_iters
        embed = torch.randn(num_codes, dim)
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        # Whether `initialized` is known to be True, so the forward need not read it back.
        self._known_initialized = False

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> VectorQuantizerEMA:
        """Let device moves through but refuse dtype casts of the codebook buffers.

        DeepSpeed's bf16 mode calls `module.bfloat16()`; rounding the EMA sums to 8 bits of
        mantissa would stall them (0.99 * x rounds back to x). The buffers are taken out
        before the cast and only moved, so their fp32 values survive exactly.
        """
        kept = dict(self._buffers)
        self._buffers.clear()
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in kept.items():
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        """A loaded state may hold another `initialized`: read it again at the next forward."""
        super()._load_from_state_dict(*args, **kwargs)
        self._known_initialized = False

    def _needs_init(self) -> bool:
        """One host read of `initialized` per module (and per loaded state), not per forward."""
        if not self._known_initialized:
            self._known_initialized = bool(self.initialized)
        return not self._known_initialized

    def lookup(self, codes: Tensor) -> Tensor:
        """Codes (B, H, W) -> code vectors (B, D, H, W) in fp32."""
        return F.embedding(codes, self.embed).permute(0, 3, 1, 2)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """Quantize `z` (B, D, H, W).

        Returns the straight-through quantized map (in `z`'s dtype), the codes (B, H, W),
        the commitment loss ||z - sg(q)||^2 (mean, fp32) and the batch's `perplexity` and
        `usage` (fraction of codes used; over all ranks when training distributed).
        """
        if z.shape[1] != self.dim:
            raise ValueError(f"quantizer expects {self.dim} channels, got {z.shape[1]}")
        b, _, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim).float()
            if self.training and self._needs_init():
                self._kmeans_init(flat.detach())
            codes = self._nearest(flat.detach())
            quantized = F.embedding(codes, self.embed)  # the codebook before this batch's update
            counts = _count(codes, self.num_codes, flat.dtype)
            if self.training:
                counts = self._ema_update(flat.detach(), codes, counts)
            commit = F.mse_loss(flat, quantized)
            straight_through = flat + (quantized - flat).detach()
            probs = counts / counts.sum().clamp_min(1.0)
            stats = {
                "perplexity": torch.exp(-(probs * torch.log(probs + 1e-10)).sum()),
                "usage": (counts > 0).float().mean(),
            }
        out = straight_through.view(b, h, w, self.dim).permute(0, 3, 1, 2).to(z.dtype)
        return out, codes.view(b, h, w), commit, stats

    def _nearest(self, flat: Tensor) -> Tensor:
        distances = (
            flat.pow(2).sum(1, keepdim=True)
            - 2 * flat @ self.embed.t()
            + self.embed.pow(2).sum(1).unsqueeze(0)
        )
        return distances.argmin(1)

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, codes: Tensor, counts: Tensor) -> Tensor:
        """One EMA step from this batch (summed over ranks); returns the global counts.

        Restart candidates (one random encoding per code) travel in the same all-reduce:
        rank 0 adds its own, the others zeros, so the sum is rank 0's exactly."""
        sums = torch.zeros_like(self.embed).index_add_(0, codes, flat)
        picks = torch.randint(flat.shape[0], (self.num_codes,), device=flat.device)
        candidates = flat[picks]
        distributed = _distributed()
        if distributed and dist.get_rank() != 0:
            candidates = torch.zeros_like(candidates)
        stats = torch.cat([counts.unsqueeze(1), sums, candidates], dim=1)
        if distributed:
            dist.all_reduce(stats)  # one collective for counts, sums and restart candidates
        counts, sums = stats[:, 0], stats[:, 1 : 1 + self.dim]
        candidates = stats[:, 1 + self.dim :]
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
        self.embed.copy_(self.embed_sum / smoothed.unsqueeze(1))
        self._restart_dead(candidates)
        return counts

    def _restart_dead(self, candidates: Tensor) -> None:
        """Codes whose EMA count fell below `dead_threshold` move to their candidate (K, D),
        with device-side selects: no count of dead codes is read back."""
        dead = self.cluster_size < self.dead_threshold
        self.embed.copy_(torch.where(dead.unsqueeze(1), candidates, self.embed))
        self.embed_sum.copy_(torch.where(dead.unsqueeze(1), candidates, self.embed_sum))
        self.cluster_size.masked_fill_(dead, 1.0)

    @torch.no_grad()
    def _kmeans_init(self, flat: Tensor) -> None:
        """k-means++ seeding, then Lloyd's iterations, on this batch's encodings (rank 0's);
        every rank then takes rank 0's centers."""
        centers = self._kmeans_plus_plus(flat)
        for _ in range(self.kmeans_iters):
            codes = torch.cdist(flat, centers).argmin(1)
            counts = _count(codes, self.num_codes, flat.dtype)
            sums = torch.zeros_like(centers).index_add_(0, codes, flat)
            filled = counts > 0  # an empty cluster keeps its center
            centers[filled] = sums[filled] / counts[filled].unsqueeze(1)
        centers = _from_rank0(centers)
        self.embed.copy_(centers)
        self.embed_sum.copy_(centers)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)
        self._known_initialized = True

    def _kmeans_plus_plus(self, flat: Tensor) -> Tensor:
        """Seeds drawn with probability proportional to the squared distance to the nearest
        seed so far: Lloyd's iterations cannot separate two seeds that start in one cluster."""
        centers = flat.new_empty(self.num_codes, self.dim)
        centers[0] = flat[torch.randint(flat.shape[0], (1,), device=flat.device)]
        nearest = (flat - centers[0]).pow(2).sum(1)
        for k in range(1, self.num_codes):
            weights = nearest if nearest.sum() > 0 else torch.ones_like(nearest)
            centers[k] = flat[torch.multinomial(weights, 1)]
            nearest = torch.minimum(nearest, (flat - centers[k]).pow(2).sum(1))
        return centers


def _count(codes: Tensor, num_codes: int, dtype: torch.dtype) -> Tensor:
    """Members per code, like `bincount(minlength=num_codes)` but without its host read
    of `codes.max()` on CUDA (exact: counts stay far below 2^24)."""
    ones = torch.ones_like(codes, dtype=dtype)
    return torch.zeros(num_codes, dtype=dtype, device=codes.device).index_add_(0, codes, ones)


def _from_rank0(t: Tensor) -> Tensor:
    if _distributed():
        dist.broadcast(t, src=0)
    return t


class ResBlock(nn.Module):
    def __init__(self, channels: int, res_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, res_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(res_channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _encoder(in_ch: int, ch: int, n_res: int, res_ch: int, stride: int) -> nn.Sequential:
    """Downsample by `stride` (2 or 4) with 4x4 stride-2 convs, then residual blocks."""
    if stride == 4:
        head = [
            nn.Conv2d(in_ch, ch // 2, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(ch // 2, ch, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(ch, ch, 3, padding=1),
        ]
    else:
        head = [
            nn.Conv2d(in_ch, ch // 2, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(ch // 2, ch, 3, padding=1),
        ]
    return nn.Sequential(*head, *(ResBlock(ch, res_ch) for _ in range(n_res)), nn.ReLU())


def _decoder(
    in_ch: int, out_ch: int, ch: int, n_res: int, res_ch: int, stride: int
) -> nn.Sequential:
    """Mirror of `_encoder`: residual blocks, then upsample by `stride` with 4x4 transposed convs."""
    if stride == 4:
        tail = [
            nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(ch // 2, out_ch, 4, stride=2, padding=1),
        ]
    else:
        tail = [nn.ConvTranspose2d(ch, out_ch, 4, stride=2, padding=1)]
    body = (ResBlock(ch, res_ch) for _ in range(n_res))
    return nn.Sequential(nn.Conv2d(in_ch, ch, 3, padding=1), *body, nn.ReLU(), *tail)


def _upsampler(dim: int, factor_log2: int) -> nn.Sequential:
    """Bring a level's quantized map (1/2^k of the bottom side) to the bottom resolution."""
    layers: list[nn.Module] = []
    for i in range(factor_log2):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.ConvTranspose2d(dim, dim, 4, stride=2, padding=1))
    return nn.Sequential(*layers)


@register("vqvae2")
class VQVAE2(Autoencoder):
    """VQ-VAE-2 with `levels` (2 or 3) quantized levels; one end-to-end stage.

    Inputs must have sides divisible by 2^(levels + 1). The loss is the mean squared
    reconstruction error plus `commitment` x the commitment losses of all levels (the
    codebooks learn by EMA, not by gradient).
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 128,
        res_channels: int = 32,
        n_res_blocks: int = 2,
        embed_dim: int = 64,
        num_codes: int | list[int] = 512,
        levels: int = 2,
        commitment: float = 0.25,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_threshold: float = 1.0,
        kmeans_init: bool = False,
    ) -> None:
        super().__init__()
        if levels not in LEVEL_NAMES:
            raise ValueError(f"vqvae2 supports levels 2 or 3, got {levels}")
        codes_per_level = [num_codes] * levels if isinstance(num_codes, int) else list(num_codes)
        if len(codes_per_level) != levels:
            raise ValueError(f"num_codes has {len(codes_per_level)} entries for {levels} levels")
        self.level_names = LEVEL_NAMES[levels]
        self.commitment = commitment
        ch, res, n_res, dim = channels, res_channels, n_res_blocks, embed_dim
        self.encoders = nn.ModuleList(
            [_encoder(in_channels, ch, n_res, res, 4)]
            + [_encoder(ch, ch, n_res, res, 2) for _ in range(levels - 1)]
        )
        # Level i (below the top) quantizes its encoding together with a decoding of level i+1.
        self.pre_quant = nn.ModuleList(
            [nn.Conv2d(ch + dim, dim, 1) for _ in range(levels - 1)] + [nn.Conv2d(ch, dim, 1)]
        )
        self.context_decoders = nn.ModuleList(
            _decoder(dim, dim, ch, n_res, res, 2) for _ in range(levels - 1)
        )
        self.quantizers = nn.ModuleList(
            VectorQuantizerEMA(k, dim, decay, eps, dead_threshold, kmeans_init)
            for k in codes_per_level
        )
        self.upsamplers = nn.ModuleList(_upsampler(dim, i) for i in range(1, levels))
        self.decoder = _decoder(dim * levels, in_channels, ch, n_res, res, 4)

    def _check_input(self, x: Tensor) -> None:
        multiple = 2 ** (len(self.level_names) + 1)
        if x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(
                f"vqvae2 with {len(self.level_names)} levels needs image sides divisible by "
                f"{multiple}, got {tuple(x.shape[-2:])}"
            )

    def forward(self, x: Tensor, cond: Tensor | None = None) -> dict[str, Tensor]:
        self._check_input(x)
        encodings = []
        h = x
        for encoder in self.encoders:
            h = encoder(h)
            encodings.append(h)
        out: dict[str, Tensor] = {}
        quantized: list[Tensor] = [x] * len(encodings)  # placeholders, filled top-down
        commit = x.new_zeros((), dtype=torch.float32)
        context = None
        for i in reversed(range(len(encodings))):
            name = self.level_names[i]
            inp = encodings[i] if context is None else torch.cat([encodings[i], context], 1)
            z = self.pre_quant[i](inp)
            q, codes, level_commit, stats = self.quantizers[i](z)
            quantized[i] = q
            commit = commit + level_commit
            out[f"z_{name}"], out[f"codes_{name}"] = z, codes
            out[f"perplexity_{name}"], out[f"usage_{name}"] = stats["perplexity"], stats["usage"]
            if i > 0:
                context = self.context_decoders[i - 1](q)
        out["commit"] = commit
        out["recon"] = self._decode(quantized)
        return out

    def _decode(self, quantized: list[Tensor]) -> Tensor:
        upsampled = [up(q) for up, q in zip(self.upsamplers, quantized[1:], strict=True)]
        return self.decoder(torch.cat([quantized[0], *upsampled], 1))

    def decode_codes(self, codes: dict[str, Tensor]) -> Tensor:
        """Reconstruct from code indices, `{level name: (B, H, W) long}` as in `forward`'s `codes_*`."""
        missing = set(self.level_names) - set(codes)
        if missing:
            raise KeyError(f"decode_codes needs codes for levels {sorted(missing)}")
        dtype = self.decoder[0].weight.dtype
        quantized = [
            quantizer.lookup(codes[name]).to(dtype)
            for name, quantizer in zip(self.level_names, self.quantizers, strict=True)
        ]
        return self._decode(quantized)

    def loss(self, x: Tensor, out: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        recon = F.mse_loss(out["recon"].float(), x.float())
        loss = recon + self.commitment * out["commit"]
        metrics: dict[str, Tensor] = {"recon": recon, "commit": out["commit"]}
        for name in self.level_names:
            metrics[f"vq/{name}_perplexity"] = out[f"perplexity_{name}"]
            metrics[f"vq/{name}_usage"] = out[f"usage_{name}"]
        return loss, detached_metrics(metrics)

    def features(self, x: Tensor, cond: Tensor | None = None) -> dict[str, Tensor]:
        """Per level the pre-quantization encoding `z_<level>` and the codes `codes_<level>`.

        Call it in eval mode: in training mode every forward also updates the codebooks."""
        out = self(x)
        keys = [f"{kind}_{name}" for name in self.level_names for kind in ("z", "codes")]
        return {k: out[k] for k in keys}

    def filters(self) -> Tensor:
        return self.encoders[0][0].weight.detach()
