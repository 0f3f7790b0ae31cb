"""bench/gpu.sh --dry-run: the device check's whole script, on CPU at tiny sizes.

The device run is minutes long and cannot be repeated at will, so its script is debugged
here: real `catneuron train` launches, the in-process loop, the figures read back from
the runs' logs, results.json and results.md. The summarizing helpers get a direct test
with hand-made records, where the right answer is known.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from bench.gpu_bench import PLAN, derive, labels, summarize

REPO = Path(__file__).resolve().parents[1]


def record(step: int, stage: float, loss: float, images_per_s: float, **extra: float) -> dict:
    return {
        "step": step,
        "stage": stage,
        "train/loss": loss,
        "perf/images_per_s": images_per_s,
        "perf/step_ms": 1000 * 32 / images_per_s,
        "perf/data_wait_share": 0.01,
        **extra,
    }


def test_summary_leaves_out_each_stages_first_interval():
    records = [
        record(10, 0, 1.0, 10.0),  # engine start, left out
        record(20, 0, 0.9, 100.0, **{"perf/tflops": 2.0, "perf/mfu": 0.004}),
        record(30, 0, 0.8, 120.0, **{"perf/tflops": 2.4, "perf/mfu": 0.0048}),
        record(40, 1, 0.7, 5.0),  # the next stage's start, left out
        record(50, 1, 0.6, 110.0, **{"perf/tflops": 2.2, "perf/mfu": 0.0044, "vq/top_usage": 0.5}),
    ]
    s = summarize(records)
    assert (s["records"], s["records_used"], s["stages"]) == (5, 3, 2)
    assert s["images_per_s"] == 110.0
    assert s["mfu"] == pytest.approx(0.0044)
    assert s["peak_tflops"] == pytest.approx(500.0)  # tflops / mfu: the trainer's denominator
    assert s["loss_final"] == 0.6
    assert s["loss_tail"] == pytest.approx((0.7 + 0.6 + 0.8) / 3)


def test_compiled_runs_get_mfu_from_the_eager_flops_and_bf16_is_checked_against_fp32():
    eager = {
        "status": "ok", "step_ms": 20.0, "flops_per_step": 4e12, "peak_tflops": 1000.0,
        "mfu": 0.2, "data_wait_share": 0.01, "loss_tail": 1.00, "vq/top_usage": 0.60,
    }  # fmt: skip
    results = {
        "runs": {
            "vqvae2_256-bf16": eager,
            "vqvae2_256-bf16-compile": {"status": "ok", "step_ms": 10.0, "data_wait_share": 0.08},
            "vqvae2_256-fp32": {"status": "ok", "loss_tail": 1.02, "vq/top_usage": 0.65},
        },
        "loop": {"engine": {"overhead": 0.03}},
    }
    d = derive(results)
    compiled = results["runs"]["vqvae2_256-bf16-compile"]
    assert compiled["mfu_derived"] == pytest.approx(0.4)  # same FLOPs in half the time
    assert d["vqvae2_256_best_mfu"] == pytest.approx(0.4) and d["mfu_target_met"]
    assert d["data_wait_max"] == 0.08 and not d["data_wait_target_met"]
    assert d["engine_overhead_target_met"]
    comparison = d["bf16_vs_fp32"]
    assert comparison["loss_rel_diff"] == pytest.approx(0.02 / 1.02) and comparison["loss_ok"]
    assert not comparison["usage"]["vq/top_usage"]["ok"]  # 0.60 < 0.65 - 0.02


def test_plan_labels_follow_the_shipped_configs_and_overrides():
    by_key = {run.key: labels(run) for run in PLAN}
    assert by_key["vqvae2_256-bf16"] == {
        "precision": "bf16",
        "channels_last": True,
        "compile": False,
    }
    assert by_key["vqvae2_256-fp32"]["precision"] == "fp32"
    assert by_key["vqvae2_256-bf16-nocl-compile"] == {
        "precision": "bf16",
        "channels_last": False,
        "compile": True,
    }
    assert by_key["local_sparse_cat-bf16"]["channels_last"] is False  # not set in that config


@pytest.mark.slow
def test_dry_run_trains_measures_and_writes_every_figure(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["mode"].startswith("dry-run")
    for key in ("vqvae2_256-bf16", "vqvae2_256-fp32"):
        run = results["runs"][key]
        assert run["status"] == "ok", run
        assert run["steps_per_stage"] == 3 and run["records"] == 3
        assert run["images_per_s"] > 0 and run["step_ms"] > 0
        assert 0 <= run["data_wait_share"] < 1
        assert 0 < run["loss_tail"] < 10
        assert 0 < run["vq/bottom_usage"] <= 1
    # On CPU both runs train in fp32 from the same seed and data: the same losses.
    comparison = results["derived"]["bf16_vs_fp32"]
    assert comparison["loss_rel_diff"] < 1e-3 and comparison["loss_ok"]
    loop = results["loop"]
    assert loop["status"] == "ok", loop.get("output_tail")
    engine = loop["engine"]
    assert engine["flops_per_step"] > 1e8  # vqvae2_256 at 32 px, batch 4, forward + backward
    assert engine["plain"]["step_ms"] > 0 and engine["engine"]["step_ms"] > 0
    assert loop["loader"]["images_per_s"] > 0 and loop["loader"]["num_workers"] == 1
    assert loop["features"]["bare_fp32_images_per_s"] > 0
    assert loop["matmul"] == {"skipped": "no GPU", "seconds": loop["matmul"]["seconds"]}
    assert loop["profile"]["top"] and (out / "profile.txt").stat().st_size > 0
    markdown = (out / "results.md").read_text()
    assert "| vqvae2_256-bf16 | bf16 | True | False |" in markdown
    assert "Engine overhead" in markdown and "bf16 against fp32" in markdown
    assert {"results.json", "results.md", "env.txt", "log.txt", "runs.log"} <= {
        p.name for p in out.iterdir()
    }
