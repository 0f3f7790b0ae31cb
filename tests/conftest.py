"""Shared test setup: keep every test on CPU and on one intra-op thread.

Small convolutions and the untied layers of local_sparse (hundreds of tiny matmuls) split
over 2 threads on a loaded 2-core machine mostly wait for each other: measured 10-25x
slower than with 1 thread (vqvae2 overfit: 40 s against 3 s).
"""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
