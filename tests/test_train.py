"""The trainer end to end: real DeepSpeed engines on CPU ranks (gloo), real shards, real event files.

Single-rank runs go through `pretrain.train.main` in this process (the rank environment
that the launcher would set is set here); the `slow` tests start the DeepSpeed launcher.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cluster_support import free_port
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pretrain import build_model, checkpoint, load_export
from pretrain.export import export_checkpoint
from pretrain.export import main as export_main
from pretrain.launch import main as launch_main
from pretrain.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
GREEDY_STEPS = [4, 4, 4, 4]  # three greedy stages and the fine-tuning stage


@pytest.fixture
def single_rank(monkeypatch):
    """The environment the DeepSpeed launcher gives a one-rank job."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**env, "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)


def tiny_config(tmp_path: Path, shards: Path, name: str, **sections) -> Path:
    """A shipped tiny config pointed at the session's shards and a temporary run directory."""
    config = yaml.safe_load((REPO / "configs" / "tiny" / f"{name}.yaml").read_text())
    config["data"]["source"] = str(shards)
    config["run"].update(output_dir=str(tmp_path / "runs"), name=name)
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_dir(config_path: Path, name: str | None = None) -> Path:
    config = yaml.safe_load(config_path.read_text())
    return Path(config["run"]["output_dir"]) / (name or config["run"]["name"])


def scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def log_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- one rank, in process


@pytest.fixture(scope="module")
def greedy_run(shards, tmp_path_factory) -> Path:
    """stacked_ae over its greedy stages, checkpointed at every stage end."""
    tmp_path = tmp_path_factory.mktemp("greedy")
    config = tiny_config(
        tmp_path,
        shards,
        "stacked_ae_patches",
        stages={"steps": GREEDY_STEPS},
        checkpoint={"every": 100, "keep_last": 10},
        logging={"every": 2, "image_every": 4},
    )
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
        }.items():
            mp.setenv(key, value)
        mp.setenv("MASTER_PORT", str(free_port()))
        assert train_main(["--config", str(config)]) == 0
    return run_dir(config)


def test_each_greedy_stage_changes_only_its_own_parameters(greedy_run):
    spec = json.loads((greedy_run / "exports" / "step_4" / "model.json").read_text())
    torch.manual_seed(0)  # run.seed: the trainer builds the model right after seeding
    model = build_model(spec["name"], **spec["kwargs"])
    names = {id(p): n for n, p in model.named_parameters()}
    before = {n: t.clone() for n, t in model.state_dict().items()}
    stages = model.stages()
    assert len(stages) == len(GREEDY_STEPS)
    boundaries = [sum(GREEDY_STEPS[: i + 1]) for i in range(len(GREEDY_STEPS))]
    for index, (stage, step) in enumerate(zip(stages, boundaries, strict=True)):
        after = load_file(greedy_run / "exports" / f"step_{step}" / "model.safetensors")
        changed = {n for n in names.values() if not torch.equal(before[n], after[n])}
        own = {names[id(p)] for p in stage.parameters()}
        assert changed, f"stage {index} ({stage.name}) changed nothing"
        assert changed <= own, f"stage {index} ({stage.name}) changed {sorted(changed - own)}"
        assert (
            json.loads((greedy_run / "exports" / f"step_{step}" / "model.json").read_text())[
                "stage"
            ]
            == index
        )
        before = after


