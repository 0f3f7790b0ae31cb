"""`catneuron shard` on a two-node Ray cluster, and resumed after its driver is SIGKILLed.

Each run is its own process with its own Ray cluster, as a user's would be.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_pipeline import synth

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_shard(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "data_pipeline.shard", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def member_names(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return tar.getnames()


def manifest_rows(out: Path, name: str) -> list[dict]:
    return pq.read_table(out / "manifest" / f"{name}.parquet").to_pylist()


def test_two_node_cluster(tmp_path):
    videos = tmp_path / "videos"
    synth.synthesize(videos, 6, seed=11, min_size=64, max_size=96, min_seconds=1.0, max_seconds=2.0)
    script = textwrap.dedent(
        f"""
        import ray
        from ray.cluster_utils import Cluster
        from data_pipeline.shard import main

        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1, "include_dashboard": False}})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        args = ["{videos}", "--out", "{tmp_path / "out"}", "--address", cluster.address,
                "--every", "5", "--size", "32", "--videos-per-task", "1"]
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        nodes = sum(node["Alive"] for node in ray.nodes())
        ray.shutdown()
        code = main(args)
        print("nodes", nodes, "exit", code)
        cluster.shutdown()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=240
    )
    assert "nodes 2 exit 0" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
    rows = manifest_rows(tmp_path / "out", "videos")
    labels = pq.read_table(videos / "labels.parquet").to_pylist()
    frames_per_clip = {}
    for label in labels:
        frames_per_clip[label["source"]] = frames_per_clip.get(label["source"], 0) + 1
    assert {r["source"]: r["n_frames"] for r in rows} == {
        s: (n + 4) // 5 for s, n in frames_per_clip.items()
    }
    assert sum(r["n_samples"] for r in manifest_rows(tmp_path / "out", "shards")) == sum(
        r["n_frames"] for r in rows
    )


def test_sigkill_of_the_driver_then_rerun_equals_an_uninterrupted_run(tmp_path):
    videos = tmp_path / "videos"
    synth.synthesize(videos, 16, seed=5, min_size=64, max_size=96, min_seconds=1.5, max_seconds=3.0)
    args = ["--every", "1", "--size", "48", "--videos-per-task", "1", "--num-workers", "1"]
    killed = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "data_pipeline.shard",
        str(videos),
        "--out",
        str(killed),
        *args,
    ]
    driver = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        parts = killed / "manifest" / "groups"
        deadline = time.monotonic() + 120
        while len(list(parts.glob("*.videos.parquet"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        time.sleep(2)  # Ray's own processes notice their driver is gone; end any that stay
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    finished = len(list(parts.glob("*.videos.parquet")))
    assert 2 <= finished < 16 and not (killed / "manifest" / "videos.parquet").exists()
    for shard in (killed / "shards").glob("*.tar"):  # what a reader can see is whole
        names = member_names(shard)
        assert names and len(names) % 2 == 0 and all(n.endswith((".jpg", ".json")) for n in names)

    resumed = run_shard(str(videos), "--out", str(killed), *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{finished} done before" in resumed.stdout
    reference = run_shard(str(videos), "--out", str(tmp_path / "reference"), *args)
    assert reference.returncode == 0, reference.stderr[-3000:]

    assert manifest_rows(killed, "shards") == manifest_rows(tmp_path / "reference", "shards")
    assert manifest_rows(killed, "videos") == manifest_rows(tmp_path / "reference", "videos")
    listing = sorted(p.name for p in (killed / "shards").iterdir())
    assert listing == sorted(p.name for p in (tmp_path / "reference" / "shards").iterdir())
    keys = [
        name for shard in sorted((killed / "shards").glob("*.tar")) for name in member_names(shard)
    ]
    assert (
        len(keys)
        == len(set(keys))
        == 2 * sum(r["n_frames"] for r in manifest_rows(killed, "videos"))
    )


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _alive(processes: list) -> list:
    import psutil

    left = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                left.append(process)
    return left


def test_local_cluster_listens_on_loopback_only_and_ends_with_a_killed_driver(tmp_path):
    import psutil

    videos = tmp_path / "videos"
    synth.synthesize(videos, 12, seed=4, min_size=64, max_size=96, min_seconds=2.0, max_seconds=3.0)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "data_pipeline.shard", str(videos), "--out", str(out),
               "--every", "1", "--size", "48", "--num-workers", "2"]  # fmt: skip
    log = tmp_path / "driver.log"
    with log.open("w") as sink:
        driver = subprocess.Popen(
            command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    seen: dict[int, psutil.Process] = {}
    listening: dict[int, set[str]] = {}
    try:
        deadline = time.monotonic() + 180
        parts = out / "manifest" / "groups"
        while time.monotonic() < deadline and driver.poll() is None:
            with contextlib.suppress(psutil.Error):
                seen.update({p.pid: p for p in psutil.Process(driver.pid).children(recursive=True)})
            for conn in psutil.net_connections("inet"):
                if conn.status == psutil.CONN_LISTEN and conn.pid in seen:
                    listening.setdefault(conn.pid, set()).add(conn.laddr.ip)
            if len(listening) >= 4 and (parts.is_dir() and any(parts.glob("*.progress"))):
                break  # tasks are running: every kind of process is up
            time.sleep(0.2)
        assert driver.poll() is None, f"ended before it could be watched: {log.read_text()}"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        killed_at = time.monotonic()
        # GCS, raylet, task workers, agents: each has a port, and every one is on loopback
        assert len(listening) >= 4, listening
        assert set().union(*listening.values()) <= LOOPBACK, listening
        while _alive(list(seen.values())) and time.monotonic() - killed_at < 20:
            time.sleep(0.2)
        left = [(p.pid, p.name()) for p in _alive(list(seen.values()))]
        assert not left, f"alive {time.monotonic() - killed_at:.1f} s after the driver: {left}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        for process in _alive(list(seen.values())):
            with contextlib.suppress(psutil.Error):
                process.kill()
