"""Streaming top-K: exact against a brute-force sort, ties by key, whatever the split.

The fast tests feed `UnitStats` random activations rounded to a coarse grid (so many
values tie) in batches and parts of random sizes; the slow one runs `catneuron neurons`'
streaming pass over 3 shards with 2 Ray workers on a 2-node `ray.cluster_utils.Cluster`
and compares it with a brute-force sort of the same model's activations.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from evals.neurons.topk import (
    SKETCH_GAMMA,
    ChunkedStats,
    KeyIndex,
    UnitStats,
    brute_force_topk,
    order_keys,
    sketch_buckets,
)

REPO = Path(__file__).resolve().parents[1]


def random_case(seed: int, n: int = 257, units: int = 6):
    rng = np.random.default_rng(seed)
    values = (np.round(rng.normal(size=(n, units)) * 2) / 2).astype(np.float32)  # many ties
    values[:, 0] = 0.0  # one unit where every input ties
    keys = [f"{rng.integers(10**6):06d}_{i:07d}" for i in range(n)]
    rng.shuffle(keys)
    locs = rng.integers(0, 9, size=(n, units, 2)).astype(np.int32)
    return values, keys, locs


def stream(values, keys, locs, k, cuts, batch, index=None):
    """Parts cut at `cuts`, each reduced in batches of `batch`, merged in a shuffled order."""
    index = index or KeyIndex(keys)
    bounds = [0, *cuts, len(keys)]
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        state = UnitStats.empty(values.shape[1], k)
        for s in range(a, b, batch):
            e = min(b, s + batch)
            state.update(
                torch.from_numpy(values[s:e]),
                torch.from_numpy(index.ids(keys[s:e])),
                torch.from_numpy(locs[s:e]),
            )
        parts.append(state)
    order = np.random.default_rng(len(cuts)).permutation(len(parts))
    merged = parts[order[0]]
    for i in order[1:]:
        merged.merge(parts[i])
    return merged, index


def as_pairs(state, index):
    return [
        [
            (float(v), index.key(i))
            for v, i in zip(state.top_values[u].tolist(), state.top_ids[u].tolist(), strict=True)
        ]
        for u in range(state.units)
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_topk_equals_brute_force_for_any_split(seed):
    values, keys, locs = random_case(seed)
    k = 7
    reference = brute_force_topk(values, keys, k)
    where = {key: i for i, key in enumerate(keys)}
    rng = np.random.default_rng(seed + 100)
    for _ in range(4):
        cuts = sorted(
            rng.choice(np.arange(1, len(keys)), size=int(rng.integers(0, 4)), replace=False)
        )
        state, index = stream(values, keys, locs, k, list(cuts), int(rng.integers(1, 40)))
        assert as_pairs(state, index) == reference
        # the location travels with its entry
        for u in range(values.shape[1]):
            for j, sample in enumerate(state.top_ids[u].tolist()):
                assert state.top_locs[u, j].tolist() == locs[where[index.key(sample)], u].tolist()
    # the all-ties unit: exactly the k smallest keys
    assert [p[1] for p in reference[0]] == sorted(keys)[:k]


def test_chunked_updates_give_the_state_batch_updates_give():
    """`catneuron neurons` updates per chunk of batches: the state must be the very same."""
    values, keys, locs = random_case(3, n=301)
    index = KeyIndex(keys)
    by_batch, _ = stream(values, keys, locs, 5, [], 16, index)
    chunked = ChunkedStats(values.shape[1], 5, "cpu", chunk=100)
    for s in range(0, len(keys), 16):
        chunked.update(
            torch.from_numpy(values[s : s + 16]),
            torch.from_numpy(index.ids(keys[s : s + 16])),
            torch.from_numpy(locs[s : s + 16]),
        )
    state = chunked.flush()
    assert state.count == by_batch.count == 301
    for name in ("top_values", "top_ids", "top_locs", "minimum", "maximum", "active", "sketch"):
        assert torch.equal(getattr(state, name), getattr(by_batch, name)), name
    torch.testing.assert_close(state.total, by_batch.total, rtol=1e-12, atol=0)
    assert as_pairs(state, index) == brute_force_topk(values, keys, 5)


def test_order_keys_sort_like_value_then_key():
    values = torch.tensor([[0.5, 0.5, -0.0, 0.0, -1.5, -1.5, float("-inf"), 3.0]])
    ids = torch.tensor([[4, 2, 7, 1, 0, 9, 3, 5]])
    order = order_keys(values, ids)
    assert len(set(order[0].tolist())) == 8  # no two entries compare equal
    ranked = torch.argsort(order[0], descending=True).tolist()
    expected = sorted(range(8), key=lambda i: (-float(values[0, i]), int(ids[0, i])))
    assert ranked == expected


def test_fewer_inputs_than_k_and_statistics():
    values = torch.tensor([[1.0, -2.0, 0.0], [3.0, -1.0, 0.0]])
    state = UnitStats.empty(3, 5)
    state.update(values, torch.tensor([1, 0]))
    assert state.top_values[0, :2].tolist() == [3.0, 1.0]
    assert state.top_values[0, 2:].isinf().all()
    summary = state.summary()
    assert summary["mean"].tolist() == [2.0, -1.5, 0.0]
    assert summary["active_fraction"].tolist() == [1.0, 0.0, 0.0]
    assert summary["dead"].tolist() == [False, True, True]  # never active / constant


def test_sketch_quantiles_within_the_relative_error():
    rng = np.random.default_rng(0)
    values = rng.lognormal(0.0, 1.5, size=(5000, 2)).astype(np.float32)
    values[:, 1] *= -1
    state = UnitStats.empty(2, 3)
    for s in range(0, 5000, 512):
        state.update(torch.from_numpy(values[s : s + 512]), torch.arange(s, min(s + 512, 5000)))
    quantiles = state.quantiles([0.1, 0.5, 0.9])
    exact = np.quantile(values, [0.1, 0.5, 0.9], axis=0, method="inverted_cdf").T
    assert np.allclose(quantiles, exact, rtol=(SKETCH_GAMMA - 1) / 2 + 1e-3)
    assert sketch_buckets(torch.tensor([0.0, 1e-6, -1e-6])).tolist() == [600, 600, 600]
    assert int(state.sketch.sum()) == 10000  # every value counted once
    edges, counts = state.histogram(0, bins=10)
    assert counts.sum() == 5000 and len(edges) == 11


def test_memory_is_flat_in_the_number_of_inputs():
    state = UnitStats.empty(16, 4)
    sizes = []
    for s in range(0, 4000, 100):
        state.update(torch.randn(100, 16), torch.arange(s, s + 100))
        sizes.append(sum(t.numel() for t in (state.top_values, state.top_ids, state.sketch)))
    assert len(set(sizes)) == 1 and state.count == 4000


@pytest.mark.slow
def test_three_shards_two_ray_workers_on_a_two_node_cluster_equal_brute_force(tmp_path):
    script = textwrap.dedent(
        f"""
        import argparse, io, json
        from pathlib import Path
        import numpy as np, torch, ray, webdataset as wds
        from PIL import Image
        from ray.cluster_utils import Cluster
        from torch import nn
        from evals.features import extractor as F
        from evals.features.sources import open_dataset
        from evals.neurons.cli import stream
        from evals.neurons.topk import brute_force_topk

        class Coarse(nn.Module):
            # activations on a coarse grid: many ties between inputs
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.conv = nn.Conv2d(3, 5, 4, stride=4)
            def features(self, x, cond=None):
                h = torch.round(torch.relu(self.conv(x)) * 2) / 2
                return {{"map": h, "vec": torch.round(h.mean((2, 3)) * 4) / 4}}

        root = Path("{tmp_path}") / "shards"
        root.mkdir()
        rng = np.random.default_rng(0)
        for s, n in enumerate((11, 9, 13)):
            with wds.TarWriter(str(root / f"part-{{s:06d}}.tar")) as sink:
                for i in range(n):
                    pixels = (rng.integers(0, 4, (16, 16, 3)) * 85).astype(np.uint8)
                    buf = io.BytesIO(); Image.fromarray(pixels).save(buf, format="PNG")
                    sink.write({{"__key__": f"{{rng.integers(100):02d}}_{{s}}_{{i:03d}}", "jpg": buf.getvalue()}})
        pre = {{"resize": 16, "crop": 16, "grayscale": False, "mean": [0.5], "std": [0.25]}}
        source = F.FeatureSource(Coarse().eval(), pre, "coarse", "coarse")
        dataset = open_dataset(str(root), labeled=False)
        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1, "include_dashboard": False}})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        nodes = sum(node["Alive"] for node in ray.nodes())
        ray.shutdown()
        args = argparse.Namespace(top=6, reduce="max", batch_size=4, device="cpu", quiet=True,
                                  num_workers=2, address=cluster.address)
        stats, spatial, _ = stream(args, source, dataset, ["map", "vec"])
        cluster.shutdown()
        batch = {{}}
        keys, maxima, vec = [], [], []
        for b in dataset.batches(pre, 64):
            keep = b["valid"].nonzero().flatten().tolist()
            with torch.no_grad():
                feats = source.model.features(b["image"][keep])
            keys += [b["key"][i] for i in keep]
            maxima.append(F.unit_stats(feats["map"])["unit_max"]); vec.append(feats["vec"])
        ok = True
        for name, values in (("map", torch.cat(maxima)), ("vec", torch.cat(vec))):
            reference = brute_force_topk(values.numpy(), keys, 6)
            st = stats[name]
            got = [[(float(v), dataset.keys and sorted(dataset.keys)[i]) for v, i in
                    zip(st.top_values[u].tolist(), st.top_ids[u].tolist())] for u in range(st.units)]
            ok &= got == reference
            ties = sum(len(set(v for v, _ in row)) < len(row) for row in reference)
            print(name, "ties", ties > 0, "count", st.count)
        print("nodes", nodes, "len", len(dataset), "spatial", spatial["map"], "equal", ok)
        """
    )
    # a loaded machine starts raylets slowly: give them longer than Ray's 60 s default
    env = {**os.environ, "RAY_raylet_start_wait_time_s": "180"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=420,
        env=env,
    )
    out = done.stdout
    assert "nodes 2 len 33 spatial [4, 4] equal True" in out, out[-2000:] + done.stderr[-3000:]
    assert "map ties True count 33" in out and "vec ties True count 33" in out, out