def test_stage_transitions_and_expected_tags_are_in_tensorboard(greedy_run):
    stage_events = scalars(greedy_run, "stage")
    firsts = {}
    for step, value in stage_events:
        firsts.setdefault(int(value), step)
    assert firsts == {0: 0, 1: 4, 2: 8, 3: 12}
    events = EventAccumulator(str(greedy_run / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    expected = {
        "train/loss",
        "train/lr",
        "stage",
        "perf/images_per_s",
        "perf/step_ms",
        "perf/data_wait_ms",
    }
    assert expected <= set(tags["scalars"])
    assert {"images/input_recon", "images/filters"} <= set(tags["images"])
    lr = dict(scalars(greedy_run, "train/lr"))
    assert lr[2] > lr[4]  # cosine decay within the first stage ...
    assert lr[6] > lr[4]  # ... restarted by the next stage's engine
    assert (
        len(log_records(greedy_run))
        == len(scalars(greedy_run, "train/loss"))
        == sum(GREEDY_STEPS) // 2
    )


def test_export_loads_back_and_matches_the_checkpoint(greedy_run, shards):
    final = sum(GREEDY_STEPS)
    exported = load_export(greedy_run / "exports" / f"step_{final}")
    state, weights = checkpoint.read_checkpoint(
        greedy_run / "checkpoints", checkpoint.tag_for(final)
    )
    reference = build_model(state.config["model"]["name"], **state.config["model"]["kwargs"])
    reference.load_state_dict(weights)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(exported(x)["recon"], reference.eval()(x)["recon"])
    # `catneuron export` rewrites the same export from the checkpoint
    rewritten = load_file(export_checkpoint(greedy_run, step=final) / "model.safetensors")
    assert all(torch.equal(rewritten[k], v) for k, v in exported.state_dict().items())
    with pytest.raises(FileNotFoundError, match="steps on disk: 4, 8, 12, 16"):
        export_checkpoint(greedy_run, step=5)


def test_export_command(greedy_run, capsys):
    assert export_main([str(greedy_run), "--step", "8"]) == 0
    assert capsys.readouterr().out.strip() == str(greedy_run / "exports" / "step_8")
    assert export_main([str(greedy_run), "--step", "5"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("catneuron export: ") and "\n" not in error


@pytest.mark.parametrize(
    ("name", "steps", "stop_after"),
    [
        ("stacked_ae_patches", [4, 4, 4, 4], 6),
        ("stacked_ae_patches", [4, 4, 4, 4], 8),
        # the cluster stage fits its targets at its start: refitted after a stop at the
        # boundary, restored from the checkpoint after a stop inside it
        ("wta_conv_ae_cluster", [4, 4], 4),
        ("wta_conv_ae_cluster", [4, 4], 6),
        # the stretch stage's labels live in buffers: restored by a stop inside it
        ("wta_conv_ae_stretch", [4, 4], 6),
    ],
    ids=[
        "mid-stage",
        "stage-boundary",
        "cluster-boundary",
        "cluster-mid-stage",
        "stretch-mid-stage",
    ],
)
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
    shards, tmp_path, single_rank, name, steps, stop_after
):
    config = tiny_config(
        tmp_path,
        shards,
        name,
        stages={"steps": steps},
        checkpoint={"every": 2, "keep_last": 2},
        logging={"every": 2, "image_every": 0},
    )
    final = sum(steps)
    assert train_main(["--config", str(config), "run.name=straight"]) == 0
    assert (
        train_main(
            ["--config", str(config), "run.name=resumed", f"run.stop_after_step={stop_after}"]
        )
        == 0
    )
    resumed_dir = run_dir(config, "resumed")
    assert checkpoint.latest_tag(resumed_dir / "checkpoints") == checkpoint.tag_for(stop_after)
    assert not (resumed_dir / "exports" / f"step_{final}").exists()
    assert train_main(["--config", str(config), "run.name=resumed"]) == 0
    straight = load_file(
        run_dir(config, "straight") / "exports" / f"step_{final}" / "model.safetensors"
    )
    resumed = load_file(resumed_dir / "exports" / f"step_{final}" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)
    kept = [f"step_{final - 2}", f"step_{final}"]
    assert checkpoint.list_tags(resumed_dir / "checkpoints") == kept  # keep 2
    # the two invocations log one curve, equal to the uninterrupted run's
    straight_losses = scalars(run_dir(config, "straight"), "train/loss")
    resumed_losses = scalars(resumed_dir, "train/loss")
    assert (
        [s for s, _ in resumed_losses]
        == [s for s, _ in straight_losses]
        == list(range(2, final + 1, 2))
    )
    assert [v for _, v in resumed_losses] == pytest.approx(
        [v for _, v in straight_losses], abs=1e-6
    )


def test_non_finite_loss_stops_naming_stage_and_step(shards, tmp_path, single_rank, capsys):
    config = tiny_config(
        tmp_path, shards, "conv_ae", optimizer={"lr": 1e30}, checkpoint={"every": 1}
    )
    assert train_main(["--config", str(config)]) == 3  # distinct: --max-restarts never retries it
    error = capsys.readouterr().err
    match = re.search(r"non-finite loss at stage 0 \(fine_tune\) step (\d+): stopping; (.*)", error)
    assert match, error
    bad_step = int(match.group(1))
    assert match.group(2) == f"the last good checkpoint is step_{bad_step - 1}"
    assert checkpoint.latest_tag(run_dir(config) / "checkpoints") == f"step_{bad_step - 1}"


def test_config_errors_exit_with_one_line_before_any_rank_starts(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("data: {batchsize: 4}\n")
    expected = f"catneuron train: {config}: unknown key 'data.batchsize'"
    assert train_main(["--config", str(config)]) == 2
    assert capsys.readouterr().err.strip() == expected
    assert launch_main([str(config), "--num-gpus", "2"]) == 2
    assert capsys.readouterr().err.strip() == expected


def test_launcher_command_for_one_node_of_many(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("run: {name: x}\n")
    argv = [str(config), "data.batch_size=4", "--hostfile", "hosts", "--node-rank", "1"]
    assert launch_main([*argv, "--master-addr", "10.0.0.1", "--dry-run"]) == 0
    command = capsys.readouterr().out
    assert (
        "-m pretrain.ds_runner --master_port 29500 --hostfile hosts --master_addr 10.0.0.1"
        in command
    )
    assert (
        f"--no_ssh --node_rank 1 --module pretrain.train --config {config} data.batch_size=4"
        in command
    )
    assert launch_main(argv) == 2  # a node of many needs the address of node 0


# --------------------------------------------------------------------------- the DeepSpeed launcher


def catneuron(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "catneuron", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


@pytest.mark.slow
def test_two_cpu_ranks_train_conv_ae_through_the_launcher(shards, tmp_path):
    config = tiny_config(tmp_path, shards, "conv_ae")
    process = catneuron("train", str(config), "--num-gpus", "2", "--master-port", str(free_port()))
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert "on 2 rank(s)" in output
    records = log_records(run_dir(config))
    losses = [r["train/loss"] for r in records]
    assert losses[-1] < 0.5 * losses[0], losses  # stated amount: at least halved
    assert (run_dir(config) / "exports" / f"step_{records[-1]['step']}" / "model.json").is_file()


@pytest.mark.slow
def test_two_nodes_on_localhost_train_together(shards, tmp_path):
    """Node ranks 0 and 1 on this machine, one process each, joined without ssh."""
    config = tiny_config(tmp_path, shards, "conv_ae", deepspeed={"zero_optimization": {"stage": 1}})
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    nodes = [
        catneuron(
            "train", str(config), "--hostfile", str(hostfile), "--node-rank", str(rank),
            "--master-addr", "127.0.0.1", "--master-port", port,
        )
        for rank in (0, 1)
    ]  # fmt: skip
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "on 2 rank(s)" in outputs[0]
    records = log_records(run_dir(config))
    assert records[-1]["train/loss"] < records[0]["train/loss"]
    # ZeRO 1 shards the fp32 masters: the trainer gathers them for its export, and
    # `catneuron export` consolidates them from the checkpoint files: the same weights.
    final = records[-1]["step"]
    trained = load_file(run_dir(config) / "exports" / f"step_{final}" / "model.safetensors")
    rebuilt = load_file(export_checkpoint(run_dir(config), step=final) / "model.safetensors")
    assert trained.keys() == rebuilt.keys()
    assert all(torch.equal(trained[k], rebuilt[k]) for k in trained)
