"""Stops that lose nothing, with real signals on real processes.

`catneuron train` on 2 CPU ranks: SIGTERM to the launcher, or SIGUSR1 to one rank, stops
the run at one step boundary with a checkpoint there and exit 75; the rerun resumes at
that step (0 steps redone) and ends with the weights of an uninterrupted run. A launcher
killed by SIGKILL reads as a failure. `catneuron shard` on SIGTERM exits non-zero in one
line and its rerun gives the bytes of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from cluster_support import (
    free_port,
    latest_step,
    log_records,
    quiet_env,
    tiny_config,
    wait_for,
    write_shards,
)
from safetensors.torch import load_file

from pretrain.restart import rank_processes
from pretrain.stop import EXIT_PREEMPTED, StopFlag

STEPS = 60
SECTIONS = {
    "stages": {"steps": STEPS},
    "checkpoint": {"every": 1000, "keep_last": 2},
    "logging": {"every": 1},
    "data": {"num_workers": 0},
}


def train_command(config: Path) -> list[str]:
    command = [sys.executable, "-m", "catneuron", "train", str(config), "--num-gpus", "2"]
    return command + ["--master-port", str(free_port())]


def start(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        train_command(config), stdout=log.open("a"), stderr=subprocess.STDOUT, env=quiet_env()
    )


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "exports" / f"step_{STEPS}" / "model.safetensors")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("data"), n_shards=4, per_shard=16)


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory) -> dict[str, torch.Tensor]:
    tmp = tmp_path_factory.mktemp("reference")
    config = tiny_config(tmp, shards, "reference", **SECTIONS)
    log = tmp / "train.log"
    assert start(config, log).wait(timeout=600) == 0, log.read_text()[-3000:]
    return final_weights(tmp / "runs" / "reference")


def stop_and_resume(tmp_path: Path, shards: Path, reference, send) -> str:
    """Start a run, `send(process)` a signal mid-run, check the stop, rerun, compare weights."""
    config = tiny_config(tmp_path, shards, "stopped", **SECTIONS)
    run, log = tmp_path / "runs" / "stopped", tmp_path / "train.log"
    process = start(config, log)
    try:
        wait_for(lambda: len(log_records(run)) >= 3, 300, "step 3")
        send(process)
        code = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert code == EXIT_PREEMPTED, output[-3000:]
    saved = latest_step(run)
    steps_done = [r["step"] for r in log_records(run)]
    assert saved is not None and saved < STEPS, output[-3000:]
    assert steps_done == list(range(1, saved + 1))  # every step done is in the checkpoint
    assert f"stopped at step {saved}, checkpoint step_{saved} saved" in output
    assert "Traceback" not in output
    assert not list((run / "checkpoints").glob(".partial-*"))  # nothing half-written

    assert start(config, log).wait(timeout=600) == 0, log.read_text()[-3000:]
    resumed = [r["step"] for r in log_records(run)][len(steps_done) :]
    assert resumed == list(range(saved + 1, STEPS + 1))  # 0 steps redone, none skipped
    ours = final_weights(run)
    assert ours.keys() == reference.keys()
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6, msg=name)
    print(f"\nstopped at step {saved} of {STEPS}; resumed with 0 steps lost")
    return output


@pytest.mark.slow
def test_sigterm_to_the_launcher_preempts_at_a_step_and_resumes_exactly(
    tmp_path, shards, uninterrupted
):
    output = stop_and_resume(
        tmp_path, shards, uninterrupted, lambda p: p.send_signal(signal.SIGTERM)
    )
    assert "catneuron train: SIGUSR1: stopped at step" in output  # forwarded to the ranks


@pytest.mark.slow
def test_sigusr1_to_one_rank_preempts_every_rank_and_resumes_exactly(
    tmp_path, shards, uninterrupted
):
    def to_rank_1(process: subprocess.Popen) -> None:
        ranks = wait_for(lambda: rank_processes(process.pid), 30, "the ranks")
        rank_1 = next(r for r in ranks if "--local_rank=1" in r.cmdline())
        rank_1.send_signal(signal.SIGUSR1)

    output = stop_and_resume(tmp_path, shards, uninterrupted, to_rank_1)
    # rank 0 was not signalled: it learnt of the stop through the all-reduce
    assert "catneuron train: a stop signal to another rank: stopped at step" in output


@pytest.mark.slow
def test_a_sigkilled_node_launcher_reads_as_a_failure_not_a_signal_stop(tmp_path, shards):
    config = tiny_config(tmp_path, shards, "killed", **SECTIONS)
    run, log = tmp_path / "runs" / "killed", tmp_path / "train.log"
    process = start(config, log)
    try:
        wait_for(lambda: len(log_records(run)) >= 2, 300, "step 2")
        launchers = [
            p
            for p in psutil.Process(process.pid).children(recursive=True)
            if "deepspeed.launcher.launch" in " ".join(p.cmdline())
        ]
        assert len(launchers) == 1
        launchers[0].send_signal(signal.SIGKILL)
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 128 + signal.SIGKILL, log.read_text()[-3000:]
    assert not rank_processes(process.pid)


def test_stop_flag_from_a_signal_and_from_the_stop_file(tmp_path):
    flag = StopFlag(tmp_path / "STOP").install()
    try:
        assert not flag.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.agreed() and flag.signum == signal.SIGUSR1
    finally:
        flag.uninstall()
    other = StopFlag(tmp_path / "STOP")
    assert not other.requested
    (tmp_path / "STOP").touch()
    assert other.requested and other.signum == signal.SIGTERM


# --------------------------------------------------------------------------- shard


@pytest.mark.slow
def test_sigterm_to_the_shard_driver_then_rerun_is_byte_identical(tmp_path):
    from data_pipeline import synth

    videos = tmp_path / "videos"
    synth.synthesize(videos, 6, seed=7, min_size=64, max_size=96, min_seconds=2.0, max_seconds=3.0)
    shard = [sys.executable, "-m", "catneuron", "shard", str(videos), "--num-workers", "1"]
    shard += ["--videos-per-task", "1", "--fps", "4", "--size", "32", "--shard-max-count", "4"]
    env = quiet_env()

    reference = subprocess.run(
        [*shard, "--out", str(tmp_path / "reference")], env=env, capture_output=True, text=True
    )
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "stopped"
    process = subprocess.Popen(
        [*shard, "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    wait_for(lambda: list(out.glob("shards/*.tar")), 300, "the first shard")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("catneuron shard:")]
    assert lines == ["catneuron shard: SIGTERM; rerun the same command to resume"], err[-3000:]
    assert "Traceback" not in err

    again = subprocess.run([*shard, "--out", str(out)], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "reference" / "shards").iterdir())
    assert sorted(p.name for p in (out / "shards").iterdir()) == names
    for name in names:
        assert (out / "shards" / name).read_bytes() == (
            tmp_path / "reference" / "shards" / name
        ).read_bytes(), name


# --------------------------------------------------------------------------- Ctrl-C in the evals


def default_sigint() -> None:
    """A shell's background job inherits SIGINT ignored, and Python then installs no handler
    for it: give the child the terminal's default, as a user's Ctrl-C meets it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def loading_torch(pid: int) -> bool:
    """Whether process `pid` has begun to load torch's shared library (its import is under way)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["while-importing", "while-watching"])
def test_ctrl_c_signal_to_probe_watch_is_one_line(tmp_path, phase):
    (tmp_path / "run" / "exports").mkdir(parents=True)
    command = [sys.executable, "-m", "catneuron", "probe", "--watch", str(tmp_path / "run")]
    process = subprocess.Popen(
        [*command, "--data", "sklearn:digits"], env=quiet_env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint,
    )  # fmt: skip
    # not a fixed sleep: on a loaded machine 0.5 s can still be inside Python's own start-up
    wait_for(lambda: loading_torch(process.pid), 60, "torch's import", poll=0.01)
    if phase == "while-watching":
        time.sleep(12.0)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err == "catneuron probe: interrupted\n" and out == "", err[-2000:]
    assert not (tmp_path / "run" / "evals").exists()  # nothing half-written
