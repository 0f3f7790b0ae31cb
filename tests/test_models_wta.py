"""wta_conv_ae: the two sparsities hold exactly, loss falls, features stay dense, and the
trained deepest layer carries the cat better than the same network with random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.models import build_model
from pretrain.models.wta_conv_ae import (
    channel_winners,
    contrast,
    lifetime_winners,
    spatial_winners,
)


def test_spatial_sparsity_keeps_one_winner_per_map() -> None:
    h = torch.rand(6, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    s = spatial_winners(h)
    assert ((s > 0).flatten(2).sum(2) == 1).all()
    assert torch.equal(s.flatten(2).amax(2), h.flatten(2).amax(2))


@pytest.mark.parametrize("k, batch, keep", [(0.05, 100, 5), (0.25, 8, 2), (0.01, 8, 1)])
def test_lifetime_sparsity_keeps_the_k_share_of_the_batch(k: float, batch: int, keep: int) -> None:
    h = spatial_winners(torch.rand(batch, 7, 4, 4, generator=torch.Generator().manual_seed(1)))
    s = lifetime_winners(h, k)
    firing = (s.flatten(2).amax(2) > 0).sum(0)  # per channel, how many samples keep a winner
    assert (firing == keep).all()
    # the survivors are the largest winners of each channel
    peaks = h.flatten(2).amax(2)
    assert torch.equal(s.flatten(2).amax(2).amax(0), peaks.amax(0))


def test_channel_sparsity_keeps_the_k_strongest_channels_of_each_sample() -> None:
    h = spatial_winners(torch.rand(5, 9, 4, 4, generator=torch.Generator().manual_seed(3)))
    s = channel_winners(h, 3)
    assert ((s.flatten(2).amax(2) > 0).sum(1) == 3).all()
    peaks = h.flatten(2).amax(2)
    kept = s.flatten(2).amax(2)
    # every kept winner beats every dropped one of its sample
    for b in range(5):
        assert kept[b][kept[b] > 0].min() > peaks[b][kept[b] == 0].max()
    model = build_model(
        "wta_conv_ae", in_channels=1, channels=[4, 8], strides=[2, 2], lifetime_k=1.0, channel_k=2
    )
    code = model.train()(torch.randn(6, 1, 16, 16))["code"]
    assert ((code.flatten(2).amax(2) > 0).sum(1) <= 2).all()


def test_highpass_target_is_the_detail_of_the_input() -> None:
    model = build_model("wta_conv_ae", in_channels=1, channels=[4], strides=[2], highpass=5)
    flat = torch.full((2, 1, 16, 16), 0.7)
    assert torch.allclose(model.target(flat), torch.zeros_like(flat), atol=1e-6)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    detail = model.target(x)
    assert abs(float(detail.mean())) < 0.1 and float(detail.std()) > 0.5
    assert torch.equal(build_model("wta_conv_ae", in_channels=1).target(x), x)
    with pytest.raises(ValueError, match="odd side"):
        build_model("wta_conv_ae", highpass=4)


def test_training_masks_the_code_and_evaluation_does_not() -> None:
    model = build_model(
        "wta_conv_ae", in_channels=1, channels=[4, 8], strides=[2, 2], lifetime_k=0.5
    )
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    out = model.train()(x)
    assert out["recon"].shape == x.shape
    assert ((out["code"] > 0).flatten(2).sum(2) <= 1).all()
    assert ((out["code"].flatten(2).amax(2) > 0).sum(0) <= 4).all()
    model.eval()
    assert torch.equal(model.features(x)["layer2"], model(x)["code"])


def test_contrast_ranking_prefers_a_lone_peak_to_a_higher_peak_on_a_lit_map() -> None:
    """Frame 0: the channel is lit everywhere (a texture) with a peak of 1.2; frame 1: dark
    but for one 0.9 (a face). Keeping one frame of two, the peak ranking keeps frame 0 and
    the contrast ranking (1.2 / 1.0 against 0.9 / 0.06) keeps frame 1."""
    dense = torch.zeros(2, 1, 4, 4)
    dense[0] += 1.0
    dense[0, 0, 1, 2] = 1.2
    dense[1, 0, 3, 0] = 0.9
    winners = spatial_winners(dense)
    by_peak = lifetime_winners(winners, 0.5).flatten(1).amax(1)
    by_contrast = lifetime_winners(winners, 0.5, contrast(winners, dense)).flatten(1).amax(1)
    assert by_peak.tolist() == pytest.approx([1.2, 0.0])
    assert by_contrast.tolist() == pytest.approx([0.0, 0.9])
    model = build_model(
        "wta_conv_ae", in_channels=1, channels=[4, 8], strides=[2, 2], lifetime_k=0.5,
        lifetime_rank="contrast",
    )  # fmt: skip
    out = model.train()(torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(2)))
    assert ((out["code"].flatten(2).amax(2) > 0).sum(0) <= 4).all()


def test_bad_options_are_refused_with_a_message() -> None:
    with pytest.raises(ValueError, match="lifetime_rank"):
        build_model("wta_conv_ae", lifetime_rank="mean")
    with pytest.raises(ValueError, match="lifetime_k"):
        build_model("wta_conv_ae", lifetime_k=0.0)
    with pytest.raises(ValueError, match="one stride per layer"):
        build_model("wta_conv_ae", channels=[4, 8], strides=[2])
    with pytest.raises(ValueError, match="divisible by 4"):
        build_model("wta_conv_ae", channels=[4, 8], strides=[2, 2])(torch.zeros(1, 3, 10, 10))


@pytest.mark.slow
def test_loss_falls_and_the_deepest_layer_beats_random_weights_on_cats() -> None:
    """A reduced run of the demo's recipe (eyed clutter, 64 px gray, channel_k 8, high-pass
    target, fixed seeds, 200 steps): the trained deepest layer's best unit beats the same
    layer with random weights by a margin (measured here: held-out 0.780 / AUROC 0.816
    against 0.553 / 0.613; 400 steps gave 0.820 / 0.898 in twice the time)."""
    from catneuron.ablation import best_units, to_input, train_in_process
    from catneuron.ablation_runs import RECIPE
    from data_pipeline.synth import render_still

    torch.manual_seed(0)

    def stills(n: int, base: int, every: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % every == 0
        images = np.stack(
            [
                render_still(64, 64, base + i, cat=bool(c), eyed_clutter=True)[0]
                for i, c in enumerate(labels)
            ]
        )
        return images, labels

    train, _ = stills(1500, 2**41, 3)
    test, labels = stills(300, 2**42, 2)
    x, xt = to_input(train, True), to_input(test, True)
    kwargs = RECIPE  # the demo's model less its stretch stage (tests/test_demo.py)
    torch.manual_seed(10_000)
    random_model = build_model("wta_conv_ae", **kwargs)
    torch.manual_seed(0)
    model = build_model("wta_conv_ae", **kwargs)
    with torch.no_grad():
        first = float(model.loss(x[:64], model.train()(x[:64]))[0])
    (last,) = train_in_process(model, x, 200, 1e-3)
    assert last < 0.7 * first
    trained, random = best_units(model, xt, labels), best_units(random_model, xt, labels)
    print(trained["layers"]["layer3"], random["layers"]["layer3"])
    mine, theirs = trained["layers"]["layer3"], random["layers"]["layer3"]
    assert mine["auroc"] > theirs["auroc"] + 0.15
    assert mine["heldout"] > theirs["heldout"] + 0.15


def test_l2_pooling_answers_either_polarity() -> None:
    from pretrain.models.wta_conv_ae import L2Pool

    x = torch.randn(2, 6, 4, 4)
    pooled = L2Pool(2)(x)
    expected = (x[:, 0::2] ** 2 + x[:, 1::2] ** 2 + 1e-6).sqrt()
    assert pooled.shape == (2, 3, 4, 4) and torch.allclose(pooled, expected)
    assert torch.equal(L2Pool(2)(-x), pooled)
    model = build_model("wta_conv_ae", in_channels=1, channels=[4, 8], strides=[2, 2], l2_pool=2)
    assert model.layers[0][0].out_channels == 8 and model.layers[1][0].out_channels == 8
    maps = model.features(torch.randn(3, 1, 16, 16))
    assert maps["layer1"].shape == (3, 4, 8, 8) and maps["layer2"].shape == (3, 8, 4, 4)
    with pytest.raises(ValueError, match="l2_pool"):
        build_model("wta_conv_ae", l2_pool=0)
