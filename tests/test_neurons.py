"""`catneuron neurons` end to end on a unit wired by hand to detect a planted marker.

`MarkerNet` (registered as `test_marker`) is one 4x4 stride-4 convolution. Its unit 0 is
set by hand to a zero-mean checkerboard filter with a bias that only the planted marker
(a 4x4 black/white checkerboard on one cell of the 8x8 grid of 32x32 noise images)
overcomes; units 1-3 keep random weights. The checkerboard has the mean brightness of
the noise, so brightness alone does not give it away. Expected: the marked images and
only they are unit 0's top inputs (with the receptive field on the marker), it scores
~1.0 held-out and AUROC, its random-weights twin and the random units score near
chance, the optimal stimulus beats the best real input on the same sphere, and every
figure reaches metrics.json, report.html and TensorBoard.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from evals.neurons import cli as neurons
from evals.neurons.stimulus import optimal_stimulus, unit_values
from pretrain.export import write_export
from pretrain.models import Autoencoder, build_model, register

PRE = {"resize": 32, "crop": 32, "grayscale": False, "mean": [0.5], "std": [0.25]}
CHECKER = (np.indices((4, 4)).sum(0) % 2 * 255).astype(np.uint8)


@register("test_marker")
class MarkerNet(Autoencoder):
    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 4, stride=4)

    def forward(self, x, cond=None):
        return {"recon": x}

    def loss(self, x, out):
        return (out["recon"] - x).pow(2).mean(), {}

    def features(self, x, cond=None):
        h = torch.relu(self.conv(x))
        return {"cells": h, "pooled": h.amax(dim=(2, 3))}


def wired_export(root: Path) -> Path:
    torch.manual_seed(1)
    model = build_model("test_marker")
    with torch.no_grad():
        pattern = torch.from_numpy(CHECKER.astype(np.float32) / 127.5 - 1.0)  # +-1
        model.conv.weight[0] = pattern.expand(3, 4, 4)
        model.conv.bias[0] = -50.0  # the marker gives +96, noise cells rarely pass 25
    return write_export(
        model.state_dict(),
        model.spec,
        root / "exports" / "step_12",
        stage=0,
        step=12,
        config_hash="test",
        preprocess=PRE,
    )


def noise_image(rng: np.random.Generator, marked: bool) -> tuple[np.ndarray, tuple | None]:
    image = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    if not marked:
        return image, None
    r, c = (int(v) * 4 for v in rng.integers(0, 8, 2))
    image[r : r + 4, c : c + 4] = CHECKER[..., None]
    return image, (c, r, c + 4, r + 4)


def image_folder(root: Path, n_marked: int, n_plain: int, seed: int) -> dict[str, tuple]:
    rng = np.random.default_rng(seed)
    boxes = {}
    for cls, n in (("cat", n_marked), ("no_cat", n_plain)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            image, box = noise_image(rng, cls == "cat")
            name = f"{cls}/{seed}_{i:03d}.png"
            Image.fromarray(image).save(root / name)
            boxes[name] = box
    return boxes


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    root = tmp_path_factory.mktemp("neurons")
    export = wired_export(root / "run")
    data_boxes = image_folder(root / "data", 6, 18, seed=0)
    image_folder(root / "concept", 40, 40, seed=1)
    argv = [
        str(root / "run"),
        "--data",
        str(root / "data"),
        "--concept",
        str(root / "concept"),
        "--top",
        "6",
        "--stimulus-steps",
        "60",
        "--quiet",
    ]
    assert neurons.main(argv) == 0
    out = root / "run" / "evals" / "neurons-12"
    metrics = json.loads((out / "metrics.json").read_text())
    return {"root": root, "export": export, "out": out, "metrics": metrics, "boxes": data_boxes}


def test_the_marker_unit_finds_exactly_the_marked_images(analysed):
    layer = analysed["metrics"]["layers"]["cells"]
    marked = sorted(k for k, box in analysed["boxes"].items() if box is not None)
    assert sorted(layer["per_unit"]["top_keys"][0]) == marked
    # the receptive field at the unit's maximum is the marker's cell
    cell = next(c for c in layer["shown"] if c["unit"] == 0)
    assert [tuple(b) for b in cell["boxes"]] == [analysed["boxes"][k] for k in cell["keys"]]
    assert layer["map_size"] == [8, 8] and layer["units"] == 4
    # the vector layer has the same top inputs for unit 0, and no map
    pooled = analysed["metrics"]["layers"]["pooled"]
    assert sorted(pooled["per_unit"]["top_keys"][0]) == marked and pooled["map_size"] is None


def test_the_marker_unit_is_selective_and_random_units_are_not(analysed):
    metrics = analysed["metrics"]
    sel = metrics["layers"]["cells"]["selectivity"]
    scores = metrics["layers"]["cells"]["per_unit"]["selectivity"]
    assert sel["trained"]["best_unit"] == 0
    assert sel["trained"]["best_heldout"] >= 0.95 and sel["trained"]["best_auroc"] >= 0.98
    assert sel["trained"]["chance"] == 0.5
    assert max(scores["heldout"][1:]) < 0.8 and max(abs(a - 0.5) for a in scores["auroc"][1:]) < 0.3
    assert sel["random"]["best_heldout"] < 0.8
    assert sel["verdict"]["heldout"] == "above chance and above random weights"
    head = metrics["headline"]
    assert head["unit_index"] == 0 and head["heldout"] >= 0.95
    assert head["random_heldout"] < 0.8 and head["chance"] == 0.5
    # grouped units (--group-size 4 of the layer's 4 channels: one group of all of them)
    grouped = metrics["groups"]["layers"]["cells"]
    assert grouped["size"] == 4 and sorted(grouped["members"]) == [0, 1, 2, 3]
    assert grouped["members"][0] == grouped["unit"]
    assert 0.0 <= grouped["random_heldout"] <= 1.0 and metrics["groups"]["best"]["layer"] in (
        "cells",
        "pooled",
    )


def test_stimulus_beats_the_best_real_input_on_its_sphere(analysed):
    stimuli = {s["unit"]: s for s in analysed["metrics"]["layers"]["cells"]["stimuli"]}
    s = stimuli[0]
    assert s["activation"] > s["best_real_activation"] > 0
    assert abs(s["norm"] - s["radius"]) < 1e-3 * s["radius"]


def test_optimal_stimulus_directly_with_jitter(analysed):
    from pretrain import load_export

    model = load_export(analysed["export"])
    x = torch.randn(3, 3, 32, 32)
    radius = x.flatten(1).norm(dim=1)
    real = unit_values(model, "cells", x, torch.tensor([1, 2, 3]), "max")
    result = optimal_stimulus(
        model, "cells", [1, 2, 3], (3, 32, 32), radius, steps=40, jitter=2, seed=3
    )
    norms = result.images.flatten(1).norm(dim=1)
    assert torch.allclose(norms, radius, rtol=1e-4)
    assert (result.activation > real).all()
    assert (result.activation >= result.start_activation).all()


def test_outputs_report_and_tensorboard(analysed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = analysed["out"]
    assert {"metrics.json", "report.html", "grid_cells.png", "grid_pooled.png"} <= {
        p.name for p in out.iterdir()
    }
    page = (out / "report.html").read_text()
    assert page.count("class='unit'") >= 8 and "http" not in page.split("<style>")[0]
    assert "above chance and above random weights" in page
    members = analysed["metrics"]["groups"]["layers"]["cells"]["members"]
    assert "Grouped units" in page and ", ".join(f"#{m}" for m in members) in page
    events = EventAccumulator(str(analysed["root"] / "run" / "tb"), size_guidance={"images": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("eval/neurons/cells/best_heldout", "eval/neurons/cells/best_auroc"):
        assert tag in scalars and events.Scalars(tag)[0].step == 12
    assert events.Scalars("eval/neurons/cells/best_heldout")[0].value >= 0.95
    assert "eval/neurons/cells/top_inputs" in events.Tags()["images"]
    assert not list(out.parent.glob(".neurons-12.*"))  # no temporary left behind


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{root}/nowhere", "--data", "synth:cat?n=4"], "no such file or directory"),
        (["{run}", "--data", "{root}/nowhere"], "nowhere: no such file or directory"),
        (["{run}", "--data", "synth:cat?n=4", "--layers", "nope"], "no layer 'nope'"),
        (["{run}", "--data", "synth:cat?n=4", "--concept", "synth:shapes?n=8"], "exactly two"),
        (["{run}", "--data", "synth:dog"], "unknown synthetic set"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(analysed, capsys, argv, message):
    root = analysed["root"]
    argv = [a.format(root=root, run=root / "run") for a in argv]
    assert neurons.main([*argv, "--quiet", "--out", str(root / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("catneuron neurons: ") and message in err and "\n" not in err
    assert not (root / "bad").exists()


@pytest.mark.parametrize(
    "config", sorted((Path(__file__).resolve().parents[1] / "configs/tiny").glob("*.yaml")),
    ids=lambda p: p.stem,
)  # fmt: skip
def test_one_layers_feature_equals_its_entry_in_features(config):
    """`feature(x, name)`, which the stimuli climb (and layered families stop early for),
    is `features(x)[name]` exactly, for every layer of every tiny config's model."""
    from pretrain.config import load_config

    cfg = load_config(config, [])
    torch.manual_seed(0)
    model = build_model(cfg.model.name, **cfg.model.kwargs).eval()
    side = cfg.data.crop or cfg.data.resize
    x = torch.randn(2, 1 if cfg.data.grayscale else 3, side, side)
    cond = torch.zeros(2, dtype=torch.long) if model.conditional else None
    with torch.no_grad():
        every = model.features(x, cond)
        for name, value in every.items():
            assert torch.equal(model.feature(x, name, cond), value), name


def test_groups_are_fitted_on_a_bounded_sample_of_the_data(analysed, monkeypatch):
    """With more --data frames than GROUP_FIT_FRAMES, the groups come from an evenly spaced
    subset (here 8 of 24 frames), and the figures are still written."""
    from evals.features.datasets import subset

    root, seen = analysed["root"], []

    def spy(dataset, positions, tag):
        seen.append((len(dataset), list(positions), tag))
        return subset(dataset, positions, tag)

    monkeypatch.setattr(neurons, "GROUP_FIT_FRAMES", 8)
    monkeypatch.setattr("evals.features.datasets.subset", spy)
    out = root / "bounded"
    argv = [str(root / "run"), "--data", str(root / "data"), "--concept", str(root / "concept")]
    argv += ["--stimulus-units", "0", "--quiet", "--no-tensorboard", "--out", str(out)]
    assert neurons.main(argv) == 0
    assert seen == [(24, [0, 3, 7, 10, 13, 16, 20, 23], "groups/8")]
    grouped = json.loads((out / "metrics.json").read_text())["groups"]["layers"]["cells"]
    assert sorted(grouped["members"]) == [0, 1, 2, 3]
