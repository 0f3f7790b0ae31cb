"""What the launch, restart, Ray and Slurm tests share: tiny shards, tiny configs, ports, logs.

The shards are written directly with webdataset (smooth random 64x64 frames with the
members DESIGN.md specifies) instead of through `catneuron shard`: the sharding path has
its own tests, and a Ray cluster per test module would cost 20-30 s on a busy 2-core machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import webdataset as wds
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports: every socket is held until all are bound (one at a time,
    the kernel may hand the same port out twice, and Ray refuses a port given to two of
    its components)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def write_shards(out: Path, n_shards: int = 8, per_shard: int = 32, size: int = 64) -> Path:
    """`n_shards` WebDataset shards of smooth random RGB frames (blurred noise, so an AE can learn)."""
    rng = np.random.default_rng(0)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        source = f"synthetic://clip{s}"
        video_id = hashlib.sha1(source.encode()).hexdigest()[:16]
        with wds.TarWriter(str(out / "shards" / f"g{s:06d}-000000.tar")) as sink:
            for i in range(per_shard):
                coarse = rng.random((8, 8, 3))
                frame = np.kron(coarse, np.ones((size // 8, size // 8, 1)))
                image = Image.fromarray((frame * 255).astype(np.uint8))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                meta = {
                    "video_id": video_id, "source": source, "frame_index": i, "pts": i / 10,
                    "width": size, "height": size, "src_width": size, "src_height": size,
                    "fps": 10.0,
                }  # fmt: skip
                sink.write(
                    {"__key__": f"{video_id}_{i:07d}", "jpg": buffer.getvalue(), "json": meta}
                )
    return out / "shards"


def tiny_config(tmp_path: Path, shards: Path, name: str = "run", **sections) -> Path:
    """configs/tiny/conv_ae.yaml on `shards`, writing under `tmp_path/runs/<name>`."""
    config = yaml.safe_load((REPO / "configs" / "tiny" / "conv_ae.yaml").read_text())
    config["data"]["source"] = str(shards)
    config["run"].update(output_dir=str(tmp_path / "runs"), name=name)
    config["logging"].update(image_every=0)
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def log_records(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def latest_step(run: Path) -> int | None:
    pointer = run / "checkpoints" / "latest"
    return int(pointer.read_text().strip().removeprefix("step_")) if pointer.is_file() else None


def wait_for(predicate, timeout: float, what: str, poll: float = 0.1):
    """Poll `predicate` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def quiet_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: CPU only, one thread, the venv first on PATH."""
    env = dict(os.environ)
    env.update(
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
        PATH=os.pathsep.join((str(VENV_BIN), env.get("PATH", ""))),
    )
    env.update(extra)
    return env


def run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", quiet_env())
    return subprocess.run(
        cmd, cwd=kwargs.pop("cwd", REPO), capture_output=True, text=True, timeout=timeout, **kwargs
    )
