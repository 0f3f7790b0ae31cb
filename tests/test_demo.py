"""The Quickstart's first command, end to end: synth, shard on Ray, train with the launcher."""

import json
import subprocess
import sys

import pytest

from pretrain import load_export


@pytest.mark.slow
def test_demo_runs_the_whole_flow(tmp_path):
    out = tmp_path / "demo"
    cmd = [
        sys.executable,
        "-m",
        "catneuron",
        "demo",
        "--out",
        str(out),
        "--videos",
        "4",
        "--steps",
        "20",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo done" in proc.stdout

    videos = json.loads((out / "shards" / "manifest" / "index.wids.json").read_text())
    assert sum(s["nsamples"] for s in videos["shardlist"]) > 20

    run = out / "runs" / "conv_ae_tiny"
    losses = [
        r["train/loss"]
        for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
        if "train/loss" in r
    ]
    assert losses[-1] < 0.7 * losses[0], losses
    model = load_export(run / "exports" / "step_20")
    assert model.spec["name"] == "conv_ae"
