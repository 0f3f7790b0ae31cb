"""The trainer against what breaks real runs: every shipped config on 2 ranks, a damaged
checkpoint, and user mistakes caught before the launcher starts a rank."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cluster_support import free_port
from safetensors.torch import load_file

from pretrain import checkpoint
from pretrain.launch import main as launch_main
from pretrain.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
# os.walk with followlinks: rglob does not follow directory links, and configs/demo is one
CONFIGS = sorted(
    Path(d) / f
    for d, _, files in os.walk(REPO / "configs", followlinks=True)
    for f in files
    if f.endswith(".yaml")
)
CPU_SIDE = 64  # the largest frame a CPU test trains on


def cpu_overrides(config_path: Path, shards: Path, out: Path) -> list[str]:
    """What a CPU cannot do or what makes it slow; everything else stays as shipped.

    Batch size, step counts, worker processes and the shuffle buffer are shrunk; frames
    larger than CPU_SIDE are trained at CPU_SIDE (only fully convolutional models ship
    larger inputs; a model built for one input size, such as the paper-scale local_sparse,
    keeps its size); bf16 is switched off by the trainer itself on CPU ranks.
    """
    config = yaml.safe_load(config_path.read_text())
    data = config.get("data", {})
    overrides = [
        f"data.source={shards}",
        f"run.output_dir={out}",
        "run.name=check",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=16",
        "stages.steps=2",
        "checkpoint.every=2",
        "logging.every=1",
        "logging.image_every=2",
    ]
    fixed_size = "input_size" in config.get("model", {}).get("kwargs", {})
    if (data.get("crop") or 0) > CPU_SIDE and not fixed_size:
        overrides += [f"data.resize={CPU_SIDE}", f"data.crop={CPU_SIDE}"]
    return overrides


@pytest.mark.slow
@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_config_trains_on_two_ranks(config_path, shards, tmp_path):
    command = [sys.executable, "-m", "catneuron", "train", str(config_path)]
    command += cpu_overrides(config_path, shards, tmp_path)
    command += ["--num-gpus", "2", "--master-port", str(free_port())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "on 2 rank(s)" in output
    run = tmp_path / "check"
    final = checkpoint.step_of(checkpoint.latest_tag(run / "checkpoints"))
    weights = load_file(run / "exports" / f"step_{final}" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def _tiny(tmp_path: Path, shards: Path) -> Path:
    config = yaml.safe_load((REPO / "configs" / "tiny" / "conv_ae.yaml").read_text())
    config["data"]["source"] = str(shards)
    config["run"].update(output_dir=str(tmp_path / "runs"), name="damaged", channels_last=True)
    config["stages"] = {"steps": 8}
    config["checkpoint"] = {"every": 2, "keep_last": 3}
    config["logging"] = {"every": 2, "image_every": 0}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(
    shards, tmp_path, monkeypatch, capsys
):
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**env, "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    config = _tiny(tmp_path, shards)
    runs = tmp_path / "runs"
    assert train_main(["--config", str(config), "run.stop_after_step=6"]) == 0
    damaged, reference = runs / "damaged", runs / "reference"
    assert checkpoint.list_tags(damaged / "checkpoints") == ["step_2", "step_4", "step_6"]

    # The reference: the same run, resumed from step_4 as if step_6 had never been written.
    shutil.copytree(damaged, reference)
    shutil.rmtree(reference / "checkpoints" / "step_6")
    checkpoint.write_latest(reference / "checkpoints", "step_4")

    states = damaged / "checkpoints" / "step_6" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    capsys.readouterr()
    assert train_main(["--config", str(config)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"catneuron train: {states}: unreadable checkpoint file ("), err
    assert err[1] == "catneuron train: resuming from step_4, the newest checkpoint that loads"
    assert (damaged / "checkpoints" / "step_6.unreadable").is_dir()  # kept, out of the way

    assert train_main(["--config", str(config), "run.name=reference"]) == 0
    ours = load_file(damaged / "exports" / "step_8" / "model.safetensors")
    theirs = load_file(reference / "exports" / "step_8" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=0, msg=name)


@pytest.fixture
def good_config(tmp_path, shards) -> Path:
    path = tmp_path / "good.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "x", "output_dir": str(tmp_path / "runs")},
                "data": {"source": str(shards), "batch_size": 4},
                "model": {"name": "conv_ae", "kwargs": {"channels": [8, 16]}},
            }
        )
    )
    return path


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "data.source={tmp}/nowhere",
            "catneuron train: data.source: {tmp}/nowhere: shard not found",
        ),
        (
            "model.kwargs={{chanels: [8]}}",
            "catneuron train: model.kwargs: conv_ae takes no argument 'chanels'; it accepts: "
            "in_channels, channels, activation, decoder, l1, sparsity_target, sparsity_weight, "
            "mask_prob, noise_std, greedy, fine_tune",
        ),
        (
            "model.name=conv_aee",
            "catneuron train: model.name: unknown model 'conv_aee'; registered: ",
        ),
        (
            "run.output_dir={tmp}/file",
            "catneuron train: {tmp}/file/x: run directory is not writable (",
        ),
    ],
    ids=["data-source", "model-kwarg", "model-name", "run-dir"],
)
def test_user_mistakes_are_one_line_before_any_rank(
    good_config, tmp_path, capsys, override, expected
):
    (tmp_path / "file").write_text("a file where a directory should be")
    override, expected = override.format(tmp=tmp_path), expected.format(tmp=tmp_path)
    assert launch_main([str(good_config), override, "--num-gpus", "2"]) == 2
    out, err = capsys.readouterr()
    assert "ds_runner" not in out  # the launcher was never started
    assert err.count("\n") == 1 and err.startswith(expected), err


def test_more_gpus_than_present_is_one_line(good_config, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert launch_main([str(good_config), "--num-gpus", "2"]) == 2
    out, err = capsys.readouterr()
    assert "ds_runner" not in out
    assert err == "catneuron train: --num-gpus 2: this machine has 1 GPU(s)\n"
