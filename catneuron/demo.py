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
(`catneuron.ablation_runs`; the steps themselves are in `catneuron.demo_steps`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from catneuron.demo_steps import (
    CONCEPT_DIR,
    StepFailed,
    _available,
    demo_config,
    latest_export,
    make_shards,
    run_step,
    stage_count,
    trained_steps,
    write_concept_set,
)
from data_pipeline.cli_help import HelpFormatter


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
        trained_steps(run),
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
    grouped = metrics.get("grouped_unit")
    if grouped:
        lines.append(
            f"best grouped unit: {grouped['layer']} channels "
            f"{', '.join(f'#{m}' for m in grouped['members'])}  held-out accuracy "
            f"{grouped['heldout']:.3f}  AUROC {grouped['auroc']:.3f}  (random weights grouped "
            f"the same way {grouped['random_heldout']:.3f} / {grouped['random_auroc']:.3f})"
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
