"""`catneuron demo`, the Quickstart's first command: every step end to end at a reduced size.

Checks what the demo claims: every artifact is written, the report's numbers are those of
the metrics.json files, training never saw a label (no `cls` member in the shards it read,
`data.with_labels` off) and no held-out concept image is one of its frames.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_report import assert_figures_match

from catneuron import demo
from data_pipeline.synth import plan_clips
from pretrain.config import load_config

REPO = Path(__file__).resolve().parents[1]


def shard_frames(shards: Path) -> tuple[list[str], list[np.ndarray]]:
    """Every member name of every training shard, and every frame decoded (float gray)."""
    names, frames = [], []
    for path in sorted((shards / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                names.append(member.name)
                if member.name.endswith(".jpg"):
                    data = tar.extractfile(member).read()
                    frames.append(
                        np.asarray(Image.open(BytesIO(data)).convert("L"), dtype=np.float32)
                    )
    return names, frames


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    cmd = [
        sys.executable,
        "-m",
        "catneuron",
        "demo",
        "--out",
        str(out),
        "--videos",
        "4",
        "--steps",
        "20",
        "--eval-images",
        "40",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path_factory.mktemp("cwd")
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
def test_demo_writes_every_artifact_with_a_quiet_console(demo_run):
    out, proc = demo_run
    console = proc.stdout + proc.stderr
    assert "demo done" in proc.stdout
    for step in range(1, 7):
        assert f"[{step}/6]" in proc.stdout
    # the children's chatter went to the logs, not to the console
    assert not re.search(r"\[(INFO|WARNING)\]|ray\.init|Started a local Ray", console), console[
        -2000:
    ]
    for log in ("synth", "shard", "train"):
        assert (out / "logs" / f"{log}.log").stat().st_size > 0
    assert (
        "DeepSpeed" in (out / "logs" / "train.log").read_text()
        or "deepspeed" in (out / "logs" / "train.log").read_text()
    )
    run = out / "runs" / "cat_demo"
    assert (out / "videos" / "labels.parquet").is_file()
    assert (out / "shards" / "manifest" / "shards.parquet").is_file()
    assert any((run / "tb").glob("events.out.tfevents.*"))
    # --steps 20 per stage: the export's step is 20 times the recipe's stage count
    config = load_config(demo.demo_config("small.yaml"))
    from pretrain.models import build_model

    stages = len(build_model(config.model.name, **config.model.kwargs).stages())
    assert (run / "exports" / f"step_{20 * stages}" / "model.safetensors").is_file()
    for name in ("report.html", "metrics.json", "config.json"):
        assert (run / name).is_file()
    assert len(list((out / "concept" / "cat").glob("*.png"))) == 20
    assert len(list((out / "concept" / "no_cat").glob("*.png"))) == 20
    metrics = json.loads((run / "metrics.json").read_text())
    for kind, module in (("probe", "evals.probe"), ("neurons", "evals.neurons")):
        if importlib.util.find_spec(module) is not None:
            assert kind in metrics and (run / metrics[kind]["dir"] / "metrics.json").is_file()
        else:
            assert kind in metrics["demo"]["skipped"]
    assert str(run / "report.html") in proc.stdout
    if "neurons" in metrics:  # the grouped unit is printed beside the single one
        grouped = metrics["grouped_unit"]
        assert f"best grouped unit: {grouped['layer']} channels #{grouped['members'][0]}" in (
            proc.stdout
        )


@pytest.mark.slow
def test_report_figures_equal_the_metrics_files(demo_run):
    out, _ = demo_run
    run = out / "runs" / "cat_demo"
    assert assert_figures_match(run) >= 5
    metrics = json.loads((run / "metrics.json").read_text())
    for kind in ("probe", "neurons"):
        if kind in metrics:  # the copy in the run's metrics.json is the eval's own file
            source = json.loads((run / metrics[kind]["dir"] / "metrics.json").read_text())
            assert metrics[kind]["metrics"] == source


@pytest.mark.slow
def test_training_never_read_a_label(demo_run):
    out, _ = demo_run
    config = json.loads((out / "runs" / "cat_demo" / "config.json").read_text())
    assert config["data"]["with_labels"] is False
    assert config["data"]["source"] == str(out / "shards")
    names, frames = shard_frames(out / "shards")
    assert frames and not [n for n in names if n.endswith(".cls")]
    assert {n.rsplit(".", 1)[1] for n in names} == {"jpg", "json"}
    # held-out concept images are other scenes than any clip's: their seeds cannot collide
    index = json.loads((out / "concept" / "index.json").read_text())
    assert index["base"] >= 2**40 > max(s.seed for s in plan_clips(4, 0))
    # ... and no concept image is (close to) a frame training read
    stack = np.stack(frames)
    for path in sorted((out / "concept").glob("*/*.png")):
        image = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
        distance = np.abs(stack - image).mean(axis=(1, 2)).min()
        assert distance > 5.0, (path, distance)


def test_full_scale_prints_the_cluster_commands(capsys):
    assert demo.main(["--scale", "full"]) == 0
    out = capsys.readouterr().out
    assert "launch/train_multinode.sh" in out and "launch/submit.sh" in out
    assert "input_size: 200" in demo.demo_config("full.yaml").read_text()
    for command in ("synth", "shard", "probe", "neurons", "report"):
        assert command in out


def test_demo_configs_ship_as_package_data():
    config = load_config(demo.demo_config("small.yaml"))
    assert config.data.with_labels is False
    assert load_config(demo.demo_config("full.yaml")).data.crop == 200
    # (no tomllib: Python 3.10 is supported)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'catneuron = ["configs/demo/*.yaml"]' in pyproject
    assert (REPO / "configs" / "demo" / "small.yaml").resolve() == demo.demo_config(
        "small.yaml"
    ).resolve()


def test_submit_needs_full_scale(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--submit"])
    assert e.value.code == 2


@pytest.mark.slow
def test_ablation_rows_run_through_the_pipeline_and_a_rerun_keeps_them(tmp_path):
    """One row, tiny: synth, shard on Ray, DeepSpeed training and `catneuron neurons`."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "catneuron", "demo", "--ablation", "--ablation-rows", "1"]
    cmd += ["--out", str(out), "--videos", "4", "--steps", "20", "--eval-images", "40"]
    cmd += ["--ranks", "1"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "Traceback" not in first.stdout + first.stderr
    table = out / "ablation"
    (row,) = json.loads((table / "ablation.json").read_text())
    assert row["pipeline"] and row["model"] == "wta_conv_ae" and row["steps"] == 20
    assert row["settings"]["videos"] == 4 and row["settings"]["eval_images"] == 40
    for side in ("trained", "random"):
        assert 0.0 <= row[side]["heldout"] <= 1.0 and 0.0 <= row[side]["auroc"] <= 1.0
    assert row["trained"]["best_layer"] in row["layers"]
    run = table / row["run"]
    assert (run / "exports" / "step_20" / "model.safetensors").is_file()
    assert any((run / "evals").glob("neurons-*/metrics.json"))
    assert row["name"] in (table / "ablation.md").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done before, kept" in again.stdout and "training" not in again.stdout


def test_a_changed_row_trains_afresh_and_an_unchanged_one_resumes(tmp_path):
    """A row's run directory is reused only by the same settings: the trainer would refuse
    to resume a checkpoint of another model (a changed row, an older table) as a config error."""
    from catneuron.ablation_runs import ROW_STAMP, fresh_run

    run = tmp_path / "row02"
    fresh_run(run, {"kwargs": {"channel_k": 8}})
    (run / "checkpoints").mkdir()
    fresh_run(run, {"kwargs": {"channel_k": 8}})  # same row, interrupted: resume
    assert (run / "checkpoints").is_dir()
    fresh_run(run, {"kwargs": {"channel_k": 4}})  # changed row: start over
    assert not (run / "checkpoints").exists() and run.is_dir()
    (run / "checkpoints").mkdir()
    (run / ROW_STAMP).unlink()  # a run from before the stamp existed
    fresh_run(run, {"kwargs": {"channel_k": 4}})
    assert not (run / "checkpoints").exists()


def test_ablation_rows_out_of_range_are_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--ablation", "--ablation-rows", "0,99"])
    assert e.value.code == 2
    assert "rows are 1 to" in capsys.readouterr().err


def test_row_count_is_the_number_of_rows():
    """`--ablation-rows` is checked against ROW_COUNT before anything heavy loads."""
    from catneuron.ablation_runs import ROW_COUNT, default_rows

    assert len(default_rows()) == ROW_COUNT


def test_the_ablation_recipe_is_the_demos_model():
    """Rows 2-9 are "one change from the demo's recipe": RECIPE must be what it ships."""
    import yaml

    from catneuron.ablation_runs import RECIPE, default_rows
    from catneuron.demo_steps import demo_config

    shipped = yaml.safe_load(demo_config("small.yaml").read_text())
    # the demo ships row 17: the recipe, then stretch refinement
    assert shipped["model"] == {"name": "wta_conv_ae", "kwargs": {**RECIPE, "stretch_keep": 0.25}}
    assert default_rows()[13].kwargs == RECIPE
    assert default_rows()[16].kwargs == shipped["model"]["kwargs"]
    assert default_rows()[16].steps == shipped["stages"]["steps"]
