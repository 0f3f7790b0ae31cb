"""vqvae2 and its EMA quantizer: hand-computed EMA, rank sync, dead codes, fp32 under bf16."""

from __future__ import annotations

import datetime
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.export import export_model, load_export
from pretrain.models import build_model
from pretrain.models.vqvae2 import VectorQuantizerEMA

SMALL = dict(channels=32, res_channels=8, n_res_blocks=1, embed_dim=8, num_codes=32)


def as_map(vectors: list[list[float]]) -> torch.Tensor:
    """(N, D) vectors -> the (1, D, 1, N) map the quantizer takes, keeping their order."""
    return torch.tensor(vectors).t()[None, :, None, :].contiguous()


def toy_quantizer(**kwargs) -> VectorQuantizerEMA:
    vq = VectorQuantizerEMA(3, 2, dead_threshold=0.0, **kwargs)
    vq.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    vq.embed_sum.copy_(vq.embed)
    return vq


def test_ema_update_matches_hand_computation():
    vq = toy_quantizer(decay=0.5, eps=0.1).train()
    z = as_map([[1.0, 0.0], [-1.0, 0.0], [9.0, 1.0], [11.0, -1.0]])
    _, codes, commit, stats = vq(z)

    assert codes.flatten().tolist() == [0, 0, 1, 1]
    # counts (2, 2, 0); cluster_size = 0.5 * 1 + 0.5 * counts
    torch.testing.assert_close(vq.cluster_size, torch.tensor([1.5, 1.5, 0.5]), rtol=0, atol=1e-6)
    # embed_sum = 0.5 * embed + 0.5 * (sum of members): code 1 gets 0.5*(10,0) + 0.5*(20,0)
    expected_sum = torch.tensor([[0.0, 0.0], [15.0, 0.0], [0.0, 5.0]])
    torch.testing.assert_close(vq.embed_sum, expected_sum, rtol=0, atol=1e-6)
    # n = 3.5, smoothed = (cluster_size + 0.1) / (3.5 + 3 * 0.1) * 3.5 = (5.6, 5.6, 2.1) / 3.8
    expected_embed = torch.tensor([[0.0, 0.0], [15 * 3.8 / 5.6, 0.0], [0.0, 5 * 3.8 / 2.1]])
    torch.testing.assert_close(vq.embed, expected_embed, rtol=1e-6, atol=1e-6)
    # commitment against the codebook before the update: squared errors 1, 1, 2, 2 over 8 entries
    assert commit.item() == pytest.approx(0.75, abs=1e-6)
    assert stats["perplexity"].item() == pytest.approx(2.0, abs=1e-5)
    assert stats["usage"].item() == pytest.approx(2 / 3)


def test_eval_mode_leaves_codebook_alone():
    vq = toy_quantizer().eval()
    before = vq.embed.clone()
    vq(as_map([[1.0, 0.0], [9.0, 1.0]]))
    assert torch.equal(vq.embed, before)
    assert torch.equal(vq.cluster_size, torch.ones(3))


def test_dead_code_is_restarted_from_batch_encodings():
    vq = VectorQuantizerEMA(4, 2, decay=0.4, dead_threshold=0.5).train()
    vq.embed.copy_(torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [100.0, 100.0]]))
    vq.embed_sum.copy_(vq.embed)
    vectors = [[0.1, 0.0], [5.0, 0.2], [0.0, 4.9], [0.2, 0.1]]
    vq(as_map(vectors))
    # code 3 got nothing: 0.4 * 1 < 0.5, so it now sits on one of the batch's encodings
    assert vq.cluster_size[3].item() == 1.0
    assert any(torch.equal(vq.embed[3], torch.tensor(v)) for v in vectors)
    assert torch.equal(vq.embed_sum[3], vq.embed[3])
    assert (vq.cluster_size[:3] >= 0.5).all()


def test_kmeans_init_finds_separated_clusters():
    torch.manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [6.0, 6.0], [-6.0, 6.0]])
    points = (centers.repeat_interleave(50, 0) + 0.1 * torch.randn(150, 2)).tolist()
    vq = VectorQuantizerEMA(3, 2, decay=0.0, kmeans_init=True).train()
    vq(as_map(points))
    found = sorted(vq.embed.tolist())
    torch.testing.assert_close(
        torch.tensor(found), torch.tensor(sorted(centers.tolist())), atol=0.05, rtol=0
    )
    assert bool(vq.initialized)


def test_straight_through_passes_gradients_to_encoder():
    vq = VectorQuantizerEMA(4, 3).train()
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    quantized, _, _, _ = vq(z)
    upstream = torch.randn_like(quantized)
    (quantized * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)  # identity gradient through the quantizer

    torch.manual_seed(0)
    model = build_model("vqvae2", **SMALL)
    out = model(torch.randn(2, 3, 32, 32))
    out["recon"].pow(2).mean().backward()  # reconstruction only: no commitment term
    assert model.encoders[0][0].weight.grad.abs().sum() > 0


