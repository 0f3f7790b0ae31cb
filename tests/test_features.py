"""Feature extraction: pooling values, the cache (hit, miss, rebuild), parts, layers, sources.

Models are tiny and random (an export written with `write_export`): what is tested is the
bookkeeping around `model.features`, against the model's own forward computed here.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from evals.features import extractor as F
from evals.features.datasets import split_indices
from evals.features.sources import open_dataset
from pretrain import ExportError, build_model
from pretrain.export import write_export

REPO = Path(__file__).resolve().parents[1]
PRE = {"resize": 16, "crop": 16, "grayscale": False, "mean": [0.5], "std": [0.25]}
DATA = "synth:shapes?n=10&size=20"


def make_export(root: Path, name="conv_ae", preprocess=PRE, seed=0, **kwargs) -> Path:
    kwargs = kwargs or {"channels": [4, 8], "greedy": False}
    torch.manual_seed(seed)
    model = build_model(name, **kwargs)
    return write_export(
        model.state_dict(),
        model.spec,
        root / "exports" / "step_7",
        stage=0,
        step=7,
        config_hash="test",
        preprocess=preprocess,
    )


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def dataset():
    return open_dataset(DATA)


def direct_features(source, dataset) -> dict[str, torch.Tensor]:
    """`model.features` on the whole set in one batch, the reference for the cache."""
    batch = next(dataset.batches(source.preprocess, len(dataset)))
    with torch.no_grad():
        return source.model.eval().features(batch["image"])


def test_pool_shapes_and_values():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4) % 7
    pooled = F.pool(x, grid=2)
    assert pooled.shape == (2, 3 * (2 + 4))
    a = x.numpy()
    assert np.allclose(pooled[:, 0:3], a.mean(axis=(2, 3)))
    assert np.allclose(pooled[:, 3:6], a.max(axis=(2, 3)))
    cells = a.reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5)).reshape(2, 12)  # (b, c, gi, gj)
    assert np.allclose(pooled[:, 6:], cells)
    odd = torch.randn(2, 3, 5, 6)  # sides the grid does not divide: adaptive pooling's cells
    expected = torch.nn.functional.adaptive_avg_pool2d(odd, 2).flatten(1)
    assert torch.allclose(F.pool(odd)[:, 6:], expected)
    even = torch.randn(2, 3, 8, 6)
    expected = torch.nn.functional.adaptive_avg_pool2d(even, 2).flatten(1)
    assert torch.allclose(F.pool(even)[:, 6:], expected, atol=1e-6)
    vector = torch.randn(5, 7)
    assert torch.equal(F.pool(vector), vector)
    codes = torch.randint(0, 9, (2, 4, 4))  # vqvae2 codes: (B, H, W) integers
    assert F.pool(codes).shape == (2, 6)


def test_unit_stats_argmax_and_vectors():
    x = torch.zeros(2, 3, 5, 6)
    x[0, 1, 3, 4] = 9.0
    x[1, 2, 0, 5] = 4.0
    x[1, 2, 4, 0] = 4.0  # a tie: the first in row-major order wins
    stats = F.unit_stats(x)
    assert stats["unit_argmax"].dtype == torch.int32
    assert stats["unit_argmax"][0, 1].tolist() == [3, 4] and stats["unit_argmax"][
        1, 2
    ].tolist() == [0, 5]
    assert stats["unit_max"][0, 1] == 9.0 and torch.isclose(
        stats["unit_mean"][0, 1], torch.tensor(9 / 30)
    )
    v = torch.randn(4, 3)
    vs = F.unit_stats(v)
    assert torch.equal(vs["unit_max"], v) and torch.equal(vs["unit_mean"], v)
    assert vs["unit_argmax"].shape == (4, 3, 2) and not vs["unit_argmax"].any()


def test_extract_equals_the_models_features_then_hits_the_cache(
    export, dataset, tmp_path, monkeypatch
):
    source = F.from_export(export)
    assert source.name == "export step_7" and source.preprocess == PRE
    feats = F.extract(source, dataset, cache_root=tmp_path / "cache", batch_size=4, progress=False)
    assert feats.extracted and feats.layers == ["block1", "block2"] and feats.keys == dataset.keys
    assert feats.labels.tolist() == dataset.labels.tolist() and feats.classes == dataset.classes
    ref = direct_features(source, dataset)
    for layer, act in ref.items():
        assert np.allclose(feats.pooled[layer], F.pool(act).numpy(), atol=1e-5)
        assert feats.pooled[layer].shape == (10, act.shape[1] * 6)
        assert np.allclose(feats.unit_max[layer], act.amax(dim=(2, 3)).numpy(), atol=1e-5)
        assert feats.unit_argmax[layer].shape == (10, act.shape[1], 2)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        feats.cache_keys.values()
    )

    def no_forward(*args, **kwargs):
        raise AssertionError("a cached extraction ran the model")

    monkeypatch.setattr(source.model, "features", no_forward)
    again = F.extract(source, dataset, cache_root=tmp_path / "cache", batch_size=8, progress=False)
    assert not again.extracted
    for layer in ref:
        assert np.array_equal(again.pooled[layer], feats.pooled[layer])
        assert np.array_equal(again.unit_argmax[layer], feats.unit_argmax[layer])


def corrupt_truncate(d: Path) -> None:
    path = d / "part-00000.pooled.npy"
    path.write_bytes(path.read_bytes()[:-8])


def corrupt_flip(d: Path) -> None:  # same size, other bytes: only the hash can tell
    path = d / "part-00000.unit_max.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def corrupt_index(d: Path) -> None:
    (d / "index.json").unlink()


def corrupt_weights(d: Path) -> None:  # an index written for other weights
    index = json.loads((d / "index.json").read_text())
    index["weights_hash"] = "0" * 64
    (d / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "corrupt", [corrupt_truncate, corrupt_flip, corrupt_index, corrupt_weights]
)
def test_a_damaged_cache_is_rebuilt_not_trusted(export, dataset, tmp_path, corrupt, capsys):
    source = F.from_export(export)
    cache = tmp_path / "cache"
    first = F.extract(source, dataset, layers=["block1"], cache_root=cache, progress=False)
    directory = cache / first.cache_keys["block1"]
    corrupt(directory)
    rebuilt = F.extract(source, dataset, layers=["block1"], cache_root=cache, progress=False)
    assert rebuilt.extracted and "cache does not match; rebuilding" in capsys.readouterr().err
    assert np.array_equal(rebuilt.pooled["block1"], first.pooled["block1"])
    assert np.array_equal(rebuilt.unit_max["block1"], first.unit_max["block1"])
    assert not F.extract(
        source, dataset, layers=["block1"], cache_root=cache, progress=False
    ).extracted
    assert [p.name for p in cache.iterdir()] == [directory.name]  # no build directory left
    from evals.features.cache import remove_stale_builds

    (cache / ".abc.build-killed").mkdir()
    remove_stale_builds(cache)
    assert (cache / ".abc.build-killed").exists()  # maybe still being written
    remove_stale_builds(cache, max_age_s=-1)
    assert [p.name for p in cache.iterdir()] == [directory.name]


def test_cache_keys_follow_weights_data_preprocessing_and_layer(export, dataset, tmp_path):
    source = F.from_export(export)
    other_pre = F.from_export(export, preprocess={**PRE, "mean": [0.4]})
    other_data = open_dataset("synth:shapes?n=10&size=20&seed=1")
    keys = {
        F.cache_key(source, dataset, "block1"),
        F.cache_key(source, dataset, "block2"),
        F.cache_key(other_pre, dataset, "block1"),
        F.cache_key(source, other_data, "block1"),
        F.cache_key(F.random_init(source, 0), dataset, "block1"),
    }
    assert len(keys) == 5


def test_only_missing_layers_are_extracted(export, dataset, tmp_path):
    source = F.from_export(export)
    cache = tmp_path / "cache"
    one = F.extract(source, dataset, layers=["block2"], cache_root=cache, progress=False)
    both = F.extract(source, dataset, cache_root=cache, progress=False)
    assert both.extracted and np.array_equal(both.pooled["block2"], one.pooled["block2"])
    assert not F.extract(
        source, dataset, layers=["block1"], cache_root=cache, progress=False
    ).extracted


def test_parts_merge_in_order_to_the_single_process_result(export, tmp_path, monkeypatch):
    """Three parts (run here in turn, as Ray would run them) == one part, bit for bit."""
    source = F.from_export(export)
    dataset = open_dataset("synth:shapes?n=11&size=20")
    single = F.extract(source, dataset, cache_root=tmp_path / "one", batch_size=4, progress=False)

    def sequential(func, num_parts, address=None, **kwargs):
        return [func(p, num_parts) for p in range(num_parts)]

    monkeypatch.setattr(F, "map_parts", sequential)
    parted = F.extract(
        source, dataset, cache_root=tmp_path / "three", batch_size=4, num_workers=3, progress=False
    )
    index = json.loads(
        (tmp_path / "three" / parted.cache_keys["block1"] / "index.json").read_text()
    )
    assert [p["rows"] for p in index["parts"]] == [3, 4, 4]
    assert parted.keys == single.keys
    for layer in single.layers:
        for kind in ("pooled", "unit_max", "unit_mean", "unit_argmax"):
            assert np.array_equal(getattr(parted, kind)[layer], getattr(single, kind)[layer])


def write_shards(out: Path, sizes: tuple[int, ...]) -> list[str]:
    """Labeled JPEG frame shards, no manifest (the loader counts the samples)."""
    out.mkdir(parents=True)
    rng, keys = np.random.default_rng(0), []
    for s, n in enumerate(sizes):
        with wds.TarWriter(str(out / f"f-{s:06d}.tar")) as sink:
            for i in range(n):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(
                    buffer, "JPEG"
                )
                keys.append(f"{s:016x}_{i:07d}")
                sink.write({"__key__": keys[-1], "jpg": buffer.getvalue(), "cls": str(i % 2)})
    return keys


def test_shards_with_padding_extract_every_sample_once(tmp_path, export):
    keys = write_shards(tmp_path / "s", (5, 2))
    dataset = open_dataset(str(tmp_path / "s"))
    source = F.from_export(export)
    rows = list(F.iter_activations(source, dataset, batch_size=4, progress=False))
    assert [k for r in rows for k in r["key"]] == keys  # 2 batches of 4: the padding is gone
    assert rows[0]["acts"]["block1"].dtype == torch.float32
    feats = F.extract(source, dataset, cache_root=tmp_path / "cache", batch_size=4, progress=False)
    assert feats.keys == keys and feats.labels.tolist() == dataset.labels.tolist()
    train, test = split_indices(feats.labels, 0.3, seed=0)
    part = feats.subset(test)
    assert part.keys == [keys[i] for i in test] and part.pooled["block1"].shape[0] == len(test)


def test_vector_layers_and_unknown_layer_names(tmp_path):
    pre = {"resize": 8, "crop": 8, "grayscale": True, "mean": [0.5], "std": [0.5]}
    path = make_export(
        tmp_path, "stacked_ae", preprocess=pre, input_shape=[1, 8, 8], hidden=[12, 6]
    )
    source = F.from_export(path)
    assert F.layer_names(source) == ["layer1", "layer2"]
    feats = F.extract(
        source, open_dataset("synth:cat?n=4&size=16"), cache_root=tmp_path / "c", progress=False
    )
    assert feats.pooled["layer2"].shape == (4, 6)
    assert np.array_equal(feats.pooled["layer2"], feats.unit_max["layer2"])
    raw = {**pre, "resize": None, "crop": None}
    uncropped = make_export(
        tmp_path / "raw", "stacked_ae", raw, input_shape=[1, 8, 8], hidden=[12, 6]
    )
    assert F.layer_names(F.from_export(uncropped)) == ["layer1", "layer2"]  # side from input_shape
    with pytest.raises(
        F.FeatureError, match=r"no layer 'conv9' in stacked_ae; layers: layer1, layer2"
    ):
        F.extract(
            source, open_dataset("synth:cat?n=4"), layers=["conv9"], cache_root=tmp_path / "c"
        )


def test_exports_without_preprocess_or_broken(tmp_path, dataset):
    old = make_export(tmp_path / "old", preprocess=None)
    with pytest.raises(F.FeatureError, match="no 'preprocess'.*re-export"):
        F.from_export(old)
    assert F.from_export(old, preprocess=PRE).preprocess == PRE
    with pytest.raises(ExportError, match="model.json: no such file"):
        F.from_export(tmp_path / "nowhere")
    broken = make_export(tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ExportError, match="model.safetensors"):
        F.from_export(broken)


def test_random_init_is_seeded_and_leaves_the_global_rng_alone(export):
    source = F.from_export(export)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = F.random_init(source, 0), F.random_init(source, 0), F.random_init(source, 1)
    assert torch.equal(torch.rand(1), expected_next)
    assert a.weights_hash == b.weights_hash != c.weights_hash != source.weights_hash
    assert a.name == "random-init seed 0" and a.preprocess == source.preprocess
    assert F.layer_names(a) == F.layer_names(source)
    from_spec = F.random_init(dict(source.spec), 0)
    assert from_spec.weights_hash == a.weights_hash


def test_raw_pixels_source(dataset, tmp_path):
    source = F.pixels(PRE)
    feats = F.extract(source, dataset, cache_root=tmp_path, batch_size=4, progress=False)
    batch = next(dataset.batches(PRE, len(dataset)))
    assert feats.layers == ["pixels"]
    assert np.array_equal(feats.pooled["pixels"], batch["image"].flatten(1).numpy())
    assert not F.extract(source, dataset, cache_root=tmp_path, progress=False).extracted


def test_part_writer_places_rows_arriving_in_any_order(tmp_path):
    from evals.features.cache import PartWriter

    writer = PartWriter(tmp_path, part=0, start=10, stop=14)
    for rows in ([2, 0], [1], [3]):
        values = {"pooled": np.array([[10.0 * r] for r in rows], dtype=np.float32)}
        writer.write(np.array(rows), [f"k{r}" for r in rows], np.array(rows), values)
    entry = writer.close()
    assert entry["rows"] == 4 and set(entry["files"]) == {"pooled", "labels", "keys"}
    assert np.load(tmp_path / "part-00000.pooled.npy").ravel().tolist() == [0, 10, 20, 30]
    assert json.loads((tmp_path / "part-00000.keys.json").read_text()) == ["k0", "k1", "k2", "k3"]
    short = PartWriter(tmp_path / "x", part=1, start=0, stop=2)
    short.write(np.array([0]), ["a"], np.array([0]), {})
    with pytest.raises(RuntimeError, match="1 of 2 rows never arrived"):
        short.close()


def test_map_parts_inline():
    assert F.map_parts(lambda p, n: (p, n), 1) == [(0, 1)]


@pytest.mark.slow
def test_two_ray_workers_on_a_two_node_cluster_equal_one_process(tmp_path, export):
    """Synthetic stills and padded shards (13 samples, batches of 4): 2 Ray parts == 1 process."""
    write_shards(tmp_path / "shards", (5, 4, 4))
    script = textwrap.dedent(
        f"""
        import json
        from pathlib import Path
        import numpy as np
        import ray
        from ray.cluster_utils import Cluster
        from evals.features import extractor as F
        from evals.features.sources import open_dataset

        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1, "include_dashboard": False}})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        print("nodes", sum(node["Alive"] for node in ray.nodes()))
        ray.shutdown()
        source = F.from_export("{export}")
        for spec in ("synth:shapes?n=13&size=20", "{tmp_path / "shards"}"):
            dataset = open_dataset(spec)
            single = F.extract(source, dataset, cache_root=Path("{tmp_path}/one"), batch_size=4,
                               progress=False)
            parted = F.extract(source, dataset, cache_root=Path("{tmp_path}/two"), batch_size=4,
                               num_workers=2, address=cluster.address, progress=False)
            index = json.loads((Path("{tmp_path}/two") / parted.cache_keys["block2"] / "index.json").read_text())
            same = parted.keys == single.keys and all(
                np.array_equal(getattr(parted, kind)[layer], getattr(single, kind)[layer])
                for layer in single.layers for kind in ("pooled", "unit_max", "unit_mean", "unit_argmax"))
            print("parts", [p["rows"] for p in index["parts"]], "same", same, parted.extracted)
        cluster.shutdown()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    expected = "nodes 2\nparts [6, 7] same True True\nparts [6, 7] same True True\n"
    assert expected in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
