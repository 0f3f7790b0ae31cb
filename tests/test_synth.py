"""The synthetic video source: decodable clips, exact labels, determinism, atomic writes."""

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipeline.synth import Scene, main, plan_clips, render_still, synthesize

SMALL = {"max_seconds": 2.5}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three small runs: seed 3 twice (into different directories) and seed 4 once."""
    root = tmp_path_factory.mktemp("synth")
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        synthesize(root / name, 4, seed, **SMALL)
    return root


def labels(directory, drop_source=True):
    table = pq.read_table(directory / "labels.parquet")
    return table.drop(["source"]) if drop_source else table


def decode(path):
    """The stream's facts and its frames, read while the container is open (PyAV 18.1.1
    refuses stream attributes after close)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        facts = {
            "codec": stream.codec_context.name,
            "pix_fmt": stream.format.name,
            "size": (stream.width, stream.height),
            "fps": float(stream.average_rate),
        }
        return facts, list(container.decode(stream))


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_clip_decodes_to_one_frame_per_label_row(runs):
    table = labels(runs / "a", drop_source=False).to_pylist()
    assert sorted(p.name for p in (runs / "a").iterdir()) == [
        *(f"clip_{i:05d}.mp4" for i in range(4)),
        "labels.parquet",
    ]
    for clip in sorted({row["clip"] for row in table}):
        rows = [row for row in table if row["clip"] == clip]
        facts, frames = decode(runs / "a" / clip)
        assert facts["codec"] == "h264" and facts["pix_fmt"] == "yuv420p"
        assert facts["size"] == (rows[0]["width"], rows[0]["height"])
        assert facts["fps"] == rows[0]["fps"]
        assert rows[0]["source"] == str((runs / "a" / clip).resolve())
        assert len(frames) == len(rows) >= 2
        assert [row["frame_index"] for row in rows] == list(range(len(rows)))
        for frame, row in zip(frames, rows, strict=True):
            assert abs(float(frame.time) - row["pts"]) < 0.5 / row["fps"]


def test_same_seed_gives_same_bytes_and_labels_and_another_seed_differs(runs):
    assert labels(runs / "a").equals(labels(runs / "b"))
    for clip in sorted((runs / "a").glob("clip_*.mp4")):
        assert digest(clip) == digest(runs / "b" / clip.name)
    assert not labels(runs / "a").equals(labels(runs / "c"))
    assert digest(runs / "a" / "clip_00000.mp4") != digest(runs / "c" / "clip_00000.mp4")


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_concept_fraction_is_respected(fraction):
    specs = plan_clips(200, 11, concept_fraction=fraction)
    assert sum(spec.concept for spec in specs) == round(200 * fraction)
    sizes = {(s.width, s.height) for s in specs}
    assert len(sizes) > 50 and all(96 <= w <= 192 and w % 2 == 0 for w, _ in sizes)
    assert {float(s.fps) for s in specs} == {10.0, 15.0, 24.0, 25.0, 30.0}


def test_concept_clips_show_the_face_in_one_stretch_and_others_never(runs):
    table = labels(runs / "a").to_pylist()
    flags = {}
    for row in table:
        flags.setdefault((row["clip"], row["has_concept"]), []).append(row["concept"])
    assert sorted(has for _, has in flags) == [False, False, True, True]
    for (_, has_concept), shown in flags.items():
        if not has_concept:
            assert not any(shown)
            continue
        first, count = shown.index(True), sum(shown)
        assert 0 < count < len(shown) and all(shown[first : first + count])
    for row in table:
        assert (row["x0"] is None) == (not row["concept"])
        if row["concept"]:
            assert 0 <= row["x0"] < row["x1"] <= row["width"]
            assert 0 <= row["y0"] < row["y1"] <= row["height"]


@pytest.mark.parametrize(
    "seed,width,height", [(0, 96, 96), (1, 192, 108), (2, 320, 240), (5, 1280, 720)]
)
def test_label_box_is_exactly_where_the_face_changes_pixels(seed, width, height):
    scene = Scene(width, height, 10, seed, concept=True)
    index = scene.face.first
    with_face, box = scene.render(index)
    without_face, no_box = scene.render(index, face=False)
    assert no_box is None and box is not None
    x0, y0, x1, y1 = box
    changed = np.abs(with_face.astype(int) - without_face.astype(int)).sum(axis=2) > 0
    ys, xs = np.nonzero(changed)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == box
    assert changed[y0:y1, x0:x1].mean() > 0.3
    assert np.abs(with_face[y0:y1, x0:x1].astype(int) - without_face[y0:y1, x0:x1]).mean() > 20


def test_stored_frames_show_the_face_inside_the_box(runs):
    """Inside the label box, the decoded frame matches the render with the face, not without."""
    table = labels(runs / "a").to_pylist()
    specs = {spec.name: spec for spec in plan_clips(4, 3, **SMALL)}
    for clip in (name for name, spec in specs.items() if spec.concept):
        spec, rows = specs[clip], [row for row in table if row["clip"] == clip]
        _, frames = decode(runs / "a" / clip)
        scene = Scene(spec.width, spec.height, len(rows), spec.seed, concept=True)
        for row in [row for row in rows if row["concept"]][::5]:
            index, (x0, y0, x1, y1) = row["frame_index"], (row[k] for k in ("x0", "y0", "x1", "y1"))
            stored = frames[index].to_ndarray(format="rgb24")[y0:y1, x0:x1].astype(int)
            error_with = np.abs(stored - scene.render(index)[0][y0:y1, x0:x1]).mean()
            error_without = np.abs(stored - scene.render(index, face=False)[0][y0:y1, x0:x1]).mean()
            assert error_without > 2 * error_with and error_without - error_with > 10


def test_render_still_has_a_face_only_when_asked():
    image, box = render_still(128, 128, 7, cat=True)
    assert image.shape == (128, 128, 3) and box is not None
    assert render_still(128, 128, 7, cat=False)[1] is None


def test_main_prints_a_summary_and_removes_stale_clips(tmp_path, capsys):
    out = tmp_path / "videos"
    assert main(["--out", str(out), "--videos", "3", "--max-seconds", "2"]) == 0
    assert main(["--out", str(out), "--videos", "2", "--max-seconds", "2"]) == 0
    assert sorted(p.name for p in out.glob("*.mp4")) == ["clip_00000.mp4", "clip_00001.mp4"]
    assert set(labels(out)["clip"].to_pylist()) == {"clip_00000.mp4", "clip_00001.mp4"}
    assert "synth: 2 clips (1 with the cat face)" in capsys.readouterr().out.splitlines()[-1]


def test_bad_arguments_fail_with_one_line(tmp_path, capsys):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert main(["--out", str(not_a_dir)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"catneuron synth: {not_a_dir}: exists and is not a directory"
    )
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--fps-choices", "25,abc"])
    assert "not a comma-separated list of frame rates" in capsys.readouterr().err


def test_a_killed_writer_never_leaves_a_clip_under_its_final_name(tmp_path):
    code = (
        "from data_pipeline.synth import write_clip\n"
        f"write_clip({str(tmp_path / 'big.mp4')!r}, width=1280, height=720, fps=30, seconds=60, seed=0)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[1])
    partial = tmp_path / ".big.mp4.partial"
    deadline = time.monotonic() + 30
    while not (partial.exists() and partial.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    writer.kill()
    writer.wait()
    assert partial.exists() and not (tmp_path / "big.mp4").exists()
