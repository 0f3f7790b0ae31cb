"""The demo's pipeline steps: each a real `python -m catneuron <cmd>` child with its log and
a progress line, and the data they share (shipped configs, shards, the held-out concept set).

Apart from `catneuron.demo` so that both the demo and its ablation table
(`catneuron.ablation_runs`) run rows through the very same steps, and neither imports the
other's entry point.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

CONFIG_PACKAGE = "catneuron"
CONCEPT_DIR = "concept"
CAT, NO_CAT = "cat", "no_cat"


def demo_config(name: str) -> Path:
    """A shipped demo config (package data, so a non-editable install has it too)."""
    return Path(str(resources.files(CONFIG_PACKAGE).joinpath("configs", "demo", name)))


# --------------------------------------------------------------------------- running steps


class StepFailed(RuntimeError):
    """A child command failed; the message says which, its exit status and its log."""


class Progress:
    """A tqdm bar on a terminal; elsewhere (CI logs, pipes) a plain line every 10%."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.shown = total, desc, -1
        self.bar = None
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"      {desc}", dynamic_ncols=True, leave=False)

    def update(self, done: int) -> None:
        done = min(done, self.total)
        if self.bar is not None:
            self.bar.n = done
            self.bar.refresh()
            return
        decile = 10 * done // max(self.total, 1)
        if decile > self.shown:
            self.shown = decile
            print(f"      {self.desc}: {done}/{self.total}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_step(
    argv: list[str],
    log: Path,
    progress: Callable[[], int] | None = None,
    total: int = 0,
    desc: str = "",
) -> None:
    """Run `python -m catneuron ARGV` with its output in `log`, polling `progress()` for a bar.

    The child's output never reaches the console: DeepSpeed and Ray are chatty on both
    streams. On failure the last lines of the log are shown with its path.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.setdefault("TQDM_DISABLE", "1")  # children's bars would only fill the log
    source_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", *command_module(argv[0]), *argv[1:]]
    with log.open("w") as out:
        out.write("+ " + shlex.join(cmd) + "\n")
        out.flush()
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        bar = Progress(total, desc) if progress and total else None
        try:
            while child.poll() is None:
                if bar is not None:
                    bar.update(progress())
                time.sleep(0.5)
        except KeyboardInterrupt:
            child.terminate()
            child.wait()
            raise
        finally:
            if bar is not None:
                bar.close()
    if child.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise StepFailed(
            f"'catneuron {argv[0]}' exited with status {child.returncode}; its log is {log}\n{tail}"
        )


EVAL_MODULES = {"probe": "evals.probe", "neurons": "evals.neurons"}


def command_module(name: str) -> list[str]:
    """`catneuron NAME` through the console script's dispatcher, or the eval's own module
    (`python -m evals.neurons` is the same command) while the dispatcher does not list it."""
    from catneuron.cli import SUBCOMMANDS

    if name in SUBCOMMANDS or name not in EVAL_MODULES:
        return ["catneuron", name]
    return [EVAL_MODULES[name]]


def run_step_retrying_ray(argv: list[str], log: Path, *progress_args) -> None:
    """`run_step`, tried once more when the local Ray cluster did not come up in time (its
    node start-up times out on an overloaded laptop); the shard step resumes where it was."""
    try:
        run_step(argv, log, *progress_args)
    except StepFailed:
        if "cannot start or reach Ray" not in log.read_text(errors="replace"):
            raise
        print("      the local Ray cluster did not start in time; trying once more", flush=True)
        run_step(argv, log, *progress_args)


def _count(pattern: Path) -> Callable[[], int]:
    return lambda: len(list(pattern.parent.glob(pattern.name)))


def trained_steps(run: Path) -> Callable[[], int]:
    log = run / "log.jsonl"

    def steps() -> int:
        try:
            lines = log.read_text().splitlines()
        except OSError:
            return 0
        for line in reversed(lines):
            try:
                return int(json.loads(line)["step"])
            except (ValueError, KeyError):
                continue
        return 0

    return steps


# --------------------------------------------------------------------------- the held-out set


def write_concept_set(
    root: Path,
    n: int,
    seed: int,
    size: int,
    eyed: bool = False,
    face_scale: tuple[float, float] | None = None,
) -> Path:
    """`n` held-out stills as an ImageFolder (`cat/`, `no_cat/`), half of them with a face.

    Drawn by `data_pipeline.synth.render_still` with scene seeds >= 2**40, which no clip of
    `catneuron synth` uses (its seeds are < 2**31), so no eval image is a training frame.
    Rendered at the frames' stored size (at 64 px and resized, below it), so the face
    appears at the scale training saw,
    with the clutter training saw (`eyed`: `catneuron synth --eyed-clutter`) and the
    face's scale range (`face_scale`: `--face-scale`; None: synth's default).
    """
    import numpy as np
    from PIL import Image

    from data_pipeline.synth import render_still

    base = 2**40 + seed * 2**24
    stamp = {"n": n, "seed": seed, "size": size, "base": base, **({"eyed": True} if eyed else {})}
    if face_scale is not None:
        stamp["face_scale"] = list(face_scale)
    scale = {} if face_scale is None else {"face_scale": tuple(face_scale)}
    # Below 64 px a large face does not fit the frame with its margin: drawn at 64 px and
    # resized, as the shards' frames are resized from larger video.
    canvas = max(size, 64)
    if (root / "index.json").is_file() and json.loads((root / "index.json").read_text()) == stamp:
        return root
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    for label in (CAT, NO_CAT):
        (tmp / label).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cat = i % 2 == 0
        image, _ = render_still(canvas, canvas, base + i, cat=cat, eyed_clutter=eyed, **scale)
        if canvas != size:
            image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
        Image.fromarray(np.ascontiguousarray(image)).save(
            tmp / (CAT if cat else NO_CAT) / f"{i:05d}.png"
        )
    (tmp / "index.json").write_text(json.dumps(stamp))
    if root.exists():
        import shutil

        shutil.rmtree(root)
    tmp.rename(root)
    return root


# --------------------------------------------------------------------------- small scale


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def latest_export(run: Path) -> Path:
    exports = sorted(
        (p for p in (run / "exports").glob("step_*") if (p / "model.json").is_file()),
        key=lambda p: int(p.name.removeprefix("step_")),
    )
    if not exports:
        raise StepFailed(f"{run}/exports: training wrote no export")
    return exports[-1]


def stage_count(model: str, kwargs: dict) -> int:
    """How many greedy stages the model trains in (1 for end-to-end models)."""
    from pretrain.models import build_model

    return len(build_model(model, **kwargs).stages())


def make_shards(
    args: argparse.Namespace,
    videos: Path,
    shards: Path,
    logs: Path,
    say: Callable[[int, str], None],
) -> None:
    """Steps 1 and 2: `catneuron synth` into `videos`, `catneuron shard` into `shards`.

    Each step leaves a stamp of its arguments; a folder whose stamp matches is reused
    without running anything (shard would skip every group anyway, but a local Ray cluster
    takes a while to start on a busy laptop). The ablation's rows share data this way.
    """
    synth_args = [
        "synth",
        "--out",
        str(videos),
        "--videos",
        str(args.videos),
        "--seed",
        str(args.seed),
        "--concept-fraction",
        str(args.concept_fraction),
        *(["--eyed-clutter"] if args.clutter == "eyed" else []),
        *(["--face-scale", ",".join(f"{v:g}" for v in args.face_scale)] if args.face_scale else []),
    ]
    stamp = videos / ".demo-synth.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == synth_args:
        say(1, f"reusing the {args.videos} clips already in {videos}")
    else:
        share = f"{args.concept_fraction:.0%}"
        say(1, f"synthesizing {args.videos} unlabeled clips ({share} with a cat face)")
        stamp.unlink(missing_ok=True)
        run_step(
            synth_args, logs / "synth.log", _count(videos / "clip_*.mp4"), args.videos, "clips"
        )
        stamp.write_text(json.dumps(synth_args))
    per_task = 4
    shard_args = [
        "shard",
        str(videos),
        "--out",
        str(shards),
        "--fps",
        str(args.fps),
        "--size",
        str(args.size),
        "--crop",
        "center",
        "--num-workers",
        str(args.num_workers),
        "--videos-per-task",
        str(per_task),
        "--shard-max-count",
        "256",
    ]
    stamp = shards / ".demo-shard.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == [*synth_args, *shard_args]:
        say(2, f"reusing the frame shards already in {shards}")
    else:
        workers = f"{args.num_workers} workers, {args.fps:g} fps, {args.size} px"
        say(2, f"sharding them on a local Ray cluster ({workers})")
        stamp.unlink(missing_ok=True)
        run_step_retrying_ray(
            shard_args,
            logs / "shard.log",
            _count(shards / "manifest" / "groups" / "g*.videos.parquet"),
            -(-args.videos // per_task),
            "video groups",
        )
        stamp.write_text(json.dumps([*synth_args, *shard_args]))
