"""Trainer throughput: images/s and step time per shipped config, and the DeepSpeed overhead.

    python bench/train.py [--shards DIR] [--steps 30] [--configs conv_ae vae ...]

1. Every shipped config's tiny CPU variant through `catneuron train` (the real launcher)
   with 1 and 2 CPU ranks; figures are read back from the run's log.jsonl, leaving out
   the first logging interval (engine start, first batches).
2. The DeepSpeed engine against a plain PyTorch loop (same model, optimizer, schedule and
   in-memory batches, one rank): the engine's overhead per step (target <= 5%).
3. With a GPU: `vqvae2_256` in bf16, with channels_last and with torch.compile: images/s,
   MFU and the data-wait share.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["stacked_ae_patches", "conv_ae", "vae", "vqvae2_256", "local_sparse_cat"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_shards(root: Path) -> Path:
    from data_pipeline import shard
    from data_pipeline.synth import synthesize

    synthesize(root / "videos", 8, seed=0)
    argv = [str(root / "videos"), "--out", str(root / "shards"), "--fps", "10", "--size", "256"]
    if shard.main([*argv, "--crop", "center", "--shard-max-count", "40"]) != 0:
        raise SystemExit("bench: sharding the synthetic videos failed")
    return root / "shards"


def launch(
    config: Path, shards: Path, run_root: Path, ranks: int, steps: int, extra: list[str]
) -> dict:
    """One `catneuron train` run; the median perf figures after the first logging interval."""
    name = f"{config.stem}-{ranks}r-{len(list(run_root.glob('*')))}"
    every = max(steps // 6, 1)
    cmd = [
        sys.executable, "-m", "catneuron", "train", str(config), "--num-gpus", str(ranks),
        "--master-port", str(free_port()), f"data.source={shards}", f"run.output_dir={run_root}",
        f"run.name={name}", f"stages.steps={steps}", f"logging.every={every}", "logging.image_every=0",
        f"checkpoint.every={10 * steps}", *extra,
    ]  # fmt: skip
    # One thread per rank: on a shared machine, spinning OpenMP threads of one rank swamp the figures.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return {"error": result.stdout[-2000:] + result.stderr[-2000:]}
    records = [
        json.loads(line) for line in (run_root / name / "log.jsonl").read_text().splitlines()
    ][1:]
    keys = ("perf/images_per_s", "perf/step_ms", "perf/data_wait_share", "perf/mfu", "perf/tflops")
    return {
        k: statistics.median(r[k] for r in records) for k in keys if records and k in records[0]
    }


def engine_overhead(config_path: Path, shards: Path, steps: int) -> tuple[float, float]:
    """Median step time (ms) of a plain PyTorch loop and of the DeepSpeed engine, one rank."""
    from pretrain.config import load_config, resolve_deepspeed
    from pretrain.models import build_model
    from pretrain.train import FrameStream, build_engine, init_distributed

    config = load_config(
        config_path, [f"data.source={shards}", "data.num_workers=0", "data.batch_size=32"]
    )
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    init_distributed(on_gpu=False)
    # One core each: spinning OpenMP threads on a busy machine swamp the difference.
    torch.set_num_threads(1)
    # The trainer's own data stream, so both loops see exactly what training sees.
    stream = FrameStream(config, device=torch.device("cpu"), with_labels=False, epoch=0, samples=0)
    batches = [next(stream)["image"] for _ in range(8)]

    # Two copies of the same model: one in a plain loop, one in a DeepSpeed engine.
    torch.manual_seed(0)
    plain_model = build_model(config.model.name, **config.model.kwargs)
    engine_model = copy.deepcopy(plain_model)
    plain_stage = plain_model.stages()[-1]
    optimizer = torch.optim.AdamW(plain_stage.parameters(), lr=config.optimizer.lr)
    engine_stage = engine_model.stages()[-1]
    ds_config = resolve_deepspeed(config, 1, on_gpu=False)
    engine = build_engine(engine_model, engine_stage, config, ds_config, steps)

    def plain_step(x: torch.Tensor) -> None:
        loss, _ = plain_stage.loss(plain_stage.prepare(x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain_stage.parameters(), 1.0)
        optimizer.step()

    def engine_step(x: torch.Tensor) -> None:
        loss, _ = engine(x)
        engine.backward(loss)
        engine.step()

    # Interleaved, so that load from other processes hits both loops alike; medians.
    times: dict[str, list[float]] = {"plain": [], "engine": []}
    for i in range(steps):
        for name, step in (("plain", plain_step), ("engine", engine_step)):
            start = time.perf_counter()
            step(batches[i % len(batches)])
            times[name].append(time.perf_counter() - start)
    return tuple(1000 * statistics.median(t[3:]) for t in times.values())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shards", type=Path, default=None, help="frame shards (default: synthesize some)"
    )
    parser.add_argument("--steps", type=int, default=30, help="steps per CPU run")
    parser.add_argument("--configs", nargs="*", default=CONFIGS, help="shipped config names")
    parser.add_argument(
        "--overhead-config",
        default="conv_ae",
        help="shipped config for the engine-overhead comparison",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="catneuron-bench-"))
    shards = args.shards or make_shards(work)

    print(f"## CPU ({os.cpu_count()} cores), tiny config variants, {args.steps} steps\n")
    print("| config | ranks | images/s | step ms | data wait |")
    print("|---|---|---|---|---|")
    for name in args.configs:
        for ranks in (1, 2):
            figures = launch(
                REPO / "configs" / "tiny" / f"{name}.yaml",
                shards,
                work / "runs",
                ranks,
                args.steps,
                [],
            )
            if "error" in figures:
                print(f"| {name} | {ranks} | failed: {figures['error'].splitlines()[-1]} | | |")
                continue
            print(
                f"| {name} | {ranks} | {figures['perf/images_per_s']:.1f} | {figures['perf/step_ms']:.1f} "
                f"| {100 * figures['perf/data_wait_share']:.0f}% |",
                flush=True,
            )

    plain_ms, engine_ms = engine_overhead(
        REPO / "configs" / f"{args.overhead_config}.yaml", shards, 60
    )
    print(
        f"\n## DeepSpeed engine overhead ({args.overhead_config}, batch 32, 1 CPU rank, 1 thread)\n"
    )
    print(
        f"plain PyTorch loop {plain_ms:.2f} ms/step, DeepSpeed engine {engine_ms:.2f} ms/step: ",
        end="",
    )
    print(f"overhead {100 * (engine_ms / plain_ms - 1):+.1f}% (target <= 5%)")

    if not torch.cuda.is_available():
        print(
            "\n## GPU\n\nno GPU here: the bf16 / channels_last / torch.compile runs of vqvae2_256 were skipped"
        )
        return 0
    print("\n## GPU: vqvae2_256, bf16\n")
    print("| variant | images/s | step ms | MFU | data wait |")
    print("|---|---|---|---|---|")
    bf16 = ["deepspeed.bf16.enabled=true"]
    variants = {
        "bf16": bf16,
        "bf16 + channels_last": [*bf16, "run.channels_last=true"],
        "bf16 + channels_last + compile": [*bf16, "run.channels_last=true", "run.compile=true"],
    }
    config = REPO / "configs" / "vqvae2_256.yaml"
    for label, overrides in variants.items():
        figures = launch(config, shards, work / "runs", 1, args.steps, overrides)
        if "error" in figures:
            print(f"| {label} | failed: {figures['error'].splitlines()[-1]} | | | |")
            continue
        mfu = f"{100 * figures['perf/mfu']:.1f}%" if "perf/mfu" in figures else "n/a"
        print(
            f"| {label} | {figures['perf/images_per_s']:.1f} | {figures['perf/step_ms']:.1f} | {mfu} "
            f"| {100 * figures['perf/data_wait_share']:.0f}% |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
