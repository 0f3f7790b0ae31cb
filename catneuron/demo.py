"""`catneuron demo`: the cat-neuron experiment end to end, at laptop scale, on videos it makes.

Unlabeled video in, a unit that responds to cats out, with no label ever shown to
training. Each step runs the real subcommand a user would (`python -m catneuron <cmd>`,
as a child process), so the demo can never drift from the commands it shows:

  1. synth    sample clips with a planted cat face among distractors
  2. shard    frames into WebDataset shards on a local Ray cluster
  3. train    greedy pretraining on the DeepSpeed launcher (CPU ranks where there is no GPU)
  4. probe    linear probes (cat vs no cat, shape classes) beside their baselines
  5. neurons  every unit scored on a held-out cat / no-cat set (frames training never saw)
  6. report   RUN/report.html and RUN/metrics.json

The console shows one line per step and a progress bar; the children's own output
(DeepSpeed's INFO lines, Ray's start-up warnings) goes to OUT/logs/<step>.log, whose path
is printed. `--scale full` prints the same experiment for a cluster through launch/
scripts (and runs it with `--submit`); `--ablation` runs the in-process ablation table
(`catneuron.ablation`).
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

from data_pipeline.cli_help import HelpFormatter

CONFIG_PACKAGE = "catneuron"
CONCEPT_DIR = "concept"
CAT, NO_CAT = "cat", "no_cat"


def demo_config(name: str) -> Path:
    """A shipped demo config (package data, so a non-editable install has it too)."""
    return Path(str(resources.files(CONFIG_PACKAGE).joinpath("configs", "demo", name)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="catneuron demo",
        description="The cat-neuron experiment end to end: synth, shard (Ray), train (DeepSpeed), "
        "probe, neurons, report.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("demo"), help="working directory of the demo")
    p.add_argument(
        "--scale",
        choices=("small", "full"),
        default="small",
        help="small: this machine; full: print the cluster commands (run them with --submit)",
    )
    p.add_argument("--submit", action="store_true", help="with --scale full: run the commands")
    p.add_argument(
        "--ablation",
        action="store_true",
        help="run the ablation table instead: every row through synth, shard, train and "
        "neurons (catneuron.ablation_runs; the quick in-process table: python -m catneuron.ablation)",
    )
    p.add_argument(
        "--ablation-rows",
        default=None,
        metavar="N,N,...",
        help="with --ablation: the rows to run, 1-based (default: every row)",
    )
    p.add_argument(
        "--config", type=Path, default=None, help="training config (default: the demo's)"
    )
    p.add_argument("--videos", type=int, default=80, help="sample clips to synthesize")
    p.add_argument(
        "--concept-fraction", type=float, default=0.5, help="share of clips with the face"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the clips")
    p.add_argument("--fps", type=float, default=10.0, help="frames sampled per second of video")
    p.add_argument("--size", type=int, default=64, help="shorter side of the stored frames")
    p.add_argument(
        "--clutter",
        choices=("eyed", "plain"),
        default="eyed",
        help="distractors with the face's pupils and whisker strokes (eyed), or without: "
        "with plain clutter a random network's dark-spot unit already finds the face",
    )
    p.add_argument("--num-workers", type=int, default=2, help="Ray workers for sharding")
    p.add_argument("--ranks", type=int, default=2, help="training ranks (GPUs, or CPU ranks)")
    p.add_argument(
        "--steps", type=int, default=None, help="steps per stage (default: the config's)"
    )
    p.add_argument(
        "--eval-images",
        type=int,
        default=600,
        help="held-out images per eval set (half with a cat)",
    )
    p.add_argument("--eval-seed", type=int, default=1, help="seed of the held-out eval sets")
    args = p.parse_args(argv)
    args.face_scale = None  # synth's default; the ablation's rows set their own
    if args.submit and args.scale != "full":
        p.error("--submit goes with --scale full")
    if args.ablation_rows is not None:  # parsed here, once: a list of 1-based row numbers
        text = args.ablation_rows
        try:
            args.ablation_rows = [int(k) for k in text.split(",")]
        except ValueError:
            p.error(f"--ablation-rows: not row numbers: {text!r}")
        from catneuron.ablation_runs import ROW_COUNT

        if not all(1 <= k <= ROW_COUNT for k in args.ablation_rows):
            p.error(f"--ablation-rows: rows are 1 to {ROW_COUNT}: {text!r}")
    if args.eval_images < 8:
        p.error("--eval-images must be >= 8")
    return args


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


def _trained_steps(run: Path) -> Callable[[], int]:
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


def run_small(args: argparse.Namespace) -> int:
    from pretrain.config import load_config

    out = args.out.resolve()
    videos, shards, logs, runs = out / "videos", out / "shards", out / "logs", out / "runs"
    config_path = args.config or demo_config("small.yaml")
    overrides = [f"data.source={shards}", f"run.output_dir={runs}"]
    if args.steps is not None:
        overrides += [f"stages.steps={args.steps}"]
    config = load_config(config_path, overrides)
    run = config.run_dir
    n_stages = stage_count(config.model.name, config.model.kwargs)
    total_steps = sum(config.steps_per_stage(n_stages))
    start = time.perf_counter()
    probe_ready, neurons_ready = _available("evals.probe"), _available("evals.neurons")
    n_steps = 6

    def say(k: int, text: str) -> None:
        print(f"[{k}/{n_steps}] {text}  ({time.perf_counter() - start:.0f} s)", flush=True)

    print(f"demo: working in {out}; each step's own output goes to {logs}/<step>.log", flush=True)
    make_shards(args, videos, shards, logs, say)
    frames = _shard_frames(shards)
    say(
        3,
        f"pretraining {config.model.name} "
        + (f"greedily ({n_stages} stages, " if n_stages > 1 else "(")
        + f"{total_steps} steps) on "
        f"{frames} frames, {args.ranks} DeepSpeed ranks, no labels",
    )
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    run_step(
        ["train", str(config_path), *overrides, "--num-gpus", str(args.ranks)],
        logs / "train.log",
        _trained_steps(run),
        total_steps,
        "steps",
    )
    export = latest_export(run)
    concept = write_concept_set(
        out / CONCEPT_DIR, args.eval_images, args.eval_seed, args.size, args.clutter == "eyed"
    )
    n_eval = args.eval_images
    missing = []
    if probe_ready:
        say(4, "linear probes on frozen features (cat vs no cat; shape classes) with baselines")
        step = export.name.removeprefix("step_")
        for name, spec in (("cat", "synth:cat"), ("shapes", "synth:shapes")):
            eyed = "&eyed=1" if name == "cat" and args.clutter == "eyed" else ""
            query = f"?n={n_eval}&seed={args.eval_seed}&size={args.size}{eyed}"
            test_query = f"?n={n_eval}&seed={args.eval_seed + 1}&size={args.size}{eyed}"
            kind = "probe" if name == "cat" else "probe_shapes"
            run_step(
                ["probe", str(export), "--train", spec + query, "--test", spec + test_query]
                + ["--out", str(run / "evals" / f"{kind}-{step}")],
                logs / f"probe-{name}.log",
            )
    else:
        say(4, "skipped: `catneuron probe` is not in this version (evals.probe missing)")
        missing.append("probe")
    if neurons_ready:
        say(
            5,
            f"scoring every unit on {n_eval} held-out stills (cat / no cat) against random weights",
        )
        run_step(
            ["neurons", str(export), "--data", str(concept), "--concept", str(concept), "--quiet"],
            logs / "neurons.log",
        )
    else:
        say(
            5,
            f"scoring every unit on {n_eval} held-out stills (cat / no cat) against random "
            "weights (the demo's own scorer: `catneuron neurons` is not in this version)",
        )
        missing.append("neurons")
    from catneuron import report

    fallback = {}
    if report.latest_eval(run, "neurons") is None:  # the report takes neurons' own headline
        from catneuron.ablation import concept_scores

        fallback["headline"] = concept_scores(export, concept)
    say(6, "writing the report")

    summary = {
        "demo": {
            "videos": args.videos,
            "frames": frames,
            "ranks": args.ranks,
            "steps": total_steps,
            "eval_images": n_eval,
            "seconds": round(time.perf_counter() - start, 1),
            "skipped": missing,
        },
        **fallback,
    }
    page = report.write_report(run, extra=summary)
    metrics = json.loads((run / report.METRICS).read_text())
    print(headline(metrics), flush=True)
    print(
        f"demo done in {time.perf_counter() - start:.0f} s.\n"
        f"  report:      {page}\n"
        f"  figures:     {run / report.METRICS}\n"
        f"  TensorBoard: tensorboard --logdir {runs}\n"
        f"  logs:        {logs}",
        flush=True,
    )
    return 0


def _shard_frames(shards: Path) -> int:
    import pyarrow.parquet as pq

    table = pq.read_table(shards / "manifest" / "shards.parquet", columns=["n_samples"])
    return int(sum(table["n_samples"].to_pylist()))


def headline(metrics: dict) -> str:
    """The figures the demo prints: best cat unit beside random weights and chance; probes."""
    lines = []
    best = metrics.get("headline", {})
    if best:
        lines.append(
            f"best cat unit: {best['unit']}  held-out accuracy {best['heldout']:.3f}  "
            f"AUROC {best['auroc']:.3f}  (random weights {best['random_heldout']:.3f} / "
            f"{best['random_auroc']:.3f}, chance {best['chance']:.3f})"
        )
    for name, row in metrics.get("probe_headline", {}).items():
        lines.append(
            f"linear probe, {name}: top-1 {row['top1']:.3f} on {row['layer']}  (random init "
            f"{row['random_init']:.3f}, raw pixels {row['raw_pixels']:.3f}, chance {row['chance']:.3f})"
        )
    return "\n".join(lines) or "no eval figures (probe and neurons were not run)"


# --------------------------------------------------------------------------- full scale


def full_commands(out: str = "/shared/catneuron-demo") -> list[str]:
    """The same experiment for a cluster at the paper's input size (200x200 frames)."""
    config = demo_config("full.yaml")
    return [
        f"catneuron synth --out {out}/videos --videos 20000 --min-size 256 --max-size 640 --concept-fraction 0.5",
        f"launch/submit.sh --wait -- shard {out}/videos --out {out}/shards --fps 1 --size 200 --crop center",
        f"launch/train_multinode.sh --hostfile hosts {config} data.source={out}/shards run.output_dir={out}/runs",
        f"catneuron probe {out}/runs/local_sparse_full --train synth:cat?n=20000&size=200 --test synth:cat?n=5000&seed=1&size=200",
        f"catneuron neurons {out}/runs/local_sparse_full --data synth:cat?n=10000&size=200 --concept synth:cat?n=10000&size=200",
        f"catneuron report {out}/runs/local_sparse_full",
    ]


def run_full(args: argparse.Namespace) -> int:
    commands = full_commands()
    if not args.submit:
        print(
            "The same experiment on a cluster (run from the repository root; --submit runs them):"
        )
        for command in commands:
            print("  " + command)
        return 0
    for command in commands:
        print("+ " + command, flush=True)
        rc = subprocess.run(shlex.split(command)).returncode
        if rc:
            print(f"catneuron demo: '{command}' exited with status {rc}", file=sys.stderr)
            return rc
    return 0


def quiet_deepspeed_import() -> None:
    """DeepSpeed announces on import which accelerator it picked; naming it keeps the console
    quiet. Only where there is no GPU: on a GPU machine DeepSpeed's own choice stands."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_deepspeed_import()
    if args.scale == "full" and not args.ablation:
        return run_full(args)
    if args.ablation:
        from catneuron import ablation_runs

        prog, run = (
            "catneuron demo --ablation",
            lambda: ablation_runs.main(args, args.ablation_rows),
        )
    else:
        prog, run = "catneuron demo", lambda: run_small(args)
    try:
        return run()
    except StepFailed as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
