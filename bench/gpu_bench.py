"""The driver of bench/gpu.sh: every GPU measurement of issue 13, in one time-boxed run.

    python -m bench.gpu_bench --out DIR --shards DIR [--budget-s 420] [--dry-run [--full]]

Training figures come from real `catneuron train` runs (the DeepSpeed launcher, one
rank, NCCL on a GPU, ZeRO 1, bf16 as shipped), read back from each run's `log.jsonl`
(the records the trainer writes beside its TensorBoard events, same tags; the events
are read when the log is missing). The first logging interval of every stage (engine
start, k-means init, first batches, compilation) is left out of the medians. What a log
cannot say (plain PyTorch against the engine, a profile, the loader alone, feature
extraction, the matrix ceiling) comes from `bench.gpu_loop` in a process of its own.

Runs go in order of importance and each is skipped, with the reason recorded, when the
budget left is below its need, so the whole device check ends inside its slot; figures
are written to DIR/results.json and DIR/results.md after every run, so a cut-off run
still returns what it measured. `--dry-run` runs the same code on CPU at tiny sizes
(3 steps, 32 px, batch 4, fp32) and only the runs marked for it (`--full`: all of them).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LOSS_REL_TOL = 0.05  # bf16 loss within 5% of fp32 after the same steps
USAGE_SLACK = 0.02  # bf16 code usage at least fp32's minus 2 points (per-batch noise)
TARGETS = {"vqvae2_256 MFU": ">= 35%", "data wait": "<= 5%", "engine overhead": "<= 5%"}


@dataclass
class TrainRun:
    """One `catneuron train` launch: a shipped config with overrides."""

    key: str
    config: str
    overrides: list[str]
    steps: int  # per greedy stage, on the GPU
    every: int  # logging interval, on the GPU
    min_s: int  # budget left below which it is not started (GPU)
    timeout_s: int  # killed after this long (GPU), or when the budget ends
    in_dry_run: bool = False


BF16_OFF = "deepspeed.bf16.enabled=false"
NO_CL, COMPILE = "run.channels_last=false", "run.compile=true"
# Order of importance: the shipped vqvae2 run and its fp32 twin, the in-process loop
# (LOOP_AFTER), the other shipped models, then the variants; compilation last (slowest).
PLAN = [
    TrainRun("vqvae2_256-bf16", "vqvae2_256", [], 150, 15, 50, 150, in_dry_run=True),
    TrainRun("vqvae2_256-fp32", "vqvae2_256", [BF16_OFF], 150, 15, 50, 150, in_dry_run=True),
    TrainRun("conv_ae-bf16", "conv_ae", [], 300, 30, 40, 120),
    TrainRun("local_sparse_cat-bf16", "local_sparse_cat", [], 40, 10, 50, 150),
    TrainRun("vqvae2_256-bf16-nocl", "vqvae2_256", [NO_CL], 150, 15, 45, 120),
    TrainRun("vqvae2_256-bf16-compile", "vqvae2_256", [COMPILE], 150, 15, 90, 240),
    TrainRun("vqvae2_256-bf16-nocl-compile", "vqvae2_256", [NO_CL, COMPILE], 150, 15, 90, 240),
]
LOOP_CONFIG, LOOP_AFTER = "vqvae2_256", "vqvae2_256-fp32"
LOOP_MIN_S, LOOP_TIMEOUT_S = 60, 150
#: Dry-run sizes: what makes the shipped configs fit a loaded 2-core CPU.
DRY = [
    "data.batch_size=4",
    "data.resize=32",
    "data.crop=32",
    "data.num_workers=1",
    "data.shuffle_buffer=16",
]
# local_sparse's three blocks need 64 px (a 6 px receptive field in the third block).
DRY_MODEL = {"local_sparse_cat": ["data.resize=64", "data.crop=64"]}
DRY_TIMEOUT_S = 240  # per dry-run job: generous, the CPU here is shared
MAX_STAGES = 8  # the data stream is sized for this many greedy stages


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The trainer's logging records: log.jsonl, else the TensorBoard events' scalars."""
    log = run_dir / "log.jsonl"
    if log.is_file():
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    by_step: dict[int, dict[str, Any]] = {}
    for tag in events.Tags()["scalars"]:
        if tag.startswith(("perf/", "train/", "vq/")) or tag == "stage":
            for event in events.Scalars(tag):
                by_step.setdefault(event.step, {"step": event.step})[tag] = event.value
    return [r for _, r in sorted(by_step.items()) if "perf/step_ms" in r]


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over every record but each stage's first; the loss and VQ figures at the end."""
    seen_stages: set[float] = set()
    steady = []
    for r in records:
        stage = r.get("stage", 0.0)
        if stage in seen_stages:
            steady.append(r)
        seen_stages.add(stage)
    steady = steady or records  # a run too short to leave anything out
    out: dict[str, Any] = {"records": len(records), "records_used": len(steady)}
    for key in ("images_per_s", "step_ms", "data_wait_share", "tflops", "mfu"):
        values = [r[f"perf/{key}"] for r in steady if f"perf/{key}" in r]
        if values:
            out[key] = statistics.median(values)
    memory = [r["perf/gpu_mem_gb"] for r in records if "perf/gpu_mem_gb" in r]
    if memory:
        out["peak_mem_gb"] = max(memory)
    if "tflops" in out:
        out["flops_per_step"] = out["tflops"] * 1e12 * out["step_ms"] / 1000
        if out.get("mfu"):
            out["peak_tflops"] = out["tflops"] / out["mfu"]
    tail = records[-3:]
    out["loss_final"] = records[-1]["train/loss"]
    out["loss_tail"] = statistics.fmean(r["train/loss"] for r in tail)
    for key in sorted(k for k in records[-1] if k.startswith("vq/")):
        out[key] = statistics.fmean(r[key] for r in tail if key in r)
    out["stages"] = len(seen_stages)
    return out


