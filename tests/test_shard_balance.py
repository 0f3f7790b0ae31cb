"""`catneuron shard` around the decoder: fixed cost, groups, remembered failures, early errors.

The first tests need no Ray at all (imports, grouping, the checks made before a cluster
starts); the rest share one local cluster.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cluster_support import free_port
from test_shard_decode import make_bad_inputs

from data_pipeline import ray_cluster, synth
from data_pipeline.shard import main
from data_pipeline.shard_groups import auto_group_size, cut_groups, named_groups

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "webdataset", "ray", "pyarrow", "av", "PIL", "deepspeed")


def imported_after(statement: str) -> list[str]:
    """Heavy top-level modules a fresh interpreter holds after `statement`."""
    code = f"import sys\n{statement}\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return eval(done.stdout.strip().splitlines()[-1])


def test_help_imports_nothing_heavy():
    statement = (
        "import contextlib, io\nfrom catneuron.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['shard', '--help'])"
    )
    assert imported_after(statement) == []


def test_a_worker_imports_no_torch_webdataset_or_pyarrow():
    assert imported_after("import data_pipeline.shard_task") == ["PIL", "av"]


def test_manifests_are_written_and_read_without_pandas():
    """pyarrow's Python-object constructors import pandas (0.3 s of every driver)."""
    statement = (
        "from data_pipeline.manifest import VideoRow, schemas, table_bytes, read_table\n"
        "from dataclasses import asdict\n"
        "rows = [asdict(VideoRow('/a.mp4', 'x', n_frames=3, duration=1 / 3, shards=['s']))]\n"
        "assert read_table(table_bytes(rows, schemas()[0]), schemas()[0]).to_pylist() == rows\n"
        "import sys; assert 'pandas' not in sys.modules, 'pandas imported'"
    )
    assert imported_after(statement) == ["pyarrow"]


def test_manifest_bytes_equal_pyarrows_own_table_builder():
    import io

    import pyarrow as pa

    from data_pipeline.manifest import schemas, table_bytes

    videos, shards = schemas()
    rows = [
        dict(source="/a/\u00fc b.mp4", video_id="x" * 12, status="ok", error=None, n_frames=3,
             duration=1 / 3, shards=["shards/g1-000000.tar", "q"], src_width=720,
             src_height=640, fps=30000 / 1001),
        dict(source='s3://b/c"d\\e.mkv', video_id="y", status="failed", error="bad\nline",
             n_frames=0, duration=None, shards=[], src_width=None, src_height=None, fps=None),
        dict(source="z", video_id="z", status="ok", error=None, n_frames=10**12,
             duration=float("nan"), shards=["a"], src_width=1, src_height=2, fps=0.1 + 0.2),
    ]  # fmt: skip
    shard_rows = [dict(path="shards/g-000000.tar", n_samples=5, bytes=1234, sha256="ab" * 32)]

    def reference(rows: list[dict], schema) -> bytes:
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
        return buffer.getvalue()

    for part, schema in ((rows, videos), (rows[:2], videos), (rows[:2] * 3000, videos),
                         ([], videos), (shard_rows, shards)):  # fmt: skip
        assert table_bytes(part, schema) == reference(part, schema)


def test_groups_are_sized_from_the_input_count():
    assert auto_group_size(24, 2) == 2  # 12 groups on average: 6 per worker
    assert auto_group_size(9, 2) == 1
    assert auto_group_size(10**4, 2) == 256  # short clips: shards of MBs, not 0.2 MB
    assert auto_group_size(10**6, 100) == 256  # never larger
    sources = [f"/v/{k}.mp4" for k in range(1000)]
    groups = list(cut_groups(sources, 8))
    assert [s for g in groups for s in g] == sources
    assert max(map(len, groups)) <= 16 and 80 <= len(groups) <= 180  # mean about 8
    assert [len(g) for g in cut_groups(sources[:5], 1)] == [1] * 5


def test_an_inserted_input_changes_only_its_own_groups():
    sources = [f"/v/{k}.mp4" for k in range(400)]
    before = dict(named_groups(sources, 4))
    after = dict(named_groups([*sources[:10], "/v/new.mp4", *sources[10:]], 4))
    assert len(before) >= 60
    # the group it joins, and (where that group was cut at the 2g cap) those up to the
    # next content cut: 3 here, of about 100
    assert len(set(before) - set(after)) <= 3
    assert all(before[name] == after[name] for name in set(before) & set(after))


def forbid_cluster(monkeypatch) -> None:
    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(ray_cluster, "ray_session", no_cluster)


