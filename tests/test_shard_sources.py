"""Input expansion: directories, globs, list files, tables, URLs; lazy and in a stable order."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.sources import canonical_source, iter_sources, video_id


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for name in ["b/2.mp4", "b/1.MKV", "a/z/3.webm", "a/notes.txt", "0.mov", "a/cover.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_directory_is_searched_recursively_by_extension_in_sorted_order(tree):
    expected = [str(tree / n) for n in ["0.mov", "a/z/3.webm", "b/1.MKV", "b/2.mp4"]]
    assert list(iter_sources([str(tree)])) == expected
    assert list(iter_sources([f"file://{tree}"])) == expected


def test_globs_and_videos_named_directly(tree, monkeypatch):
    monkeypatch.chdir(tree)
    assert list(iter_sources(["b/*.mp4", "0.mov"])) == [str(tree / "b/2.mp4"), str(tree / "0.mov")]
    assert list(iter_sources([f"file://{tree}/**/*.webm"])) == [str(tree / "a/z/3.webm")]


def test_list_file_entries_are_relative_to_the_list(tree):
    listing = tree / "a" / "list.txt"
    listing.write_text("# videos\nz/3.webm\n\n/abs/elsewhere.mp4\nhttps://host/v.mp4\n../0.mov\n")
    assert list(iter_sources([str(listing)])) == [
        str(tree / "a/z/3.webm"),
        "/abs/elsewhere.mp4",
        "https://host/v.mp4",
        str(tree / "0.mov"),
    ]


def test_parquet_and_csv_tables_with_a_source_column(tree):
    sources = [str(tree / "0.mov"), "b/2.mp4"]
    pq.write_table(pa.table({"source": sources, "other": [1, 2]}), tree / "t.parquet")
    (tree / "t.csv").write_text("other,source\n1," + sources[0] + "\n2,b/2.mp4\n")
    expected = [str(tree / "0.mov"), str(tree / "b/2.mp4")]
    assert list(iter_sources([str(tree / "t.parquet")])) == expected
    assert list(iter_sources([str(tree / "t.csv")])) == expected
    pq.write_table(pa.table({"path": sources}), tree / "bad.parquet")
    with pytest.raises(ValueError, match="no 'source' column"):
        list(iter_sources([str(tree / "bad.parquet")]))


def test_inputs_are_read_lazily(tree):
    """The first sources come out before a long list is read to its end."""
    listing = tree / "many.txt"
    listing.write_text("".join(f"/v/{k}.mp4\n" for k in range(100_000)))
    with listing.open("ab") as f:
        f.write(b"\xff\xfe not utf-8, read only by a consumer that gets this far\n")
    assert list(itertools.islice(iter_sources([str(listing)]), 3)) == [
        "/v/0.mp4",
        "/v/1.mp4",
        "/v/2.mp4",
    ]


def test_missing_input_is_passed_on_to_fail_as_a_row(tmp_path):
    assert list(iter_sources([str(tmp_path / "gone.mp4")])) == [str(tmp_path / "gone.mp4")]
    assert list(iter_sources([str(tmp_path / "nothing-*.mp4")])) == []


def test_canonical_source_and_video_id(tree, monkeypatch):
    monkeypatch.chdir(tree)
    assert (
        canonical_source("b/2.mp4")
        == canonical_source(f"file://{tree}/b/2.mp4")
        == str(tree / "b/2.mp4")
    )
    assert canonical_source("s3://bucket/x.mp4") == "s3://bucket/x.mp4"
    source = str(tree / "b/2.mp4")
    assert video_id(source) == hashlib.sha1(source.encode()).hexdigest()[:16]
    assert len(video_id(source)) == 16 and "." not in video_id(source)
