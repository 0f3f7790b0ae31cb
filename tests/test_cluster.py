"""`catneuron cluster up | status | down`: a local head that later commands join.

One slow test walks the whole life of a cluster through the real console script: up,
status, a tiny `catneuron shard` that joins it (and starts no cluster of its own), a plain
`ray job submit` against its job API, then down, after which none of its processes is left
and its GCS port no longer answers.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_support import free_ports

CATNEURON = [sys.executable, "-m", "catneuron"]
RAY = str(Path(sys.executable).with_name("ray"))


def _run(command, env, timeout=240):
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cluster_up_status_shard_submit_down(tmp_path):
    from catneuron.cluster import _pids_of
    from data_pipeline.ray_cluster import _answers
    from data_pipeline.synth import synthesize

    synthesize(tmp_path / "videos", 1, seed=0, min_size=64, max_size=64, max_seconds=2.0)
    env = {**os.environ, "CATNEURON_CLUSTER_FILE": str(tmp_path / "cluster.json")}
    env.pop("CATNEURON_RAY_ADDRESS", None)
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = free_ports(2)
    up = [*CATNEURON, "cluster", "up", "--num-cpus", "2", "--port", str(gcs)]
    run = _run([*up, "--dashboard-port", str(dashboard)], env)
    assert run.returncode == 0, run.stderr[-3000:]
    state = json.loads((tmp_path / "cluster.json").read_text())
    try:
        assert state["gcs_address"].startswith("127.0.0.1:")
        assert state["dashboard_url"].startswith("http://127.0.0.1:")
        status = _run([*CATNEURON, "cluster", "status"], env, timeout=60)
        assert status.returncode == 0 and "up at " + state["gcs_address"] in status.stdout
        again = _run(up, env, timeout=60)  # a second `up` finds it and starts nothing
        assert again.returncode == 0 and "already up" in again.stdout

        started = time.perf_counter()
        shard = _run(
            [*CATNEURON, "shard", str(tmp_path / "videos"), "--out", str(tmp_path / "frames"),
             "--num-workers", "1", "--fps", "1", "--size", "32"],
            env,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        assert shard.returncode == 0, shard.stderr[-3000:]
        assert f"ray: joined the cluster at {state['gcs_address']}" in shard.stderr
        assert "local cluster on" not in shard.stderr, "shard started a cluster of its own"
        assert list((tmp_path / "frames").rglob("*.tar")), "no shard written"
        print(f"shard on the running cluster: {seconds:.2f} s")

        job_env = {**env, "RAY_AUTH_MODE": "token"}
        (tmp_path / "job").mkdir()
        for _ in range(20):  # the job agent registers a few seconds after the head starts
            job = _run(
                [RAY, "job", "submit", "--address", state["dashboard_url"],
                 "--working-dir", str(tmp_path / "job"), "--", "python", "-c", "print('job ran')"],
                job_env,
            )  # fmt: skip
            if "No available agent" not in job.stderr + job.stdout:
                break
            time.sleep(2)
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        assert "job ran" in job.stdout and "succeeded" in job.stdout
    finally:
        down = _run([*CATNEURON, "cluster", "down"], env, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not (tmp_path / "cluster.json").exists()
    assert _pids_of(state["token"]) == []
    assert not _answers(state["gcs_address"])
    status = _run([*CATNEURON, "cluster", "status"], env, timeout=60)
    assert status.returncode == 1 and "down" in status.stdout
