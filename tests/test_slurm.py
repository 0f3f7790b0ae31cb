"""The Slurm scripts under stand-ins for sbatch/srun/scontrol (tests/slurm_standins.py):
two "nodes" on this machine, so that the scripts' own logic runs for real: node list
parsing, master address, node ranks, restarts of a failed step, requeue on preemption
and resume, and a Ray cluster brought up and torn down inside an allocation.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from cluster_support import (
    REPO,
    free_port,
    free_ports,
    latest_step,
    log_records,
    quiet_env,
    tiny_config,
    wait_for,
    write_shards,
)
from slurm_standins import install

pytestmark = pytest.mark.slow
NODES = "127.0.0.1,localhost"  # two node names for this machine; the first is the master


@pytest.fixture
def slurm(tmp_path):
    bin_dir, state = tmp_path / "slurm-bin", tmp_path / "slurm-state"
    install(bin_dir, state)
    env = quiet_env(
        STANDIN_NODELIST=NODES,
        STANDIN_JOB_ID="4242",
        CATNEURON=f"{sys.executable} -m catneuron",
        MASTER_PORT=str(free_port()),
        GPUS_PER_NODE="1",
    )
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return {"env": env, "state": state, "dir": tmp_path}


def srun_launches(state: Path) -> list[dict]:
    return [json.loads(line) for line in (state / "srun.jsonl").read_text().splitlines()]


def rank_with(rank: int) -> psutil.Process | None:
    """The training rank with global RANK `rank` started by this test (its stand-in env)."""
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if "pretrain.train" in (process.info["cmdline"] or []):
                env = process.environ()
                if env.get("STANDIN_JOB_ID") == "4242" and env.get("RANK") == str(rank):
                    return process
    return None


def test_train_sbatch_restarts_a_lost_node_and_requeues_on_preemption(slurm):
    # A tiny step takes about 10 ms: 200 steps leave seconds between a checkpoint the test
    # sees and the run's end, so the kill and the signal land mid-run on any machine load.
    steps = 200
    shards = write_shards(slurm["dir"] / "data")
    config = tiny_config(
        slurm["dir"],
        shards,
        "slurm",
        stages={"steps": steps},
        checkpoint={"every": 10},
        logging={"every": 1},
    )
    run = slurm["dir"] / "runs" / "slurm"
    output = slurm["dir"] / "job.out"
    job = subprocess.Popen(
        ["sbatch", str(REPO / "launch" / "slurm" / "train.sbatch"), str(config)],
        cwd=slurm["dir"],
        env=slurm["env"],
        stdout=output.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        # 1. a rank of node 1 dies: srun ends the step on both nodes, the script starts it again
        wait_for(lambda: (latest_step(run) or 0) >= 10, 300, "checkpoint step_10")
        wait_for(lambda: rank_with(1), 30, "rank 1").send_signal(signal.SIGKILL)
        wait_for(lambda: "restart 1 of 3" in output.read_text(), 120, "the restart line")
        wait_for(lambda: "resuming from step_" in output.read_text(), 120, "the resume line")
        restarted_at = int(re.findall(r"resuming from step_(\d+)", output.read_text())[0])
        # 2. preemption: USR1 to the batch shell stops the ranks and requeues the job
        target = restarted_at + 10
        wait_for(lambda: (latest_step(run) or 0) >= target, 300, f"checkpoint step_{target}")
        batch = int((slurm["state"] / "batch.pid").read_text())
        preempted_at = time.time()
        os.kill(batch, signal.SIGUSR1)
        assert job.wait(timeout=400) == 0, output.read_text()[-4000:]
    finally:
        if job.poll() is None:
            job.kill()
    text = output.read_text()
    assert "srun exit status" in text and "(a rank or node was lost); restart 1 of 3" in text
    assert "preemption signal: the ranks save at the next step boundary" in text
    assert (slurm["state"] / "requeue").read_text() == "4242\n"
    assert "job 4242 (restart count 1): 2 node(s) x 1 rank(s), master 127.0.0.1:" in text
    assert restarted_at >= 10
    # the preemption saved at the step the ranks were in: the requeued job resumes there
    stops = re.findall(r"stopped at step (\d+), checkpoint step_\d+ saved", text)
    assert stops, text[-4000:]
    saved = int(stops[0])
    assert target <= saved < steps
    assert re.findall(r"resuming from (step_\d+)", text) == [
        f"step_{restarted_at}",
        f"step_{saved}",
    ]
    assert "srun exit status 75: stopped" in text
    assert (run / "exports" / f"step_{steps}" / "model.safetensors").is_file()
    records = log_records(run)
    assert records[-1]["step"] == steps
    # from the signal on: the steps to the stop, then the requeued run from the next one
    after = [r["step"] for r in records if r["time"] > preempted_at]
    assert after == list(range(after[0], steps + 1)) and after[0] <= saved + 1  # 0 steps redone
    # three steps (first run, restart, requeued run), each one task per node with its rank
    launches = srun_launches(slurm["state"])
    assert [(launch["node"], launch["node_id"]) for launch in launches] == [
        ("127.0.0.1", 0), ("localhost", 1)
    ] * 3  # fmt: skip
    argv = launches[0]["argv"]
    assert argv[argv.index("--master-addr") + 1] == "127.0.0.1"
    hostfile = Path(argv[argv.index("--hostfile") + 1])
    assert not hostfile.exists()  # removed when the job ended well
    assert "on 2 rank(s)" in text


def test_ray_cluster_sbatch_runs_a_command_on_a_two_node_cluster(slurm):
    temp_dir = tempfile.mkdtemp(prefix="cnslr", dir="/tmp")
    p = free_ports(11)
    head_args = [
        "--num-cpus=1", "--include-dashboard=true", f"--temp-dir={temp_dir}",
        f"--dashboard-port={p[0]}", f"--ray-client-server-port={p[1]}",
        f"--dashboard-agent-listen-port={p[2]}", f"--dashboard-agent-grpc-port={p[3]}",
        f"--metrics-export-port={p[4]}", f"--runtime-env-agent-port={p[5]}",
    ]  # fmt: skip
    worker_args = [
        "--num-cpus=1", f"--dashboard-agent-listen-port={p[6]}",
        f"--dashboard-agent-grpc-port={p[7]}", f"--metrics-export-port={p[8]}",
        f"--runtime-env-agent-port={p[9]}",
    ]  # fmt: skip
    gcs_port = p[10]
    env = dict(
        slurm["env"],
        STANDIN_NODELIST="127.0.0.1,127.0.0.2",
        RAY_PORT=str(gcs_port),
        RAY_START_ARGS=" ".join(head_args),
        RAY_WORKER_START_ARGS=" ".join(worker_args),
        RAY=str(Path(sys.executable).parent / "ray"),
    )
    probe = (
        "import ray; ray.init(); "
        "print('alive nodes', sum(n['Alive'] for n in ray.nodes()), "
        "'cpus', int(ray.cluster_resources()['CPU']))"
    )
    try:
        done = subprocess.run(
            ["sbatch", str(REPO / "launch" / "slurm" / "ray_cluster.sbatch"), sys.executable, "-c", probe],
            cwd=slurm["dir"], env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "alive nodes 2 cpus" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
        launches = srun_launches(slurm["state"])
        assert [launch["node"] for launch in launches] == ["127.0.0.1", "127.0.0.2"]
        assert (
            "--head" in launches[0]["argv"]
            and "--address=127.0.0.1:" + env["RAY_PORT"] in launches[1]["argv"]
        )
        assert not list(slurm["dir"].glob(".ray-token-*"))  # the job's token is removed with it
        wait_for(lambda: not _ray_processes(temp_dir, gcs_port), 30, "the Ray processes to stop")
    finally:
        for process in _ray_processes(temp_dir, gcs_port):
            with contextlib.suppress(psutil.Error):
                process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_processes(temp_dir: str, gcs_port: int) -> list[psutil.Process]:
    """The head's processes (its temp dir) and the worker's (they name the head's GCS address)."""
    marks = (temp_dir, f"127.0.0.1:{gcs_port}")
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(m in a for a in process.info["cmdline"] or [] for m in marks):
                found.append(process)
    return found