class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.work = Path(tempfile.mkdtemp(prefix="catneuron-gpu-"))
        self.deadline = time.monotonic() + args.budget_s
        self.results: dict[str, Any] = {
            "mode": "dry-run (CPU, tiny sizes; not GPU figures)" if args.dry_run else "device",
            "budget_s": args.budget_s,
            "shards": str(args.shards),
            "runs": {},
            "targets": TARGETS,
        }
        self.run_log = (self.out / "runs.log").open("a")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        """results.json and results.md, each written whole under a temporary name first."""
        for name, text in (
            ("results.json", json.dumps(self.results, indent=1, default=str)),
            ("results.md", render_markdown(self.results)),
        ):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.out / name)

    def start(self, label: str, cmd: list[str], min_s: float, timeout_s: float) -> Job | None:
        """Start `cmd` in its own process group, output to a file; None when the budget is short."""
        if self.args.dry_run:
            min_s, timeout_s = 0, DRY_TIMEOUT_S
        if self.left() < min_s:
            return None
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.args.dry_run:
            env["OMP_NUM_THREADS"] = "1"
        log = self.work / f"{label}.log"
        with log.open("w") as sink:
            sink.write(f"+ {shlex.join(cmd)}\n")
            sink.flush()
            proc = subprocess.Popen(
                cmd,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
                start_new_session=True,
            )
        return Job(label, proc, log, time.monotonic(), max(min(timeout_s, self.left() - 5), 1))

    def wait(self, job: Job) -> tuple[int | None, str]:
        """Exit status (None: killed at its timeout, with its whole process group) and output."""
        try:
            rc: int | None = job.proc.wait(
                timeout=max(job.started + job.timeout - time.monotonic(), 1)
            )
        except subprocess.TimeoutExpired:
            os.killpg(job.proc.pid, signal.SIGKILL)
            job.proc.wait()
            rc = None
        output = job.log.read_text(errors="replace")
        self.run_log.write(f"\n===== {job.label}\n{output}")
        self.run_log.flush()
        return rc, output

    def start_train(self, run: TrainRun) -> Job | None:
        steps, every = (3, 1) if self.args.dry_run else (run.steps, run.every)
        overrides = list(run.overrides)
        if self.args.dry_run:
            overrides += DRY + DRY_MODEL.get(run.config, [])
        cmd = [
            sys.executable, "-m", "catneuron", "train", str(REPO / "configs" / f"{run.config}.yaml"),
            "--num-gpus", "1", "--master-port", str(free_port()),
            f"data.source={self.args.shards}", f"run.output_dir={self.work / 'runs'}",
            f"run.name={run.key}", f"stages.steps={steps}", f"logging.every={every}",
            "logging.image_every=0", "checkpoint.every=1000000",
            # An endless stream: no epoch restarts (worker start-up) inside the timed steps.
            "data.resampled=true", f"data.batches_per_epoch={steps * MAX_STAGES + 16}",
            *overrides,
        ]  # fmt: skip
        job = self.start(run.key, cmd, run.min_s, run.timeout_s)
        if job is None:
            self.results["runs"][run.key] = {
                "status": f"skipped: {self.left():.0f} s of the budget left, needs {run.min_s}",
                **labels(run),
            }
        return job

    def finish_train(self, run: TrainRun, job: Job) -> None:
        rc, output = self.wait(job)
        entry: dict[str, Any] = {
            "config": f"configs/{run.config}.yaml",
            "overrides": run.overrides,
            "steps_per_stage": 3 if self.args.dry_run else run.steps,
            "wall_s": time.monotonic() - job.started,
            **labels(run),
        }
        if rc != 0:
            entry["status"] = "timeout" if rc is None else f"failed (exit {rc})"
            entry["output_tail"] = output[-2500:]
        else:
            try:
                entry.update(summarize(read_records(self.work / "runs" / run.key)))
                entry["status"] = "ok"
            except (OSError, ValueError, KeyError, IndexError) as e:
                entry["status"] = f"no figures: {type(e).__name__}: {e}"
        self.results["runs"][run.key] = entry
        print(f"gpu_bench: {run.key}: {entry['status']} in {entry['wall_s']:.0f} s", flush=True)

    def start_loop(self) -> Job | None:
        sizes = (
            ["--steps", "4", "--warmup", "1", "--loader-batches", "5", "--profile-steps", "2"]
            if self.args.dry_run
            else [
                "--steps",
                "30",
                "--warmup",
                "5",
                "--loader-batches",
                "100",
                "--profile-steps",
                "5",
            ]
        )
        cmd = [
            sys.executable, "-m", "bench.gpu_loop", "--config", str(REPO / "configs" / f"{LOOP_CONFIG}.yaml"),
            "--out", str(self.work / "loop.json"), "--profile", str(self.out / "profile.txt"), *sizes,
            f"data.source={self.args.shards}", "data.resampled=true", "data.batches_per_epoch=100000",
            *(DRY if self.args.dry_run else []),
        ]  # fmt: skip
        job = self.start("gpu_loop", cmd, LOOP_MIN_S, LOOP_TIMEOUT_S)
        if job is None:
            self.results["loop"] = {"status": f"skipped: {self.left():.0f} s left"}
        return job

    def finish_loop(self, job: Job) -> None:
        rc, output = self.wait(job)
        loop: dict[str, Any] = {"wall_s": time.monotonic() - job.started}
        figures = self.work / "loop.json"
        if figures.is_file():  # written after every part: a cut-off run keeps what it measured
            loop.update(json.loads(figures.read_text()))
        loop["status"] = "ok" if rc == 0 else ("timeout" if rc is None else f"failed (exit {rc})")
        if rc != 0:
            loop["output_tail"] = output[-2500:]
        self.results["loop"] = loop
        print(f"gpu_bench: gpu_loop: {loop['status']} in {loop['wall_s']:.0f} s", flush=True)

    def run(self) -> int:
        """On the device one job at a time, in PLAN order with the loop after LOOP_AFTER.
        A dry run starts its few jobs together: on CPU they only need to work, not be timed."""
        only = set(self.args.only or [])
        if only:
            plan = [r for r in PLAN if r.key in only]
        else:
            plan = [r for r in PLAN if r.in_dry_run or not self.args.dry_run or self.args.full]
            skipped = [r.key for r in PLAN if r not in plan]
            if skipped:
                self.results["not_in_dry_run"] = skipped
        self.save()
        steps: list[tuple[Any, Any]] = []
        for run in plan:
            steps.append(
                (
                    functools.partial(self.start_train, run),
                    functools.partial(self.finish_train, run),
                )
            )
            if run.key == LOOP_AFTER:
                steps.append((self.start_loop, self.finish_loop))
        if only and "loop" not in only:
            steps = [step for step in steps if step[0] != self.start_loop]
            self.results["loop"] = {"status": "not asked for (--only)"}
        elif not any(start == self.start_loop for start, _ in steps):
            steps.append((self.start_loop, self.finish_loop))
        together = self.args.dry_run and not self.args.full
        started = []
        for start, finish in steps:
            started.append((start(), finish))
            if not together:
                self.collect(started)
        self.collect(started)
        self.run_log.close()
        ran = [r for r in self.results["runs"].values() if r.get("status") == "ok"]
        loop_ok = self.results["loop"].get("status") in ("ok", "not asked for (--only)")
        return 0 if (ran or only == {"loop"}) and loop_ok else 1

    def collect(self, started: list[tuple[Job | None, Any]]) -> None:
        while started:
            job, finish = started.pop(0)
            if job is not None:
                finish(job)
            self.results["derived"] = derive(self.results)
            self.save()


