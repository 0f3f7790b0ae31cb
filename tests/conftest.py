"""Shared test setup: keep every test on CPU and on one intra-op thread.

Small convolutions and the untied layers of local_sparse (hundreds of tiny matmuls) split
over 2 threads on a loaded 2-core machine mostly wait for each other: measured 10-25x
slower than with 1 thread (vqvae2 overfit: 40 s against 3 s).
"""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """One shard set for the session, by the real pipeline: `catneuron synth` + `catneuron shard`.

    8 synthetic clips sampled at 10 fps into 64x64 frames, about 250 frames in 40-frame shards.
    """
    from data_pipeline import shard
    from data_pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("frames")
    synthesize(root / "videos", 8, seed=0)
    argv = [
        str(root / "videos"),
        "--out",
        str(root / "out"),
        "--fps",
        "10",
        "--size",
        "64",
        "--crop",
        "center",
    ]
    assert shard.main([*argv, "--shard-max-count", "40", "--num-workers", "2"]) == 0
    return root / "out"
