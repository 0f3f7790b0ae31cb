"""local_sparse (Le et al. 2012): untied filters against a loop reference, pooling and LCN
by hand, greedy stages, overfitting, bf16, and the size figures its docstring states."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.models import build_model
from pretrain.models.local_sparse import LocalSparseBlock, footprint

# Three blocks on 32x32: 32 -> 14 -> 11 -> 9 units per side.
SMALL = dict(input_size=32, receptive_field=[6, 4, 3], stride=[2, 1, 1])


def block(**overrides) -> LocalSparseBlock:
    args = dict(
        in_channels=2, in_size=7, maps=3, field=3, stride=2, pool_size=3, lcn_size=3,
        sparsity_weight=0.1, eps=0.01,
    )  # fmt: skip
    return LocalSparseBlock(**{**args, **overrides})


def test_untied_filters_and_decoder_match_a_loop_over_locations():
    torch.manual_seed(0)
    lc = block()
    x = torch.randn(2, 2, 7, 7)
    h = lc.encode(x)
    f, s, n = 3, 2, lc.out_size
    expected_h = torch.empty(2, 3, n, n)
    expected_recon = torch.zeros(2, 2, 7, 7)
    for i in range(n):
        for j in range(n):
            location = i * n + j  # each location has its own weights
            rows, cols = slice(i * s, i * s + f), slice(j * s, j * s + f)
            patch = x[:, :, rows, cols].reshape(2, -1)
            expected_h[:, :, i, j] = patch @ lc.encode_weight[location].t()
            decoded = h[:, :, i, j] @ lc.decode_weight[location].t()
            expected_recon[:, :, rows, cols] += decoded.view(2, 2, f, f)
    torch.testing.assert_close(h, expected_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lc.decode(h), expected_recon, rtol=1e-5, atol=1e-5)


def test_l2_pooling_over_the_neighbourhood_by_hand():
    lc = block(maps=1, pool_size=3)
    h = torch.zeros(1, 1, 5, 5)
    h[0, 0, 2, 2], h[0, 0, 0, 0] = 3.0, 4.0
    pooled = lc.pool(h)
    assert pooled[0, 0, 1, 1].item() == pytest.approx(math.sqrt(0.01 + 9 + 16))  # sees both
    assert pooled[0, 0, 3, 3].item() == pytest.approx(math.sqrt(0.01 + 9))
    assert pooled[0, 0, 4, 0].item() == pytest.approx(math.sqrt(0.01))  # sees neither


def test_contrast_normalization_ignores_offset_and_gain():
    torch.manual_seed(0)
    lc = block(lcn_size=5)
    pooled = torch.rand(2, 3, 9, 9) + 0.5
    normalized = lc.normalize(pooled)
    torch.testing.assert_close(lc.normalize(7.0 * pooled + 3.0), normalized, rtol=1e-4, atol=1e-4)
    assert normalized.abs().max() > 0.5  # not a trivial zero map
    assert lc.normalize(torch.full((1, 3, 9, 9), 2.0)).abs().max() < 1e-4  # flat: nothing left


def test_greedy_stage_changes_only_its_own_block():
    torch.manual_seed(0)
    model = build_model("local_sparse", **SMALL)
    x = torch.randn(4, 3, 32, 32)
    for k, stage in enumerate(model.stages()):
        before = [[p.clone() for p in b.parameters()] for b in model.blocks]
        optimizer = torch.optim.SGD(stage.parameters(), lr=1e-3)
        with torch.no_grad():
            prepared = stage.prepare(x)
        loss, _ = stage.loss(prepared)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for i, (b, old) in enumerate(zip(model.blocks, before, strict=True)):
            changed = any(not torch.equal(p, q) for p, q in zip(b.parameters(), old, strict=True))
            assert changed == (i == k), (stage.name, i)
        assert len(stage.frozen) == k


def test_each_greedy_stage_overfits_one_batch():
    """Each block's loss falls by 90% within 100 Adam steps (about 1 s for all three)."""
    torch.manual_seed(0)
    model = build_model("local_sparse", **SMALL)
    x = F.interpolate(torch.randn(4, 3, 8, 8), size=32, mode="bilinear")
    x = x / x.std()
    for stage in model.stages():
        optimizer = torch.optim.Adam(stage.parameters(), lr=1e-2)
        with torch.no_grad():
            prepared = stage.prepare(x)
        losses = []
        for _ in range(100):
            loss, _ = stage.loss(prepared)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < 0.1 * losses[0], (stage.name, losses[0], losses[-1])


def test_forward_features_and_filters():
    torch.manual_seed(0)
    model = build_model("local_sparse", **SMALL)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    loss, metrics = model.loss(x, out)
    stage_losses = [s.loss(s.prepare(x))[0] for s in model.stages()]
    torch.testing.assert_close(loss, sum(stage_losses))  # the sum of the greedy objectives
    assert out["recon"].shape == x.shape
    assert metrics["recon"] == metrics["block1_recon"] > 0
    features = model.features(x)
    for i, side in enumerate((14, 11, 9), start=1):
        assert features[f"block{i}_pooled"].shape == (2, 8, side, side)
        assert (features[f"block{i}_pooled"] >= math.sqrt(0.01) - 1e-6).all()
        torch.testing.assert_close(features[f"block{i}"], out[f"block{i}"])
    assert model.filters().shape == (8, 3, 6, 6)


def test_bf16_forward_on_cpu_is_finite():
    torch.manual_seed(0)
    model = build_model("local_sparse", **SMALL).bfloat16()
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    loss, metrics = model.loss(x, model(x))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(math.isfinite(v) for v in metrics.values())


def test_parameter_counts_by_hand_and_at_paper_scale():
    # 64 px, 6x6 fields at stride 2, 8 maps: 30x30, 13x13 and 4x4 locations,
    # each with W1 and W2 of maps x patch (patch 3*36, then 8*36 twice).
    expected = 2 * 8 * (30 * 30 * 108 + 13 * 13 * 288 + 4 * 4 * 288)
    model = build_model("local_sparse")
    assert sum(p.numel() for p in model.parameters()) == expected == footprint()["params"]
    paper = footprint(input_size=200, receptive_field=18, stride=1)
    # 200 -> 183 -> 166 -> 149 locations per side
    assert paper["params"] == 2 * 8 * (183**2 * 972 + 166**2 * 2592 + 149**2 * 2592)


def test_wrong_input_size_is_one_clear_error():
    model = build_model("local_sparse", **SMALL)
    with pytest.raises(ValueError, match=r"built for inputs \(3, 32, 32\), got \(3, 64, 64\)"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="receptive field 18 is larger"):
        build_model("local_sparse", input_size=32, receptive_field=18)
