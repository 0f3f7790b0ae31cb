"""A real Ray cluster (`ray start --head` on 127.0.0.1): jobs through launch/submit.sh, and Ray Train.

One cluster for the module, with its own temp dir, ports and auth token, so that it never
meets another Ray instance on the machine; it is stopped at the end by the ids of its own
processes (`ray stop` would stop every Ray cluster of this user on the machine).
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import torch
from cluster_support import (
    REPO,
    VENV_BIN,
    free_ports,
    latest_step,
    log_records,
    quiet_env,
    run,
    tiny_config,
    wait_for,
    write_shards,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """The processes of the cluster whose session lives under `temp_dir`, and their children."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in arg for arg in process.info["cmdline"] or []):
            found[process.pid] = process
            with contextlib.suppress(psutil.Error):
                found.update({c.pid: c for c in process.children(recursive=True)})
    return [p for p in found.values() if alive(p)]


def alive(process: psutil.Process) -> bool:
    """Running, not a zombie: an exited raylet that its parent has not reaped yet holds no
    port and no memory, and it is gone once that parent exits."""
    with contextlib.suppress(psutil.Error):
        return process.status() != psutil.STATUS_ZOMBIE
    return False


def stop_cluster(temp_dir: str, rounds: int = 3) -> None:
    """Terminate, then kill, the cluster's processes; again while any is left, since a
    raylet or worker may start between one look at the process table and the signals."""
    for _ in range(rounds):
        processes = cluster_processes(temp_dir)
        if not processes:
            return
        for process in processes:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        _, left = psutil.wait_procs(processes, timeout=10)
        for process in left:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(left, timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`ray start --head` with the dashboard (the job API) on 127.0.0.1 and token auth on."""
    root = tmp_path_factory.mktemp("ray")
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    temp_dir = tempfile.mkdtemp(prefix="cnray", dir="/tmp")  # short: Ray's socket paths
    env = quiet_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    names = ["--port", "--dashboard-port", "--ray-client-server-port"]
    names += ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port"]
    names += ["--metrics-export-port", "--runtime-env-agent-port"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    gcs, dashboard = ports["--port"], ports["--dashboard-port"]
    command = [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1"]
    command += ["--num-cpus", "2", "--disable-usage-stats", "--include-dashboard=true"]
    command += ["--dashboard-host", "127.0.0.1", "--temp-dir", temp_dir]
    command += [str(a) for item in ports.items() for a in item]
    try:
        started = run(command, timeout=180, env=env)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield {
            "address": f"http://127.0.0.1:{dashboard}",
            "gcs": f"127.0.0.1:{gcs}",
            "env": env,
            "temp_dir": temp_dir,
            "root": root,
        }
    finally:
        stop_cluster(temp_dir)
        assert not cluster_processes(temp_dir), "the test cluster did not stop"
        shutil.rmtree(temp_dir, ignore_errors=True)


def job_status(cluster, job_id: str) -> str:
    """The job API's status (in a child: Ray caches its auth mode when it is first imported)."""
    script = (
        "import sys; from ray.job_submission import JobSubmissionClient as Client; "
        "print(Client(sys.argv[1]).get_job_status(sys.argv[2]).value)"
    )
    done = run([sys.executable, "-c", script, cluster["address"], job_id], 120, env=cluster["env"])
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def submit(cluster, *command: str, timeout: float = 300) -> tuple[str, str]:
    """launch/submit.sh --wait; returns (job id, output)."""
    script = [str(REPO / "launch" / "submit.sh"), "--address", cluster["address"], "--wait"]
    done = run([*script, "--", *command], timeout=timeout, env=cluster["env"])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    job_id = re.search(r"^submitted job (\S+) to ", done.stdout, re.M).group(1)
    assert f"ray job stop --address {cluster['address']} {job_id}" in done.stdout
    return job_id, done.stdout


def test_shard_job(cluster):
    from data_pipeline.synth import synthesize

    videos, out = cluster["root"] / "videos", cluster["root"] / "frames"
    synthesize(videos, 2, seed=3, min_size=64, max_size=80, min_seconds=1.0, max_seconds=1.5)
    job_id, output = submit(
        cluster, "shard", str(videos), "--out", str(out), "--fps", "4", "--size", "32"
    )
    assert "--address auto" in output  # joined the job's cluster, no Ray of its own
    assert job_status(cluster, job_id) == "SUCCEEDED"
    rows = pq.read_table(out / "manifest" / "videos.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok"] and all(r["n_frames"] > 0 for r in rows)
    assert sum(
        r["n_samples"] for r in pq.read_table(out / "manifest" / "shards.parquet").to_pylist()
    ) == sum(r["n_frames"] for r in rows)


def test_training_job_on_ray_train(cluster, tmp_path):
    shards = write_shards(tmp_path / "data", n_shards=4, per_shard=16)
    config = tiny_config(tmp_path, shards, "job", stages={"steps": 6}, logging={"every": 3})
    job_id, _ = submit(cluster, "train", str(config), "--ray", "--num-workers", "1")
    assert job_status(cluster, job_id) == "SUCCEEDED"
    run_dir = tmp_path / "runs" / "job"
    assert [r["step"] for r in log_records(run_dir)] == [3, 6]
    assert (run_dir / "exports" / "step_6" / "model.safetensors").is_file()


def ray_train(cluster, config: Path, name: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "catneuron", "train", str(config), f"run.name={name}"]
    command += ["--ray", "--address", cluster["gcs"], "--num-workers", "2", *extra]
    log = (config.parent / f"{name}.log").open("w")
    return subprocess.Popen(
        command, cwd=REPO, env=cluster["env"], stdout=log, stderr=subprocess.STDOUT
    )


def train_workers(cluster) -> list[psutil.Process]:
    workers = []
    for process in cluster_processes(cluster["temp_dir"]):
        with contextlib.suppress(psutil.Error):
            if "RayTrainWorker" in " ".join(process.cmdline()):
                workers.append(process)
    return workers


def test_a_killed_ray_train_worker_is_replaced_and_the_run_ends_as_an_uninterrupted_one(
    cluster, tmp_path
):
    shards = write_shards(tmp_path / "data")
    config = tiny_config(
        tmp_path,
        shards,
        "ray",
        stages={"steps": 20},
        checkpoint={"every": 10},
        logging={"every": 2},
    )
    straight = ray_train(cluster, config, "straight")
    assert straight.wait(timeout=400) == 0, (tmp_path / "straight.log").read_text()[-4000:]

    killed = ray_train(cluster, config, "killed", "--max-restarts", "1")
    run_dir = tmp_path / "runs" / "killed"
    try:
        wait_for(lambda: latest_step(run_dir) == 10, 300, "checkpoint step_10")
        workers = wait_for(lambda: train_workers(cluster), 30, "the Ray Train workers")
        workers[-1].send_signal(signal.SIGKILL)
        killed_at, steps_at_kill = time.time(), max(r["step"] for r in log_records(run_dir))
        assert killed.wait(timeout=400) == 0, (tmp_path / "killed.log").read_text()[-4000:]
    finally:
        if killed.poll() is None:
            killed.kill()
    output = (tmp_path / "killed.log").read_text()
    assert "resuming from step_10" in output, output[-4000:]
    resumed = [r for r in log_records(run_dir) if r["time"] > killed_at]
    assert resumed and resumed[0]["step"] == 12  # logged every 2 steps from step 10 on
    final = "exports/step_20/model.safetensors"
    reference = load_file(tmp_path / "runs" / "straight" / final)
    weights = load_file(run_dir / final)
    assert reference.keys() == weights.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-6, msg=name)
    print(
        f"\nray train: {steps_at_kill - 10} step(s) lost; step 12 logged "
        f"{resumed[0]['time'] - killed_at:.1f} s after the kill"
    )