@dataclass
class Job:
    label: str
    proc: subprocess.Popen
    log: Path
    started: float
    timeout: float


def labels(run: TrainRun) -> dict[str, Any]:
    """Precision, channels_last and compile as the shipped config and the overrides set them."""
    import yaml

    shipped = yaml.safe_load((REPO / "configs" / f"{run.config}.yaml").read_text())
    values = {
        "precision": "bf16" if shipped["deepspeed"].get("bf16", {}).get("enabled") else "fp32",
        "channels_last": bool(shipped["run"].get("channels_last", False)),
        "compile": bool(shipped["run"].get("compile", False)),
    }
    for item in run.overrides:
        key, _, text = item.partition("=")
        value = yaml.safe_load(text)
        if key == "deepspeed.bf16.enabled":
            values["precision"] = "bf16" if value else "fp32"
        elif key == "run.channels_last":
            values["channels_last"] = bool(value)
        elif key == "run.compile":
            values["compile"] = bool(value)
    return values


def derive(results: dict[str, Any]) -> dict[str, Any]:
    """What the issue asks from the runs together: MFU where the trainer could not count
    FLOPs (compiled runs), bf16 against fp32, and each target met or not."""
    runs = {k: v for k, v in results["runs"].items() if v.get("status") == "ok"}
    derived: dict[str, Any] = {}
    eager = runs.get("vqvae2_256-bf16", {})
    if "flops_per_step" in eager and "peak_tflops" in eager:
        for key, run in runs.items():
            if key.startswith("vqvae2_256-bf16") and "step_ms" in run:
                run["mfu_derived"] = (
                    eager["flops_per_step"] / (run["step_ms"] / 1000) / 1e12 / eager["peak_tflops"]
                )
    bf16, fp32 = runs.get("vqvae2_256-bf16"), runs.get("vqvae2_256-fp32")
    if bf16 and fp32:
        rel = abs(bf16["loss_tail"] - fp32["loss_tail"]) / abs(fp32["loss_tail"])
        usage = {
            k: {"bf16": bf16[k], "fp32": fp32[k], "ok": bf16[k] >= fp32[k] - USAGE_SLACK}
            for k in fp32
            if k.startswith("vq/") and k.endswith("_usage") and k in bf16
        }
        derived["bf16_vs_fp32"] = {
            "loss_bf16": bf16["loss_tail"],
            "loss_fp32": fp32["loss_tail"],
            "loss_rel_diff": rel,
            "loss_rel_tol": LOSS_REL_TOL,
            "loss_ok": rel <= LOSS_REL_TOL,
            "usage": usage,
            "usage_slack": USAGE_SLACK,
        }
    mfus = [
        r.get("mfu", r.get("mfu_derived"))
        for k, r in runs.items()
        if k.startswith("vqvae2_256-bf16")
    ]
    mfus = [m for m in mfus if m is not None]
    if mfus:
        derived["vqvae2_256_best_mfu"] = max(mfus)
        derived["mfu_target_met"] = max(mfus) >= 0.35
    waits = {k: r["data_wait_share"] for k, r in runs.items() if "data_wait_share" in r}
    if waits:
        derived["data_wait_max"] = max(waits.values())
        derived["data_wait_target_met"] = max(waits.values()) <= 0.05
    engine = results.get("loop", {}).get("engine", {})
    if "overhead" in engine:
        derived["engine_overhead"] = engine["overhead"]
        derived["engine_overhead_target_met"] = engine["overhead"] <= 0.05
    return derived


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def render_markdown(results: dict[str, Any]) -> str:
    lines = [f"# bench/gpu.sh results ({results['mode']})", ""]
    if results["mode"].startswith("dry-run"):
        lines += [
            "On CPU the trainer trains in fp32 whatever `precision` says; no MFU (no GPU peak).",
            "",
        ]
    lines += [
        "| run | precision | channels_last | compile | images/s | step ms | data wait | peak GPU GB | MFU | loss | wall s | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results["runs"].items():
        mfu = r.get("mfu", r.get("mfu_derived"))
        mfu_text = _pct(mfu) + (" (derived)" if "mfu" not in r and mfu is not None else "")
        lines.append(
            f"| {key} | {r.get('precision', '')} | {r.get('channels_last', '')} | {r.get('compile', '')} "
            f"| {_num(r.get('images_per_s'))} | {_num(r.get('step_ms'), 2)} | {_pct(r.get('data_wait_share'))} "
            f"| {_num(r.get('peak_mem_gb'), 2)} | {mfu_text} | {_num(r.get('loss_tail'), 4)} "
            f"| {_num(r.get('wall_s'), 0)} | {r.get('status', '')} |"
        )
    if results.get("not_in_dry_run"):
        lines += ["", "Not run in a dry run: " + ", ".join(results["not_in_dry_run"]) + "."]
    loop = results.get("loop", {})
    engine = loop.get("engine", {})
    if "plain" in engine:
        lines += [
            "",
            f"## Plain PyTorch against the DeepSpeed engine ({LOOP_CONFIG}, batch {engine['batch']})",
            "",
        ]
        lines += ["| loop | step ms | images/s | TFLOP/s | MFU |", "|---|---|---|---|---|"]
        for name in ("plain", "engine"):
            e = engine[name]
            lines.append(
                f"| {name} | {e['step_ms']:.2f} | {e['images_per_s']:.1f} | {e['tflops']:.2f} | {_pct(e['mfu'])} |"
            )
        lines.append(f"\nEngine overhead {100 * engine['overhead']:+.1f}% (target <= 5%).")
    elif loop:
        lines += ["", f"## In-process measurements: {loop.get('status')}", ""]
    if "images_per_s" in loop.get("loader", {}):
        ld = loop["loader"]
        lines.append(
            f"\nLoader alone: {ld['images_per_s']:.0f} images/s with num_workers={ld['num_workers']}."
        )
    features = loop.get("features", {})
    if "batch" in features:
        bare = ", ".join(
            f"{k.removeprefix('bare_').removesuffix('_images_per_s')} {v:.0f}"
            for k, v in features.items()
            if k.startswith("bare_")
        )
        extractor = features["extractor"]
        extracted = (
            f"{extractor['images_per_s']:.0f} images/s"
            if "images_per_s" in extractor
            else extractor.get("status", "")
        )
        lines.append(
            f"\nFeatures, bare `model.features` forward, images/s: {bare}; the evals' extractor "
            f"(`evals.features.iter_activations`, from the shards): {extracted}."
        )
    if "tflops" in loop.get("matmul", {}):
        lines.append(
            f"\nMatrix ceiling: 8192^3 bf16 product at {loop['matmul']['tflops']:.0f} TFLOP/s."
        )
    profile = loop.get("profile", {})
    if "top" in profile:
        idle = profile.get("device_idle_share")
        lines += ["", f"## Profile of {profile['steps']} engine steps ({profile['wall_ms_per_step']:.1f} ms/step wall"
                  + (f", device idle {100 * idle:.0f}%" if idle is not None else "") + ")", ""]  # fmt: skip
        lines += ["| op | ms/step | calls/step |", "|---|---|---|"]
        lines += [
            f"| `{t['op']}` | {t['ms_per_step']:.3f} | {t['calls_per_step']:.0f} |"
            for t in profile["top"]
        ]
    derived = results.get("derived", {})
    comparison = derived.get("bf16_vs_fp32")
    if comparison:
        lines += ["", "## bf16 against fp32 (vqvae2_256, same steps)", ""]
        lines.append(
            f"loss {comparison['loss_bf16']:.5f} (bf16) vs {comparison['loss_fp32']:.5f} (fp32): "
            f"{100 * comparison['loss_rel_diff']:.2f}% apart, tolerance {100 * LOSS_REL_TOL:.0f}%: "
            f"{'ok' if comparison['loss_ok'] else 'NOT MET'}."
        )
        for key, u in comparison["usage"].items():
            lines.append(
                f"{key}: {u['bf16']:.3f} (bf16) vs {u['fp32']:.3f} (fp32): {'ok' if u['ok'] else 'LOWER in bf16'}."
            )
    if derived:
        dry = results["mode"].startswith("dry-run")
        lines += [
            "",
            "## Targets" + (" (GPU targets: a CPU dry run does not test them)" if dry else ""),
            "",
        ]
        for name, key, value_key in (
            ("vqvae2_256 MFU >= 35%", "mfu_target_met", "vqvae2_256_best_mfu"),
            ("data wait <= 5%", "data_wait_target_met", "data_wait_max"),
            ("engine overhead <= 5%", "engine_overhead_target_met", "engine_overhead"),
        ):
            if key in derived:
                lines.append(
                    f"- {name}: {_pct(derived[value_key])}, {'met' if derived[key] else 'not met'}"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="results directory")
    parser.add_argument("--shards", type=Path, required=True, help="frame shards to train on")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="seconds for everything (420; dry run 300)"
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, fewer runs")
    parser.add_argument("--full", action="store_true", help="with --dry-run: every run")
    keys = [r.key for r in PLAN] + ["loop"]
    parser.add_argument(
        "--only", nargs="+", choices=keys, metavar="KEY", help=f"just these: {', '.join(keys)}"
    )
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 300.0 if args.dry_run else 420.0
    args.out.mkdir(parents=True, exist_ok=True)
    return Driver(args).run()


if __name__ == "__main__":
    raise SystemExit(main())
