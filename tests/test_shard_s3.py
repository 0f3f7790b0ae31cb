"""`catneuron shard --out s3://...`, reruns, the loader and a 2-rank training, on a real S3 API.

`moto_server` (moto[server]) serves S3 on 127.0.0.1; the real s3fs client talks to it,
configured only through the environment, as a user's would be (`AWS_ENDPOINT_URL`, keys).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from cluster_support import free_port

from data_pipeline import synth

REPO = Path(__file__).resolve().parents[1]
SECRET = "catneuronSECRETkey0123456789"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("moto_server") is None and not (
        Path(sys.executable).parent / "moto_server").exists(), reason="moto[server] not installed"),
]  # fmt: skip


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory) -> dict[str, str]:
    """A moto S3 server on a free loopback port and the environment that points at it."""
    port = free_port()
    binary = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    server = subprocess.Popen(
        [binary, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "catneuron-test",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import s3fs

        deadline = time.monotonic() + 60
        while True:
            try:
                s3fs.S3FileSystem(skip_instance_cache=True).mkdir("frames-bucket")
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.3)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def s3() -> object:
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def shard(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "data_pipeline.shard", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def s3_table(url: str) -> list[dict]:
    with s3().open(url, "rb") as f:
        return pq.read_table(f).to_pylist()


@pytest.fixture(scope="module")
def sharded(s3_env, tmp_path_factory) -> tuple[Path, str, subprocess.CompletedProcess]:
    videos = tmp_path_factory.mktemp("videos")
    synth.synthesize(videos, 6, seed=2, min_size=64, max_size=80, min_seconds=1.0, max_seconds=2.0)
    url = "s3://frames-bucket/run1/frames"
    args = [str(videos), "--out", url, "--fps", "4", "--size", "32", "--crop", "center"]
    done = shard(*args, "--shard-max-count", "8", "--num-workers", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    return videos, url, done


def test_shards_and_manifests_land_whole_under_their_names(sharded):
    videos, url, done = sharded
    keys = s3().find(url.removeprefix("s3://"))
    assert not [k for k in keys if k.endswith(".tmp") or ".write-check" in k], keys
    shards = s3_table(f"{url}/manifest/shards.parquet")
    listed = sorted(k.rsplit("/", 1)[1] for k in keys if k.endswith(".tar"))
    assert listed == sorted(Path(r["path"]).name for r in shards) and len(listed) >= 3
    fs = s3()
    for row in shards:
        assert fs.info(f"{url}/{row['path']}")["size"] == row["bytes"]
    rows = s3_table(f"{url}/manifest/videos.parquet")
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    assert sum(r["n_samples"] for r in shards) == sum(r["n_frames"] for r in rows)
    for key in keys:  # credentials are nowhere in the output, nor on the console
        if key.endswith((".parquet", ".json")):
            assert SECRET.encode() not in fs.cat_file(key)
    assert SECRET not in done.stdout + done.stderr


def test_rerun_skips_and_overwrite_rewrites_the_same_bytes(sharded):
    videos, url, _ = sharded
    args = [str(videos), "--out", url, "--fps", "4", "--size", "32", "--crop", "center"]
    args += ["--shard-max-count", "8", "--num-workers", "2"]
    before = {k: s3().info(k)["ETag"] for k in s3().find(url.removeprefix("s3://") + "/shards")}
    again = shard(*args)
    assert again.returncode == 0 and "6 done before" in again.stdout, again.stderr[-3000:]
    after = {k: s3().info(k)["ETag"] for k in s3().find(url.removeprefix("s3://") + "/shards")}
    assert after == before
    digests = [r["sha256"] for r in s3_table(f"{url}/manifest/shards.parquet")]
    redone = shard(*args, "--overwrite")
    assert redone.returncode == 0 and "0 done before" in redone.stdout, redone.stderr[-3000:]
    assert [r["sha256"] for r in s3_table(f"{url}/manifest/shards.parquet")] == digests


def test_the_loader_reads_the_same_frames_from_s3_as_from_disk(sharded, tmp_path):
    from data_pipeline.loader import frame_loader

    videos, url, _ = sharded
    local = tmp_path / "local"
    done = shard(str(videos), "--out", str(local), "--fps", "4", "--size", "32", "--crop",
                 "center", "--shard-max-count", "8", "--num-workers", "2")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    options = {"batch_size": 4, "drop_last": False}
    from_s3 = [k for b in frame_loader(url, **options) for k in b["key"]]
    from_disk = [k for b in frame_loader(local, **options) for k in b["key"]]
    assert from_s3 == from_disk and len(set(from_s3)) > 20
    per_rank = [
        [k for b in frame_loader(url, rank=r, world_size=2, **options) for k in b["key"]]
        for r in (0, 1)
    ]
    assert len(per_rank[0]) == len(per_rank[1])  # equal steps on every rank


def test_two_rank_training_reads_its_shards_from_s3(sharded, tmp_path):
    _, url, _ = sharded
    config = yaml.safe_load((REPO / "configs" / "tiny" / "conv_ae.yaml").read_text())
    config["data"].update(source=url, batch_size=4, resize=32, crop=32)
    config["run"].update(output_dir=str(tmp_path / "runs"), name="s3")
    config["stages"] = {"steps": 6}
    config["checkpoint"] = {"every": 6, "keep_last": 1}
    config["logging"] = {"every": 2, "image_every": 100}
    path = tmp_path / "s3.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "catneuron", "train", str(path), "--num-gpus", "2",
               "--master-port", str(free_port())]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "on 2 rank(s)" in output
    assert SECRET not in output
