"""`catneuron probe` end to end: real exports, real datasets, real caches and event files.

Exports are written in the test with `pretrain.export.write_export` (the trainer's own
writer) from small models built or trained in-process; the cat-face test trains through
the real launcher (`catneuron train`, marked slow). Figures asserted are stated beside
each test with what was measured (2-core VM shared with other agents).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cluster_support import free_port
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from evals.probe import main as probe_main
from pretrain import build_model
from pretrain.export import export_dir, write_export

REPO = Path(__file__).resolve().parents[1]
PRE16 = {"resize": 16, "crop": 16, "grayscale": False, "mean": [0.5], "std": [0.25]}
DIGITS = "sklearn:digits?size=16"
FAST = [
    "--epochs", "10", "--kmeans-init", "2", "--seeds", "0", "--label-fractions", "0.1,1",
]  # fmt: skip


def write_conv_export(run: Path, step: int, side: int = 16) -> Path:
    """A small conv_ae (2 blocks, side x side inputs) with weights drawn from seed `step`."""
    torch.manual_seed(step)
    model = build_model("conv_ae", channels=[4, 8], greedy=False)
    return write_export(
        model.state_dict(), model.spec, export_dir(run, step),
        stage=0, step=step, config_hash="test", preprocess={**PRE16, "resize": side, "crop": side},
    )  # fmt: skip


def scalar_events(run: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return (
        [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []
    )


def cache_state(cache: Path) -> dict[str, int]:
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*")}


# ----------------------------------------------------------------------------- one export


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """One probe of one export on digits, run twice (the second from the cache)."""
    run = tmp_path_factory.mktemp("probe") / "run"
    export = write_conv_export(run, 10)
    argv = [str(export), "--data", DIGITS, "--test-fraction", "0.25", *FAST]
    assert probe_main(argv) == 0
    first = json.loads((run / "evals" / "probe-10" / "metrics.json").read_text())
    before = cache_state(run / "evals" / "cache")
    assert probe_main(argv) == 0
    second = json.loads((run / "evals" / "probe-10" / "metrics.json").read_text())
    return run, first, second, before


def test_report_holds_every_figure_baselines_and_protocol(probed):
    run, metrics, _, _ = probed
    assert set(metrics["sources"]) == {"export", "random_init", "pixels"}
    assert list(metrics["sources"]["export"]["layers"]) == ["block1", "block2"]
    assert list(metrics["sources"]["pixels"]["layers"]) == ["pixels"]
    pixels = metrics["sources"]["pixels"]["layers"]["pixels"]
    assert pixels["dim"] == 3 * 16 * 16  # raw pixels at the model's input size
    for source in metrics["sources"].values():
        for result in source["layers"].values():
            assert 0.0 <= result["probe"]["top1"] <= result["probe"]["top5"] <= 1.0
            assert 0.0 <= result["knn"]["top1"] <= 1.0
            assert -1.0 <= result["kmeans"]["ari"] <= 1.0 and 0 <= result["kmeans"]["nmi"] <= 1
    # Digits are easy: every probe is far above chance (measured 0.83-0.94 vs 0.10).
    assert metrics["chance"]["top1"] == pytest.approx(0.1, abs=0.02)
    assert pixels["probe"]["top1"] > 0.85
    assert metrics["headline"]["top1"] > 0.6
    data = metrics["data"]
    assert data["n_train"] + data["n_test"] == 1797 and len(data["classes"]) == 10
    protocol = metrics["protocol"]
    assert protocol["knn"] == {"k": 20, "temperature": 0.07, "metric": "cosine"}
    assert protocol["preprocess"] == PRE16 and protocol["seeds"] == [0]
    curve = metrics["label_fraction"]["curves"]
    assert set(curve) == {"export", "random_init", "pixels"} and set(curve["export"]) == {
        "0.1",
        "1",
    }
    # More labels, better probe (measured 0.91 -> 0.96 for raw pixels).
    assert curve["pixels"]["1"]["mean"] > curve["pixels"]["0.1"]["mean"]
    png = run / "evals" / "probe-10" / "label_fraction.png"
    assert Image.open(png).size[0] >= 400
    assert not list((run / "evals").glob(".*"))  # no temporary left behind


def test_curve_png_without_matplotlib(probed, tmp_path, monkeypatch):
    from evals.probes.report import plot_label_fractions

    _, metrics, _, _ = probed
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    plot_label_fractions(tmp_path / "plain.png", metrics)
    image = np.asarray(Image.open(tmp_path / "plain.png").convert("RGB"))
    assert image.shape == (440, 640, 3)
    blue = (np.abs(image.astype(int) - (31, 119, 180)).sum(2) < 30).sum()
    assert blue > 100  # the export's curve is drawn


def test_scalars_land_in_the_runs_tensorboard_at_the_export_step(probed):
    run, metrics, _, _ = probed
    for tag in (
        "eval/probe/block1/top1", "eval/probe/block2/random_init_top1", "eval/knn/block2/top1",
        "eval/kmeans/block1/nmi", "eval/probe/pixels/top1", "eval/probe/chance/top1",
    ):  # fmt: skip
        events = scalar_events(run, tag)
        assert events and {step for step, _ in events} == {10}, tag
    (step, value), *_ = scalar_events(run, "eval/probe/block1/top1")
    assert value == pytest.approx(metrics["sources"]["export"]["layers"]["block1"]["probe"]["top1"])


def test_second_run_extracts_nothing(probed):
    run, first, second, before = probed
    for name in ("export", "random_init", "pixels"):
        assert first["sources"][name]["cache"]["extracted"] is True
        assert second["sources"][name]["cache"]["extracted"] is False
        assert second["sources"][name]["cache"] == {
            **first["sources"][name]["cache"],
            "extracted": False,
        }
    assert cache_state(run / "evals" / "cache") == before  # not a file written or touched
    keys = first["sources"]["export"]["cache"]["data"]
    assert all((run / "evals" / "cache" / key / "index.json").is_file() for key in keys.values())
    assert second["headline"] == first["headline"]


def test_lbfgs_solver_and_layer_choice(tmp_path):
    run = tmp_path / "run"
    write_conv_export(run, 5, side=8)  # 8 px: L-BFGS on 192 raw-pixel dims, not 768
    argv = [str(run), "--data", "sklearn:digits?size=8", "--layers", "block2", "--solver", "lbfgs"]
    argv += FAST
    assert probe_main([*argv, "--out", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    block2 = metrics["sources"]["export"]["layers"]["block2"]["probe"]
    assert list(metrics["sources"]["export"]["layers"]) == ["block2"]
    assert block2["solver"] == "lbfgs" and block2["setting"]["C"] in (
        1e-4,
        1e-3,
        1e-2,
        0.1,
        1,
        10,
        100,
    )
    assert block2["top1"] > 0.5  # measured 0.76 (random 4-8 channel conv at 8 px)
    assert metrics["sources"]["pixels"]["layers"]["pixels"]["probe"]["top1"] > 0.9


def test_train_and_test_image_folders_with_an_unreadable_file(tmp_path, capsys):
    run = tmp_path / "run"
    write_conv_export(run, 3)
    train = _image_folder(tmp_path / "train", ["cat", "dog"], n=6)
    test = _image_folder(tmp_path / "test", ["cat", "dog"], n=3)
    (train / "dog" / "broken.png").write_bytes(b"not a png")
    argv = [str(run), "--train", str(train), "--test", str(test), *FAST]
    assert probe_main(argv) == 0
    assert "skipped 1 of 13 unreadable" in capsys.readouterr().err
    metrics = json.loads((run / "evals" / "probe-3" / "metrics.json").read_text())
    data = metrics["data"]
    assert (data["n_train"], data["n_test"], data["skipped_unreadable"]) == (12, 6, 1)
    assert data["classes"] == ["cat", "dog"] and set(data["fingerprints"]) == {"train", "test"}
    assert set(metrics["sources"]["export"]["cache"]) == {"train", "test", "extracted"}
    assert metrics["sources"]["export"]["layers"]["block1"]["knn"]["k"] == 12  # capped at the bank


# ----------------------------------------------------------------------------- --watch


def test_watch_evaluates_each_of_three_exports_once_across_a_restart(tmp_path, capsys):
    run = tmp_path / "run"
    write_conv_export(run, 10)
    write_conv_export(run, 20)
    (run / "exports" / ".step_30.tmp-1").mkdir()  # an export being written: not yet seen
    argv = ["--watch", str(run), "--data", DIGITS, *FAST, "--idle-exit", "0", "--poll", "0"]
    assert probe_main(argv) == 0
    assert sorted(p.name for p in (run / "evals").glob("probe-*")) == ["probe-10", "probe-20"]
    stamps = {
        s: (run / "evals" / f"probe-{s}" / "metrics.json").stat().st_mtime_ns for s in (10, 20)
    }
    write_conv_export(run, 30)  # training went on while the watch was stopped
    assert probe_main(argv) == 0  # the restart
    out = capsys.readouterr().out
    assert out.count("-> ") == 3  # three evaluations in all
    for step, stamp in stamps.items():
        assert (run / "evals" / f"probe-{step}" / "metrics.json").stat().st_mtime_ns == stamp
    events = scalar_events(run, "eval/probe/block1/top1")
    assert sorted(step for step, _ in events) == [10, 20, 30]  # once each, in TensorBoard too
    assert probe_main(argv) == 0 and "-> " not in capsys.readouterr().out  # nothing left


# ----------------------------------------------------------------------------- greedy pretraining


def test_greedy_pretrained_stacked_ae_fine_tunes_better_than_random_init(tmp_path):
    """The seed's claim: greedy layer-wise pretraining helps when labels are few.

    stacked_ae 64-256-64 (sigmoid, denoising mask 0.25), greedy stages of 150 Adam steps
    each then 150 end to end, on the unlabeled digits training split; then fine-tuning
    (encoder lr 1e-3, head 1e-2, 100 steps) with 10% of the labels (135 images), from the
    export and from random init, 3 seeds. Measured: 0.922 (0.918, 0.916, 0.933) against
    0.907 (0.911, 0.898, 0.911), +1.6 points; asserted: at least +0.5 points on the mean.
    """
    from evals.features.datasets import split_indices
    from evals.features.extractor import from_export, random_init
    from evals.features.sources import open_dataset
    from evals.probes.finetune import finetune, load_images
    from evals.probes.linear import stratified_fraction

    pre = {"resize": 8, "crop": 8, "grayscale": True, "mean": [0.5], "std": [0.25]}
    dataset = open_dataset("sklearn:digits?size=8")
    x, y = load_images(dataset, pre)
    train, test = split_indices(dataset.labels, 0.25, 0)
    torch.manual_seed(0)
    model = build_model("stacked_ae", input_shape=[1, 8, 8], hidden=[256, 64], mask_prob=0.25)
    generator = torch.Generator().manual_seed(0)
    for stage in model.stages():  # what the trainer does per stage, on one process
        optimizer = torch.optim.Adam(stage.parameters(), lr=3e-3)
        for _ in range(150):
            batch = x[train][torch.randint(len(train), (64,), generator=generator)]
            for module in stage.frozen:
                module.eval()
            with torch.no_grad():
                inputs = stage.prepare(batch)
            for module in stage.trainable:
                module.train()
            loss, _ = stage.loss(inputs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    export = write_export(
        model.state_dict(), model.spec, tmp_path / "step_450", stage=2, step=450,
        config_hash="test", preprocess=pre,
    )  # fmt: skip
    pretrained = from_export(export)
    scratch = random_init(pretrained, seed=0)
    scores = {"pretrained": [], "random": []}
    for seed in range(3):
        rows = train[stratified_fraction(dataset.labels[train], 0.1, seed)]
        assert len(rows) == pytest.approx(135, abs=3)
        for name, source in (("pretrained", pretrained), ("random", scratch)):
            result = finetune(source, x[rows], y[rows], x[test], y[test], 10, steps=100, seed=seed)
            scores[name].append(result["top1"])
    margin = np.mean(scores["pretrained"]) - np.mean(scores["random"])
    print(f"digits 10% labels: pretrained {scores['pretrained']} random {scores['random']}")
    assert margin >= 0.005, scores
    assert min(scores["random"]) > 0.8  # the baseline is a working classifier, not broken


# ----------------------------------------------------------------------------- bad input


def _one_line_exit_2(argv, capsys) -> str:
    assert probe_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("catneuron probe: ") and "\n" not in err and "Traceback" not in err
    return err


def _image_folder(root: Path, classes: list[str], n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def export(tmp_path) -> Path:
    return write_conv_export(tmp_path / "run", 7)


def test_missing_and_corrupt_exports(tmp_path, export, capsys):
    data = ["--data", DIGITS]
    err = _one_line_exit_2([str(tmp_path / "nowhere"), *data], capsys)
    assert "nowhere: no such file or directory" in err
    broken = tmp_path / "run" / "exports" / "step_8"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((export / "model.safetensors").read_bytes())
    err = _one_line_exit_2([str(broken), *data], capsys)
    assert "model.json" in err
    truncated = write_conv_export(tmp_path / "run", 9)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    err = _one_line_exit_2([str(truncated), *data], capsys)
    assert "model.safetensors" in err
    header = struct.pack("<Q", 10**9)  # a header length past the end of the file
    weights.write_bytes(header + b"{}")
    assert "model.safetensors" in _one_line_exit_2([str(truncated), *data], capsys)
    assert not (tmp_path / "run" / "evals").exists()  # nothing written for a bad input


def test_unknown_layer_lists_the_valid_ones(export, capsys):
    err = _one_line_exit_2([str(export), "--data", DIGITS, "--layers", "block1,block9"], capsys)
    assert "block9" in err and "block1, block2" in err
    assert not list((export.parent.parent / "evals").glob("probe-*"))


def test_bad_datasets(tmp_path, export, capsys):
    one = _image_folder(tmp_path / "one", ["only"])
    err = _one_line_exit_2([str(export), "--data", str(one)], capsys)
    assert "one class" in err
    a = _image_folder(tmp_path / "a", ["cat", "dog"])
    b = _image_folder(tmp_path / "b", ["cat", "fox"])
    err = _one_line_exit_2([str(export), "--train", str(a), "--test", str(b)], capsys)
    assert str(b) in err and "differ" in err
    unreadable = tmp_path / "bad"
    for name in ("x", "y"):
        (unreadable / name).mkdir(parents=True)
        (unreadable / name / "0.png").write_bytes(b"not a png")
    err = _one_line_exit_2([str(export), "--data", str(unreadable)], capsys)
    assert str(unreadable) in err and "readable" in err
    err = _one_line_exit_2([str(export), "--data", "synth:nosuch"], capsys)
    assert "synth:nosuch" in err
    assert not (export.parent.parent / "evals").exists()


def test_shards_without_labels(tmp_path, export, capsys):
    import io

    import webdataset as wds

    shards = tmp_path / "unlabeled"
    shards.mkdir()
    with wds.TarWriter(str(shards / "frames-000000.tar")) as sink:
        for i in range(4):
            buffer = io.BytesIO()
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(buffer, format="JPEG")
            sink.write({"__key__": f"{i:016x}_{i:07d}", "jpg": buffer.getvalue(), "json": {}})
    err = _one_line_exit_2([str(export), "--data", str(shards)], capsys)
    assert str(shards) in err and "no labels" in err


def test_command_line_through_the_console_script(tmp_path, export):
    """`python -m catneuron probe` answers a usage error in one line, exit 2."""
    done = subprocess.run(
        [sys.executable, "-m", "catneuron", "probe", str(export)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "catneuron probe: --train/--test: give both, or --data with --test-fraction"
    ]


# ----------------------------------------------------------------------------- the real trainer


@pytest.mark.slow
def test_probe_of_a_briefly_pretrained_conv_ae_on_synth_cat(shards, tmp_path):
    """configs/tiny/conv_ae.yaml trained 200 steps through `catneuron train` (the DeepSpeed
    launcher, one CPU rank) on the session's synth shards, then probed on 600 synth:cat
    stills (never frames training saw; 450 train / 150 test).

    Measured (same recipe, a separate run on this VM): export block1 0.673, block2 0.640;
    random init 0.753 / 0.727; raw pixels 0.647; chance 0.500 (in this test's own run:
    export 0.707 and, another time, 0.720 on the layer chosen on validation, against random
    init 0.753 / 0.727, pixels 0.647; trainings do not end at identical weights). At this scale the briefly
    pretrained conv_ae does NOT beat its random-init twin (random conv features are a
    strong baseline; PITFALLS "Evals"), so what is asserted is what holds: the probe
    reads the cat well above chance (+0.1), and random init is reported beside it.
    """
    config = yaml.safe_load((REPO / "configs" / "tiny" / "conv_ae.yaml").read_text())
    config["data"]["source"] = str(shards)
    config["run"].update(output_dir=str(tmp_path / "runs"), name="conv_ae")
    config["stages"]["steps"] = 200
    config["checkpoint"]["every"] = 200
    path = tmp_path / "conv_ae.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "catneuron", "train", str(path), "--num-gpus", "1",
         "--master-port", str(free_port())],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "runs" / "conv_ae"
    argv = [str(run), "--data", "synth:cat", "--test-fraction", "0.25", "--epochs", "50",
            "--seeds", "0", "--label-fractions", "0.1,1", "--kmeans-init", "3"]  # fmt: skip
    assert probe_main(argv) == 0
    metrics = json.loads((run / "evals" / "probe-200" / "metrics.json").read_text())
    head = metrics["headline"]
    print("synth:cat", json.dumps(head))
    assert metrics["data"]["n_train"] == 450 and metrics["data"]["n_test"] == 150
    assert head["chance_top1"] == pytest.approx(0.5, abs=0.01)
    assert head["top1"] > head["chance_top1"] + 0.1
    assert head["random_init_top1"] > head["chance_top1"] + 0.1


@pytest.mark.slow
def test_ray_extraction_gives_the_same_report_on_one_cluster(tmp_path, capsys):
    """--num-workers 2: one local Ray cluster for all three sources, and the same figures
    as a single-process extraction into another cache."""
    run = tmp_path / "run"
    write_conv_export(run, 4)
    argv = [str(run), "--data", DIGITS, "--epochs", "10", "--seeds", "0",
            "--label-fractions", "1", "--kmeans-init", "2"]  # fmt: skip
    assert probe_main([*argv, "--out", str(tmp_path / "one"), "--cache", str(tmp_path / "c1")]) == 0
    capsys.readouterr()
    two = [*argv, "--out", str(tmp_path / "two"), "--cache", str(tmp_path / "c2")]
    assert probe_main([*two, "--num-workers", "2"]) == 0
    assert capsys.readouterr().err.count("ray: local cluster") == 1
    one_metrics, two_metrics = (
        json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two")
    )
    assert two_metrics["headline"] == one_metrics["headline"]
    for name in ("export", "random_init", "pixels"):  # same cache keys, same figures
        assert two_metrics["sources"][name] == one_metrics["sources"][name]
    assert two_metrics["label_fraction"] == one_metrics["label_fraction"]
