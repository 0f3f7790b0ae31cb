"""Stretch labels (pretrain.models.stretch_targets): what comes and goes in a clip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.keys import clip_positions, key_ids, parse_key
from pretrain.models import build_model
from pretrain.models.stretch_targets import UNLABELLED, StretchTargets, best_stretch, stretch_labels


def clips_with_a_stretch(n_clips: int = 12, length: int = 16, shown: int = 4, seed: int = 0):
    """Features of `n_clips` clips; the first `shown` show something (feature 0 and 1 up by
    4) for one stretch, the rest only drift. Returns features, clip ids, frame indices, truth."""
    rng = np.random.default_rng(seed)
    features, clips, frames, truth = [], [], [], []
    for c in range(n_clips):
        drift = np.cumsum(rng.normal(0, 0.3, (length, 6)), 0)
        on = np.zeros(length, bool)
        if c < shown:
            start = int(rng.integers(0, length // 2))
            on[start : start + length // 3 + int(rng.integers(0, 3))] = True
        x = drift + rng.normal(0, 0.5, (length, 6))
        x[on, :2] += 4.0
        order = rng.permutation(length)  # frames arrive out of order, as a shuffled stream
        features.append(x[order])
        clips.append(np.full(length, 1000 + c))
        frames.append(3 * order)
        truth.append(on[order])
    return (np.concatenate(features), np.concatenate(clips), np.concatenate(frames),
            np.concatenate(truth))  # fmt: skip


def test_best_stretch_finds_the_planted_stretch() -> None:
    x = np.zeros((10, 2))
    x[3:7, 0] = 5.0
    share, start, end = best_stretch(x)
    assert (start, end) == (3, 7) and share == pytest.approx(1.0)


def test_clips_that_change_most_label_their_stretch_and_the_stillest_are_negatives() -> None:
    features, clips, frames, truth = clips_with_a_stretch()
    labels = stretch_labels(features, clips, frames, keep=0.25, negatives=0.25)
    shown = np.isin(clips, [1000, 1001, 1002, 1003])
    kept = shown & (labels != UNLABELLED)
    # 3 of 12 clips kept: all three among the four that show something, labelled exactly
    assert len(np.unique(clips[kept])) == 3
    assert np.array_equal(labels[kept] == 1, truth[kept])
    negatives = labels == 0
    negatives &= ~shown
    assert len(np.unique(clips[negatives])) == 3  # the 3 stillest clips, none of them shown
    assert not (shown & ~kept & (labels != UNLABELLED)).any()


def test_targets_look_frames_up_by_key_and_weigh_the_classes() -> None:
    features, clips, frames, truth = clips_with_a_stretch()
    keys = [f"{c:016x}_{f:07d}" for c, f in zip(clips, frames, strict=True)]
    clip, frame = clip_positions(keys)
    assert parse_key(keys[5]) == (f"{clips[5]:016x}", int(frames[5]))
    targets = StretchTargets(6, capacity=256)
    targets.fit(torch.tensor(features), key_ids(keys), clip, frame, 0.25, 0.25)
    looked_up = targets.lookup(key_ids(keys)).numpy()
    expected = stretch_labels(features, clip.numpy(), frame.numpy(), 0.25, 0.25)
    assert np.array_equal(looked_up, expected)
    assert targets.lookup(key_ids(["ffffffffffffffff_0000000"])).item() == UNLABELLED
    counts = np.bincount(expected[expected >= 0], minlength=2)
    assert torch.allclose(targets.weight, torch.tensor(counts.sum() / (2 * counts)).float())


def test_a_stage_with_no_clip_of_several_frames_is_refused() -> None:
    targets = StretchTargets(2, capacity=16)
    keys = [f"{i:016x}_0000000" for i in range(8)]  # eight clips of one frame each
    clip, frame = clip_positions(keys)
    with pytest.raises(ValueError, match="several frames"):
        targets.fit(torch.randn(8, 2), key_ids(keys), clip, frame, 0.25, 0.25)


def test_bad_keys_and_options_are_refused_with_a_message() -> None:
    with pytest.raises(ValueError, match="not <video_id>_<frame_index>"):
        parse_key("frame-without-index")
    with pytest.raises(ValueError, match="stretch refinement needs"):
        build_model("wta_conv_ae", stretch_keep=0.5, stretch_negatives=0.6)
    with pytest.raises(ValueError, match="without cluster_k"):
        build_model("wta_conv_ae", stretch_keep=0.25, cluster_k=4)


def test_the_stretch_stage_trains_the_encoder_and_head_on_looked_up_labels() -> None:
    torch.manual_seed(0)
    model = build_model("wta_conv_ae", in_channels=1, channels=[8, 16], strides=[2, 2],
                        lifetime_k=0.25, stretch_keep=0.25, stretch_frames=64)  # fmt: skip
    wta, stretch = model.stages()
    assert stretch.keyed and stretch.setup is not None and not wta.keyed
    head = {id(p) for p in model.stretch_head.parameters()}
    assert not head & {id(p) for p in wta.parameters()}
    assert head <= {id(p) for p in stretch.parameters()}
    # 8 clips of 8 frames; clips 0-1 show a bright square in frames 2-5
    x = 0.1 * torch.randn(64, 1, 32, 32)
    keys = [f"{c:016x}_{f:07d}" for c in range(8) for f in range(8)]
    for i in range(len(keys)):
        c, f = i // 8, i % 8
        if c < 2 and 2 <= f < 6:
            x[i, 0, 10:20, 10:20] = 3.0
    batches = iter([{"image": x[:32], "key": keys[:32]}, {"image": x[32:], "key": keys[32:]}])
    stretch.setup(lambda: next(batches))
    labels = model.stretch.lookup(key_ids(keys))
    shown = torch.tensor([i // 8 < 2 and 2 <= i % 8 < 6 for i in range(64)])
    assert torch.equal(labels[shown], torch.ones(int(shown.sum()), dtype=torch.int64))
    optimizer = torch.optim.Adam(stretch.parameters(), lr=2e-3)
    ids, losses = key_ids(keys), []
    for _ in range(40):
        loss, metrics = stretch.loss(x, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(metrics["stretch_ce"]))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