def test_codebook_buffers_stay_fp32_under_dtype_casts():
    vq = VectorQuantizerEMA(16, 8)
    before = {name: buf.clone() for name, buf in vq.named_buffers()}
    for cast in (lambda m: m.bfloat16(), lambda m: m.half(), lambda m: m.to(torch.bfloat16)):
        cast(vq)
        for name, buf in vq.named_buffers():
            assert buf.dtype == before[name].dtype, name
            assert torch.equal(buf, before[name]), name  # not rounded through bf16


def test_bf16_forward_on_cpu_is_finite_and_updates_fp32_codebook():
    torch.manual_seed(0)
    model = build_model("vqvae2", **SMALL).bfloat16().train()
    embed_before = model.quantizers[0].embed.clone()
    out = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    loss, metrics = model.loss(torch.randn(2, 3, 32, 32), out)
    assert torch.isfinite(loss)
    assert out["recon"].dtype == torch.bfloat16
    for vq in model.quantizers:
        assert vq.embed.dtype == vq.cluster_size.dtype == vq.embed_sum.dtype == torch.float32
    assert not torch.equal(model.quantizers[0].embed, embed_before)
    assert {"recon", "commit", "vq/bottom_perplexity", "vq/top_usage"} <= set(metrics)


@pytest.mark.parametrize("levels,side", [(2, 32), (3, 64)])
def test_shapes_features_and_decoding_from_codes(levels, side):
    torch.manual_seed(0)
    model = build_model("vqvae2", levels=levels, **SMALL).eval()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        out = model(x)
        features = model.features(x)
        names = model.level_names
        recon = model.decode_codes({n: out[f"codes_{n}"] for n in names})
    assert out["recon"].shape == x.shape
    for i, name in enumerate(names):
        assert features[f"z_{name}"].shape == (2, 8, side // 2 ** (i + 2), side // 2 ** (i + 2))
        assert torch.equal(features[f"codes_{name}"], out[f"codes_{name}"])
    torch.testing.assert_close(recon, out["recon"])


def test_export_round_trip_keeps_codebooks(tmp_path):
    torch.manual_seed(0)
    model = build_model("vqvae2", kmeans_init=True, **SMALL).bfloat16().train()
    model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))  # k-means init and one EMA step
    export_model(model.float(), tmp_path / "step_1", stage=0, step=1, config_hash="test")
    loaded = load_export(tmp_path / "step_1")
    for ours, theirs in zip(model.quantizers, loaded.quantizers, strict=True):
        assert torch.equal(ours.embed, theirs.embed)
        assert bool(theirs.initialized)  # a reload does not run k-means again
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["recon"], model.eval()(x)["recon"])


def test_bad_input_side_is_one_clear_error():
    model = build_model("vqvae2", **SMALL)
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.randn(1, 3, 36, 36))


def test_overfits_one_batch():
    """Loss falls by 90% within 200 Adam steps on 4 fixed smooth 32x32 images (about 1 s)."""
    torch.manual_seed(0)
    model = build_model("vqvae2", **SMALL).train()
    coarse = torch.randn(4, 3, 8, 8)  # 32 codes cannot memorize white noise; images have structure
    x = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear")
    x = x / x.std()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        loss, _ = model.loss(x, model(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_batches(rank: int) -> list[torch.Tensor]:
    """Different data per rank: rank r's encodings sit around (3r, -3r)."""
    generator = torch.Generator().manual_seed(100 + rank)
    return [
        torch.randn(2, 4, 4, 4, generator=generator)
        + 3 * rank * torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 4, 1, 1)
        for _ in range(3)
    ]


def quantizer_after_updates(batches: list[torch.Tensor]) -> VectorQuantizerEMA:
    torch.manual_seed(0)  # same initial codebook and draws on every rank
    vq = VectorQuantizerEMA(16, 4, decay=0.8, dead_threshold=0.9, kmeans_init=True).train()
    for z in batches:
        vq(z)
    return vq


def _sync_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        vq = quantizer_after_updates(rank_batches(rank))
        torch.save(dict(vq.named_buffers()), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_keep_identical_codebooks(tmp_path):
    mp.spawn(_sync_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in ("embed", "cluster_size", "embed_sum"):
        assert torch.equal(rank0[name], rank1[name]), name
    alone = quantizer_after_updates(rank_batches(0))
    assert not torch.allclose(alone.embed, rank0["embed"])  # rank 1's data reached rank 0
