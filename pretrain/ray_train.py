"""`catneuron train CONFIG --ray`: the same trainer loop on every Ray Train worker, restarted when one is lost.

Ray Train's `TorchTrainer` starts one worker per rank and sets up the torch process group
and the rank environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR) itself; each worker
then runs `pretrain.train.train(config)` unchanged, whose DeepSpeed engine joins that
process group (Ray's "Get Started with DeepSpeed": no launcher, no second process group).
Checkpoints stay the trainer's own DeepSpeed checkpoints under `RUN/checkpoints/`, with
`RUN` on the shared storage path; when a worker or its node dies, Ray Train
(`FailureConfig(max_failures)`) restarts the whole worker group, and the trainer resumes
from `latest` exactly as a rerun does. A config error or a non-finite loss is reported
back as a result, not raised, so that Ray never retries it. SIGTERM, SIGUSR1 or Ctrl-C to
this driver writes `RUN/STOP`: the workers (whose loop runs in a thread, out of reach of
signals) read it at every step, save at one step boundary, and the driver exits 75.

This is the only training module that imports Ray; `pretrain.train` never does, so a
plain GPU node needs torch, deepspeed and webdataset only.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from data_pipeline.cli_help import HelpFormatter
from pretrain.config import ConfigError, load_config
from pretrain.restart import EXIT_CONFIG_ERROR, EXIT_NON_FINITE
from pretrain.stop import EXIT_PREEMPTED, SIGNALS, STOP_FILE

RAY_DIR = ".ray_train"
"""Ray Train's own run state (`RunConfig.storage_path`), beside the run directories."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="catneuron train --ray",
        description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument("config", type=Path, help="run config YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, values parsed as YAML")
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (HOST:6379, ray://HOST:10001, auto); default: $RAY_ADDRESS, "
        "$CATNEURON_RAY_ADDRESS, the `catneuron cluster up` head, else a local cluster",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=-1,
        help="training ranks; -1: one per GPU of the cluster, or 1 where it has none",
    )
    p.add_argument(
        "--use-gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one GPU per worker; default: when the cluster has GPUs",
    )
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker")
    p.add_argument(
        "--storage-path",
        default=None,
        help="directory every node sees (NFS, a mounted bucket): run directories and Ray's "
        "run state go there; default: run.output_dir",
    )
    p.add_argument(
        "--max-restarts",
        "--max-failures",
        dest="max_failures",
        type=int,
        default=0,
        help="restart the worker group from the last checkpoint this many times (Ray Train's "
        "FailureConfig.max_failures; -1: without limit)",
    )
    return p.parse_intermixed_args(argv)


def train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the trainer loop of `pretrain.train`, as every launcher rank runs it."""
    import ray.train

    from pretrain import train as trainer
    from pretrain.config import from_dict

    try:
        trainer.train(from_dict(loop_config["config"]))
    except ConfigError as e:  # the same on every rank (a run started with another model)
        _report_failure(str(e), EXIT_CONFIG_ERROR)
        return
    except trainer.NonFiniteLoss as e:  # every rank agrees on it through an all-reduce
        _report_failure(str(e), EXIT_NON_FINITE)
        return
    except trainer.Preempted:  # the driver's stop file: every rank saved at one step
        ray.train.report({"exit_code": EXIT_PREEMPTED})
        return
    ray.train.report({"exit_code": 0})


def _report_failure(message: str, code: int) -> None:
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        print(f"catneuron train: {message}", file=sys.stderr, flush=True)
    ray.train.report({"exit_code": code, "error": message})


def _cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        storage = Path(args.storage_path or config.run.output_dir).expanduser().resolve()
        # Workers may start in other directories (other nodes): every path they read is absolute.
        config.run.output_dir = str(storage)
        source = config.data.source
        if source and "://" not in source and not source.startswith("/"):
            config.data.source = str(Path(source).resolve())
        # the checks that hold on any node (devices are the workers' business, not the driver's)
        from pretrain.preflight import check_data_source, check_model

        check_model(config)
        check_data_source(config)
    except ConfigError as e:
        print(f"catneuron train: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR

    from data_pipeline.ray_cluster import is_loopback, loopback_client_env, resolve_address

    # $RAY_ADDRESS, else $CATNEURON_RAY_ADDRESS or the `catneuron cluster up` head
    address = args.address or os.environ.get("RAY_ADDRESS")
    address = resolve_address(address)
    if address and is_loopback(address):
        loopback_client_env()  # before `import ray`: Ray reads it then

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    owns_ray = not ray.is_initialized()  # a caller's `ray.init` is joined, and left running
    if owns_ray and address:
        ray.init(address=address)
    elif owns_ray:
        # A local cluster on loopback only. Ray Train's placement-group cleaner asks the
        # state API, which the dashboard serves (on 127.0.0.1); worker prints go to the
        # console once, not also through Ray Train's print-to-log patch.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1")
    try:
        gpus = _cluster_gpus()
        use_gpu = gpus > 0 if args.use_gpu is None else args.use_gpu
        workers = args.num_workers if args.num_workers > 0 else max(gpus if use_gpu else 1, 1)
        print(
            f"catneuron train: Ray Train, {workers} worker(s) on {'GPU' if use_gpu else 'CPU'}, "
            f"run directory {config.run_dir}, max_failures={args.max_failures}",
            flush=True,
        )
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"config": config.to_dict()},
            scaling_config=ScalingConfig(
                num_workers=workers,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": args.cpus_per_worker},  # use_gpu adds 1 GPU
            ),
            run_config=RunConfig(
                name=config.run.name,
                storage_path=str(storage / RAY_DIR),
                failure_config=FailureConfig(max_failures=args.max_failures),
            ),
        )
        stop_file = config.run_dir / STOP_FILE

        def stop(signum: int, _frame: object) -> None:
            # Ray Train workers run their loop in a thread and cannot take signals: they read
            # this file at every step, save at one step boundary and report EXIT_PREEMPTED
            stop_file.parent.mkdir(parents=True, exist_ok=True)
            stop_file.touch()
            print(
                f"catneuron train: {signal.Signals(signum).name}: the workers save at the next step",
                file=sys.stderr,
                flush=True,
            )

        previous = {s: signal.signal(s, stop) for s in SIGNALS}
        try:
            result = trainer.fit()
        except Exception as e:  # Ray's TrainingFailedError: retries used up
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(
                f"catneuron train: Ray Train failed after {args.max_failures} restart(s): {first}",
                file=sys.stderr,
            )
            return 1
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return int((result.metrics or {}).get("exit_code", 0))
    finally:
        if owns_ray:
            ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
