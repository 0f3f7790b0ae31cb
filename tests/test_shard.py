"""`catneuron shard` end to end on a real local Ray cluster (one, shared by the module)."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
import wids
from PIL import Image
from test_shard_decode import PARTIAL_KINDS, make_bad_inputs, nearest_indices

from data_pipeline import synth
from data_pipeline.ray_cluster import ray_session
from data_pipeline.shard import main
from data_pipeline.shard_list import resolve_shards
from data_pipeline.sources import video_id

FPS = 2.0
ARGS = ["--fps", str(FPS), "--size", "32", "--videos-per-task", "2", "--shard-max-count", "4"]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    with ray_session(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    synth.synthesize(folder, 5, seed=7, min_size=64, max_size=96, min_seconds=1.0, max_seconds=2.5)
    return folder


def expected_keys(videos: Path, fps: float) -> list[str]:
    """Keys in the order they must appear: clip by clip, frames by the nearest-time rule."""
    rows = pq.read_table(videos / "labels.parquet").to_pylist()
    times = defaultdict(list)
    for row in rows:
        times[row["source"]].append(row["pts"])
    return [
        f"{video_id(source)}_{index:07d}"
        for source in sorted(times)
        for index in nearest_indices(times[source], fps)
    ]


def read_manifest(out: Path, name: str) -> list[dict]:
    return pq.read_table(out / "manifest" / f"{name}.parquet").to_pylist()


@pytest.fixture(scope="module")
def sharded(videos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out")
    assert main([str(videos), "--out", str(out), *ARGS]) == 0
    return out


def test_shards_hold_exactly_the_expected_frames(videos, sharded):
    shards = read_manifest(sharded, "shards")
    urls = [str(sharded / row["path"]) for row in shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    keys = expected_keys(videos, FPS)
    assert [s["__key__"] for s in samples] == keys
    assert len(shards) >= 4 and max(row["n_samples"] for row in shards) == 4

    labels = {
        (r["source"], r["frame_index"]): r
        for r in pq.read_table(videos / "labels.parquet").to_pylist()
    }
    for sample in samples:
        meta = json.loads(sample["json"])
        label = labels[meta["source"], meta["frame_index"]]
        assert sample["__key__"] == f"{meta['video_id']}_{meta['frame_index']:07d}"
        assert meta["pts"] == pytest.approx(label["pts"], abs=1e-6)
        assert (meta["src_width"], meta["src_height"], meta["fps"]) == (
            label["width"],
            label["height"],
            label["fps"],
        )
        assert Image.open(io.BytesIO(sample["jpg"])).size == (meta["width"], meta["height"])
        assert min(meta["width"], meta["height"]) == 32


def test_manifests_match_the_shards(videos, sharded):
    shards = read_manifest(sharded, "shards")
    on_disk = sorted(p.name for p in (sharded / "shards").iterdir())
    assert on_disk == sorted(
        Path(row["path"]).name for row in shards
    )  # nothing partial, nothing extra
    for row in shards:
        data = (sharded / row["path"]).read_bytes()
        assert row["bytes"] == len(data) and row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["n_samples"] == sum(
            1 for _ in wds.tarfile_samples([{"url": str(sharded / row["path"])}])
        )

    per_video = defaultdict(int)
    for key in expected_keys(videos, FPS):
        per_video[key.split("_")[0]] += 1
    rows = read_manifest(sharded, "videos")
    assert [r["source"] for r in rows] == sorted(str(p) for p in videos.glob("*.mp4"))
    assert all(r["status"] == "ok" and r["error"] is None for r in rows)
    assert {r["video_id"]: r["n_frames"] for r in rows} == per_video
    assert {p for r in rows for p in r["shards"]} == {row["path"] for row in shards}

    total = sum(per_video.values())
    index = wids.ShardListDataset(str(sharded / "manifest" / "index.wids.json"))
    assert len(index) == total and index[total - 1]["__key__"] == expected_keys(videos, FPS)[-1]
    assert sum(s.n_samples for s in resolve_shards(sharded)) == total


def test_rerun_skips_done_groups_and_overwrite_gives_the_same_bytes(videos, sharded, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in (sharded / "shards").iterdir()}
    digests = [row["sha256"] for row in read_manifest(sharded, "shards")]
    capsys.readouterr()
    assert main([str(videos), "--out", str(sharded), *ARGS]) == 0
    assert "5 ok, 0 failed, 0 skipped; 5 done before" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (sharded / "shards").iterdir()} == before

    assert main([str(videos), "--out", str(sharded), *ARGS, "--overwrite"]) == 0
    assert "0 done before" in capsys.readouterr().out
    assert [row["sha256"] for row in read_manifest(sharded, "shards")] == digests


def test_other_options_on_the_same_output_are_refused(videos, sharded, capsys):
    assert main([str(videos), "--out", str(sharded), *ARGS, "--quality", "50"]) == 2
    err = capsys.readouterr().err
    assert (
        "other options (quality)" in err
        and "--overwrite" in err
        and len(err.strip().splitlines()) == 1
    )


def test_every_bad_input_gets_a_row_and_the_job_goes_on(videos, tmp_path, capsys):
    bad = make_bad_inputs(tmp_path / "bad")
    hung = tmp_path / "bad" / "hung.mp4"
    os.mkfifo(hung)  # opening it blocks forever: a decode that never makes progress
    good = sorted(videos.glob("*.mp4"))
    listing = tmp_path / "inputs.txt"
    entries = [
        good[0],
        *(path for path, _ in bad.values()),
        hung,
        tmp_path / "bad" / "notes.txt",
        good[1],
    ]
    listing.write_text("".join(f"{path}\n" for path in entries))
    out = tmp_path / "out"
    args = [
        str(listing),
        "--out",
        str(out),
        "--size",
        "32",
        "--videos-per-task",
        "4",
        "--max-pixels",
        "65536",
    ]
    assert main([*args, "--video-timeout", "3"]) == 1

    rows = {Path(r["source"]).name: r for r in read_manifest(out, "videos")}
    assert len(rows) == len(entries)
    for kind, (path, reason) in bad.items():
        row = rows[path.name]
        assert reason in row["error"] and "\n" not in row["error"], kind
        assert row["status"] == ("ok" if kind in PARTIAL_KINDS else "failed"), kind
        assert (row["n_frames"] > 0) == (kind in PARTIAL_KINDS), kind
    assert rows["hung.mp4"]["status"] == "failed" and "timed out" in rows["hung.mp4"]["error"]
    assert rows["notes.txt"]["error"] == "not a video file extension"
    assert all(rows[p.name]["status"] == "ok" and rows[p.name]["n_frames"] > 0 for p in good[:2])

    frames = sum(r["n_frames"] for r in rows.values())
    assert sum(row["n_samples"] for row in read_manifest(out, "shards")) == frames
    captured = capsys.readouterr()
    assert "failed: " in captured.err and "Traceback" not in captured.err + captured.out
