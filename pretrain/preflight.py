"""What `catneuron train` checks before the launcher starts a single rank.

A mistake found inside the ranks costs a launcher start, N process starts and a
Traceback per rank; found here it costs one line. Each check raises `ConfigError` with
the key or path at fault, and `catneuron train` prints it and exits 2.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path

import torch

from pretrain.config import ConfigError, TrainConfig
from pretrain.models import build_model


def check_data_source(config: TrainConfig) -> None:
    """`data.source` names shards that exist and hold samples (URLs are left to the loader)."""
    from data_pipeline.shard_list import resolve_shards

    source = config.data.source
    if not source:
        raise ConfigError("'data.source' is not set: give a shard directory, manifest or pattern")
    try:
        resolve_shards(source)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.source: {e}") from None


def accepted_kwargs(name: str) -> list[str]:
    from pretrain.models import _REGISTRY

    signature = inspect.signature(_REGISTRY[name])
    return [p.name for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY or (
        p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self")]  # fmt: skip


def check_model(config: TrainConfig) -> None:
    """The model builds from `model.name` and `model.kwargs`, on the meta device (no memory)."""
    name, kwargs = config.model.name, config.model.kwargs
    try:
        with torch.device("meta"):
            build_model(name, **kwargs)
    except KeyError as e:
        raise ConfigError(f"model.name: {e.args[0]}") from None
    except TypeError as e:
        accepted = accepted_kwargs(name)
        unknown = [k for k in kwargs if k not in accepted]
        if unknown:
            raise ConfigError(
                f"model.kwargs: {name} takes no argument '{unknown[0]}'; "
                f"it accepts: {', '.join(accepted)}"
            ) from None
        raise ConfigError(f"model.kwargs: {name}: {e}") from None
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"model.kwargs: {name}: {e}") from None


def check_run_dir(config: TrainConfig) -> None:
    """The run directory can be created and written (checkpoints, exports, TensorBoard)."""
    run_dir = config.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"{run_dir}: run directory is not writable ({e.strerror or e})") from None


def check_devices(num_gpus: int, hostfile: Path | None) -> None:
    """`--num-gpus` no more than the GPUs here (on one machine; CPU ranks have no such bound)."""
    if hostfile is not None or num_gpus <= 0 or not torch.cuda.is_available():
        return
    present = torch.cuda.device_count()
    if num_gpus > present:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise ConfigError(f"--num-gpus {num_gpus}: this machine has {present} GPU(s){where}")


def check_all(config: TrainConfig, num_gpus: int, hostfile: Path | None) -> None:
    check_model(config)
    check_data_source(config)
    check_run_dir(config)
    check_devices(num_gpus, hostfile)
