"""The neuron report opens in headless Chromium: no console errors, grids in the DOM.

Chromium (Debian's `chromium` package) is started by the test with a fresh profile and
no network features; `--enable-logging=stderr` prints every console message as a
`CONSOLE` line, which is how errors are read (a control page with a deliberate error
shows the check can fail). The screenshot is saved to $CATNEURON_TEST_ARTIFACTS (or the
test's tmp dir) as neurons_report.png.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from evals.neurons import cli as neurons
from pretrain import build_model
from pretrain.export import write_export

CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
)
PRE = {"resize": 32, "crop": 32, "grayscale": False, "mean": [0.5], "std": [0.25]}


def chromium(page: Path, *extra: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                *extra,
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )


def console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if re.search(r"CONSOLE|Uncaught", line)]


def test_a_page_with_an_error_is_caught(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<html><body><script>console.error('boom'); nosuch();</script></body></html>")
    assert len(console_errors(chromium(page, "--dump-dom").stderr)) == 2


def test_report_loads_without_console_errors_and_shows_its_grids(tmp_path):
    torch.manual_seed(0)
    model = build_model("conv_ae", channels=[4, 8], greedy=False)
    run = tmp_path / "run"
    write_export(
        model.state_dict(),
        model.spec,
        run / "exports" / "step_3",
        stage=0,
        step=3,
        config_hash="t",
        preprocess=PRE,
    )
    argv = [
        str(run),
        "--data",
        "synth:cat?n=12",
        "--concept",
        "synth:cat?n=24",
        "--top",
        "4",
        "--show",
        "6",
        "--stimulus-units",
        "2",
        "--stimulus-steps",
        "10",
        "--quiet",
    ]
    assert neurons.main(argv) == 0
    page = run / "evals" / "neurons-3" / "report.html"
    done = chromium(page, "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    assert console_errors(done.stderr) == []
    dom = done.stdout
    assert dom.count('class="grid"') == 2  # block1, block2
    # block1 has 4 units, block2 shows 6 of its 8
    assert dom.count('class="unit"') == 10 and dom.count("data:image/png;base64,") >= 10
    assert 'id="selectivity"' in dom and "<svg" in dom
    artifacts = Path(os.environ.get("CATNEURON_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "neurons_report.png"
    done = chromium(page, f"--screenshot={shot}", "--window-size=1200,1600")
    assert done.returncode == 0 and shot.stat().st_size > 10_000, done.stderr[-2000:]