def assert_one_line_error(capsys, *words: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("catneuron shard: ") and all(w in err for w in words), err


def test_unwritable_out_is_one_line_before_the_cluster(tmp_path, capsys, monkeypatch):
    forbid_cluster(monkeypatch)
    (tmp_path / "v.mp4").write_bytes(b"x")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main([str(tmp_path / "v.mp4"), "--out", str(blocker / "out")]) == 2
    assert_one_line_error(capsys, "--out", str(blocker), "Not a directory")


def test_address_that_does_not_answer_is_one_line_before_the_cluster(tmp_path, capsys, monkeypatch):
    forbid_cluster(monkeypatch)
    (tmp_path / "v.mp4").write_bytes(b"x")
    address = f"127.0.0.1:{free_port()}"
    started = time.perf_counter()
    assert main([str(tmp_path / "v.mp4"), "--out", str(tmp_path / "o"), "--address", address]) == 2
    assert time.perf_counter() - started < 10
    assert_one_line_error(capsys, address, "no Ray cluster answers")


def test_inputs_that_name_nothing_are_one_line_before_the_cluster(tmp_path, capsys, monkeypatch):
    forbid_cluster(monkeypatch)
    (tmp_path / "empty").mkdir()
    (tmp_path / "list.txt").write_text("# nothing here\n\n")
    for inputs in (
        [str(tmp_path / "empty")],
        [str(tmp_path / "list.txt")],
        [str(tmp_path / "*.mp4")],
    ):
        assert main([*inputs, "--out", str(tmp_path / "o")]) == 2
        assert_one_line_error(capsys, inputs[0], "names no video")


# --------------------------------------------------------------------------- on a local cluster


@pytest.fixture(scope="module")
def cluster():
    with ray_cluster.ray_session(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[Path], list[Path]]:
    """9 short clips and 3 broken files."""
    folder = tmp_path_factory.mktemp("corpus")
    synth.synthesize(folder, 9, seed=3, min_size=48, max_size=64, min_seconds=0.6, max_seconds=1.0)
    bad = make_bad_inputs(folder / "bad")
    broken = [bad[kind][0] for kind in ("empty", "text", "audio_only")]
    return sorted(folder.glob("*.mp4")), broken


def part_times(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "manifest" / "groups").glob("*.parquet")}


def rows(out: Path, name: str) -> list[dict]:
    return pq.read_table(out / "manifest" / f"{name}.parquet").to_pylist()


ARGS = ["--every", "4", "--size", "32", "--num-workers", "2"]


def write_list(path: Path, entries: list[Path]) -> Path:
    path.write_text("".join(f"{e}\n" for e in entries))
    return path


def test_groups_keep_every_worker_busy(cluster, corpus, tmp_path, capsys):
    good, _ = corpus
    out = tmp_path / "out"
    assert main([*map(str, good), "--out", str(out), *ARGS]) == 0
    groups = {Path(r["path"]).name.split("-")[0] for r in rows(out, "shards")}
    assert len(groups) == 9  # 9 videos, 2 workers: one per task, not one task of 16
    assert "shards (median" in capsys.readouterr().out


def test_failed_videos_are_remembered_and_retried_only_when_asked(
    cluster, corpus, tmp_path, capsys
):
    good, broken = corpus
    listing = write_list(tmp_path / "list.txt", [*good[:4], broken[0], *good[4:6], *broken[1:]])
    out = tmp_path / "out"
    argv = [str(listing), "--out", str(out), *ARGS, "--videos-per-task", "2"]
    assert main(argv) == 1
    first = part_times(out)
    shards_before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    capsys.readouterr()

    assert main(argv) == 1  # still failed, but nothing was opened again
    summary = capsys.readouterr().out
    assert "9 done before, 3 failed before and not retried" in summary
    assert part_times(out) == first
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == shards_before

    assert main([*argv, "--retry-failed"]) == 1  # broken files stay broken
    redone = {name.split(".")[0] for name, t in part_times(out).items() if first[name] != t}
    sources = [str(p) for p in [*good[:4], broken[0], *good[4:6], *broken[1:]]]
    holding_failures = {
        name for name, group in named_groups(sources, 2) if set(group) & set(map(str, broken))
    }
    assert redone == holding_failures and len(holding_failures) < len(first) // 2
    statuses = [r["status"] for r in rows(out, "videos")]
    assert statuses.count("failed") == 3 and statuses.count("ok") == 6


def test_an_inserted_input_redoes_only_its_group(cluster, corpus, tmp_path):
    good, _ = corpus
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    argv = ["--out", str(out), *ARGS, "--videos-per-task", "2"]
    assert main([str(write_list(tmp_path / "a.txt", good[1:])), *argv]) == 0
    first = part_times(out)
    longer = write_list(tmp_path / "b.txt", good)  # one video inserted at the front
    assert main([str(longer), *argv]) == 0
    kept = {name for name, t in part_times(out).items() if first.get(name) == t}
    assert len(kept) >= len(first) - 4  # the videos part and shards part of at most 2 groups
    assert main([str(longer), "--out", str(fresh), *ARGS, "--videos-per-task", "2"]) == 0
    assert rows(out, "shards") == rows(fresh, "shards")
    assert rows(out, "videos") == rows(fresh, "videos")
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(
        p.name for p in (fresh / "shards").iterdir()
    )
