"""Stacked fully connected autoencoders, trained greedily layer by layer, then end to end.

The recipe of Bengio et al. 2007 and Vincent et al. 2010, with the sparsity of the UFLDL
tutorial: layer k is an encoder/decoder pair trained to reconstruct its own input (the
frozen code of layers < k), optionally from a corrupted copy of it (denoising) and with
a penalty that keeps its hidden units mostly silent (sparse). Stacking the encoders gives
the deep code; an optional last stage fine-tunes all layers on the image reconstruction.

Images (B, C, H, W) are flattened inside; `input_shape` says what they are, so that
`recon` comes back in the input's shape and `filters()` can show the first layer's rows
as images. Decoders are affine (a "linear decoder" in UFLDL's terms), so the targets may
be normalized pixels of any sign. The loss is the mean squared error (see
`pretrain/losses.py` for the normalization of every term).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.losses import SparseDenoising, l2_penalty
from pretrain.models import register
from pretrain.models.base import Autoencoder, Metrics, Stage, detached_metrics, layer_depth
from pretrain.models.blocks import activation


class DenseAutoencoderLayer(nn.Module):
    """One encoder/decoder pair: h = act(W x + b), x_hat = W' h + c, with W' = W^T if tied."""

    def __init__(self, in_features: int, out_features: int, act: str, tied: bool) -> None:
        super().__init__()
        self.encoder = nn.Linear(in_features, out_features)
        self.act = activation(act)
        self.tied = tied
        if tied:
            self.decoder_bias = nn.Parameter(torch.zeros(in_features))
        else:
            self.decoder = nn.Linear(out_features, in_features)

    def encode(self, x: Tensor) -> Tensor:
        return self.act(self.encoder(x))

    def decode(self, h: Tensor) -> Tensor:
        if self.tied:
            return F.linear(h, self.encoder.weight.t(), self.decoder_bias)
        return self.decoder(h)

    def weights(self) -> list[Tensor]:
        """The matrices weight decay applies to (biases are not decayed)."""
        return [self.encoder.weight] if self.tied else [self.encoder.weight, self.decoder.weight]


@register("stacked_ae")
class StackedAutoencoder(Autoencoder):
    """A stack of `len(hidden)` dense autoencoder layers over flattened `input_shape` images.

    Options: `activation` of the hidden units (`sigmoid` for KL sparsity); `tied` decoder
    weights; sparsity by `l1` and/or `sparsity_target` (rho) with `sparsity_weight` (beta);
    denoising by `mask_prob` and/or `noise_std`; `weight_decay` (lambda: lambda/2 ||W||^2
    in the loss, as in UFLDL, rather than in the optimizer, so it stays part of the
    model's objective whatever the optimizer). `greedy` gives one stage per layer,
    `fine_tune` a last end-to-end stage; with both off there is nothing to train.
    """

    def __init__(
        self,
        input_shape: list[int] | tuple[int, ...] = (1, 8, 8),
        hidden: list[int] | tuple[int, ...] = (64,),
        activation: str = "sigmoid",
        tied: bool = False,
        l1: float = 0.0,
        sparsity_target: float | None = None,
        sparsity_weight: float = 0.0,
        mask_prob: float = 0.0,
        noise_std: float = 0.0,
        weight_decay: float = 0.0,
        greedy: bool = True,
        fine_tune: bool = True,
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("stacked_ae needs at least one hidden layer size")
        if not (greedy or fine_tune):
            raise ValueError("stacked_ae with greedy=False and fine_tune=False has no stage")
        self.input_shape = tuple(input_shape)
        self.regularizer = SparseDenoising(
            l1, sparsity_target, sparsity_weight, mask_prob, noise_std, activation
        )
        self.weight_decay = weight_decay
        self.greedy, self.fine_tune = greedy, fine_tune
        sizes = [math.prod(self.input_shape), *hidden]
        self.layers = nn.ModuleList(
            DenseAutoencoderLayer(n_in, n_out, activation, tied)
            for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)
        )

    def _flatten(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"stacked_ae was built for inputs {list(self.input_shape)}, got {list(x.shape[1:])}"
            )
        return x.flatten(1)

    def encode(self, x: Tensor, depth: int | None = None) -> list[Tensor]:
        """The codes of the first `depth` layers (all by default), bottom first, for
        flattened inputs."""
        codes = []
        for layer in self.layers[:depth]:
            x = layer.encode(x)
            codes.append(x)
        return codes

    def forward(self, x: Tensor, cond: Tensor | None = None) -> dict[str, Tensor]:
        """Codes of every layer (`layer1`..., `z` = the top one) and `recon` in x's shape.

        In training mode the input is corrupted first (denoising fine-tuning).
        """
        flat = self._flatten(x)
        if self.training:
            flat = self.regularizer.corrupt(flat)
        codes = self.encode(flat)
        recon = codes[-1]
        for layer in reversed(self.layers):
            recon = layer.decode(recon)
        out = {f"layer{i}": h for i, h in enumerate(codes, start=1)}
        out["z"] = codes[-1]
        out["recon"] = recon.view_as(x)
        return out

    def loss(self, x: Tensor, out: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        codes = [out[f"layer{i}"] for i in range(1, len(self.layers) + 1)]
        weights = [w for layer in self.layers for w in layer.weights()]
        return self._objective(out["recon"], x, codes, weights)

    def _objective(
        self, recon: Tensor, target: Tensor, codes: list[Tensor], weights: list[Tensor]
    ) -> tuple[Tensor, Metrics]:
        """MSE + sparsity penalty on `codes` + weight decay on `weights`."""
        mse = F.mse_loss(recon.float(), target.float())
        sparsity, metrics = self.regularizer.penalty(codes)
        loss = mse + sparsity
        metrics["recon"] = mse.detach()
        if self.weight_decay > 0.0:
            decay = l2_penalty(weights)
            loss = loss + self.weight_decay * decay
            metrics["weight_decay"] = decay.detach()
        return loss, detached_metrics(metrics)

    def features(self, x: Tensor, cond: Tensor | None = None) -> dict[str, Tensor]:
        """`layer1`...`layerN`: the hidden code of every layer (no corruption)."""
        codes = self.encode(self._flatten(x))
        return {f"layer{i}": h for i, h in enumerate(codes, start=1)}

    def feature(self, x: Tensor, layer: str, cond: Tensor | None = None) -> Tensor:
        depth = layer_depth(layer, "layer", len(self.layers))
        if depth is None:
            return super().feature(x, layer)
        return self.encode(self._flatten(x), depth)[-1]

    def stages(self) -> list[Stage]:
        stages = [self._layer_stage(k) for k in range(len(self.layers))] if self.greedy else []
        if self.fine_tune:
            stages.append(self.end_to_end_stage("fine_tune"))
        return stages

    def _layer_stage(self, k: int) -> Stage:
        """Layer k (0-based) reconstructs the frozen code of layers < k from a corrupted copy."""
        layer = self.layers[k]

        def prepare(x: Tensor) -> Tensor:
            h = self._flatten(x)
            for below in self.layers[:k]:
                h = below.encode(h)
            return h

        def loss(h: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Metrics]:
            noisy = self.regularizer.corrupt(h) if layer.training else h
            code = layer.encode(noisy)
            return self._objective(layer.decode(code), h, [code], layer.weights())

        return Stage(
            name=f"layer{k + 1}",
            trainable=(layer,),
            prepare=prepare,
            loss=loss,
            frozen=tuple(self.layers[:k]),
        )

    def filters(self) -> Tensor:
        """Rows of the first encoder matrix as images (hidden, C, H, W)."""
        weight = self.layers[0].encoder.weight.detach()
        return weight.view(weight.shape[0], *self.input_shape)
