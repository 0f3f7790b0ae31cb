"""Take the README's screenshots from a real run with headless Chromium.

    python docs/screenshot_report.py RUN            # e.g. demo/runs/cat_demo

writes docs/demo_report.png (the first 1400x900 screen of RUN/report.html: the verdict)
and, with --neurons, docs/neurons_report.png (the neuron report's unit index with the
headline unit's panel open). Run `catneuron demo` (or `catneuron report RUN`) first; the
script only looks at what the run already holds, and fails with one line if Chromium or
the page is missing (`apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def chromium_binary() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return found or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def screenshot(url: str, out: Path, width: int, height: int, budget_ms: int = 4000) -> None:
    binary = chromium_binary()
    if binary is None:
        raise SystemExit("screenshot_report: chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--virtual-time-budget={budget_ms}",
                f"--screenshot={out}",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    if done.returncode != 0 or not out.is_file():
        raise SystemExit(f"screenshot_report: chromium failed: {done.stderr.strip()[-400:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="run directory holding report.html")
    p.add_argument("--out", type=Path, default=DOCS / "demo_report.png")
    p.add_argument("--neurons", action="store_true", help="also docs/neurons_report.png")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=900)
    args = p.parse_args(argv)
    page = args.run / "report.html"
    if not page.is_file():
        print(f"screenshot_report: no {page} (run `catneuron report {args.run}`)", file=sys.stderr)
        return 2
    screenshot(page.resolve().as_uri(), args.out, args.width, args.height)
    print(f"screenshot_report: {args.out}")
    if args.neurons:
        metrics = json.loads((args.run / "metrics.json").read_text())
        neurons = metrics.get("neurons")
        if not neurons:
            print("screenshot_report: the run has no neuron report", file=sys.stderr)
            return 2
        panel = (neurons["metrics"].get("panels") or {}).get("trained") or {}
        hash_ = f"#unit={panel['layer']}/trained/{panel['unit']}" if panel else "#units"
        # ?shot: the page shows the index from the top (headless screenshots ignore scrolling)
        url = (args.run / neurons["dir"] / "report.html").resolve().as_uri() + "?shot" + hash_
        out = args.out.with_name("neurons_report.png")
        screenshot(url, out, args.width, args.height)
        print(f"screenshot_report: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
