"""Benchmark: `catneuron neurons` end to end against extraction alone, as commands.

    python bench/neurons_cli.py [--images 600] [--repeats 2]

What the user waits for: each figure is the wall time of a whole command from its start
(Python, imports, loading the export, decoding the stills), run side by side and
alternated so that load from other processes hits them alike. On the demo's model shape
(wta_conv_ae, the shipped recipe's weights at their random init: the cost does not
depend on training) and `--images` held-out stills at 64 px, an ImageFolder:

- extraction alone: a command that loads the export and runs the one extractor
  (`evals.features.extractor.iter_activations`) over every still, every layer, and
  nothing else: the floor for any command that reads the stills through the model;
- `catneuron neurons EXPORT --data STILLS` (top inputs, stimuli, invariance, report);
- the same with `--concept STILLS` (adds the trained and random-weights passes over the
  concept set and the selectivity scores), as the demo runs it;
- the same with `--stimulus-units 0`, to show what the optimal stimuli cost.

Prints each command's median wall time, its ratio to extraction alone (the issue's
target: neurons >= 0.9x), the streaming pass' own seconds from the report's summary, and
the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EXTRACT_ONLY = """
import sys
from evals.features.extractor import from_export, iter_activations
from evals.features.sources import open_dataset
source = from_export(sys.argv[1])
n = 0
for batch in iter_activations(source, open_dataset(sys.argv[2], labeled=False), progress=False):
    n += len(batch["key"])
print(n)
"""


def make_inputs(root: Path, images: int) -> tuple[Path, Path]:
    """An export of the demo recipe's model (random init) and `images` held-out stills."""
    import torch

    from catneuron.demo_steps import demo_config, write_concept_set
    from pretrain.config import load_config
    from pretrain.export import preprocess_spec, write_export
    from pretrain.models import build_model

    config = load_config(demo_config("small.yaml"), [])
    torch.manual_seed(0)
    model = build_model(config.model.name, **config.model.kwargs)
    export = write_export(
        model.state_dict(),
        model.spec,
        root / "export",
        stage=0,
        step=0,
        config_hash="bench",
        preprocess=preprocess_spec(config),
    )
    stills = write_concept_set(root / "stills", images, 0, 64, eyed=True)
    return export, stills


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"bench: {' '.join(command[:4])} failed:\n{run.stderr[-2000:]}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="bench-neurons-") as tmp:
        root = Path(tmp)
        export, stills = make_inputs(root, args.images)
        neurons = [sys.executable, "-m", "catneuron", "neurons", str(export)]
        neurons += ["--data", str(stills), "--no-tensorboard", "--quiet", "--device", "cpu"]
        commands = {
            "extraction alone": [sys.executable, "-c", EXTRACT_ONLY, str(export), str(stills)],
            "catneuron neurons": [*neurons, "--out", str(root / "a")],
            "  + --concept (as the demo)": [
                *neurons, "--concept", str(stills), "--out", str(root / "b"),
            ],
            "  --stimulus-units 0": [*neurons, "--stimulus-units", "0", "--out", str(root / "c")],
        }  # fmt: skip
        load_before = os.getloadavg()[0]
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, command in commands.items():
                times[name].append(timed(command, env))
        load_after = os.getloadavg()[0]
        summary = json.loads((root / "a" / "metrics.json").read_text())["summary"]
    floor = statistics.median(times["extraction alone"])
    print(f"{args.images} stills at 64 px, wta_conv_ae (demo recipe), 1 thread, CPU")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:30s} {median:6.2f} s   extraction / this {floor / median:.2f}x")
    print(
        f"streaming pass inside catneuron neurons: {summary['stream_seconds']:.2f} s "
        f"({summary['stream_images_per_s']:.0f} img/s); the command's own timer "
        f"{summary['seconds']:.2f} s"
    )
    print(f"load average {load_before:.2f} before, {load_after:.2f} after")


if __name__ == "__main__":
    main()
