"""Exports: the one artifact evals read (`model.safetensors` + `model.json`, no pickle).

An export is written after every checkpoint by the trainer, and on demand from a
checkpoint by `catneuron export RUN [--step N]`. It is independent of the DeepSpeed
world size and ZeRO stage, so evals never depend on how a model was trained.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from data_pipeline.cli_help import HelpFormatter
from pretrain.config import TrainConfig, from_dict

if TYPE_CHECKING:  # torch, safetensors and the models load in the functions that use them,
    # so that `catneuron export --help` answers before torch is imported
    import torch
    from torch import nn

    from pretrain.models import Autoencoder

FORMAT_VERSION = 1
WEIGHTS, SPEC = "model.safetensors", "model.json"


class ExportError(ValueError):
    """An export that cannot be read: the message names the file and the problem."""


def preprocess_spec(config: TrainConfig) -> dict:
    """How training turned a decoded frame into the model's input, so that evals do the same.

    Evals reproduce the deterministic part only: resize the shorter side, centre crop,
    grayscale, then mean/std after scaling to [0, 1] (random crops and flips are training
    augmentations, not preprocessing).
    """
    d = config.data
    return {
        "resize": d.resize,
        "crop": d.crop,
        "grayscale": d.grayscale,
        "mean": list(d.mean),
        "std": list(d.std),
    }


def export_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "exports" / f"step_{step}"


def write_export(
    state_dict: dict[str, torch.Tensor],
    spec: dict,
    out_dir: Path,
    *,
    stage: int,
    step: int,
    config_hash: str,
    preprocess: dict | None = None,
) -> Path:
    """Write an export atomically: under a temporary name, then renamed over any older one.

    Floating tensors are stored as float32 (a bf16 run exports the same format as an
    fp32 one); each tensor is copied so that tied weights do not share storage, which
    safetensors refuses.
    """
    import torch
    from safetensors.torch import save_file

    tensors = {
        name: t.detach()
        .to("cpu", torch.float32 if t.is_floating_point() else t.dtype, copy=True)
        .contiguous()
        for name, t in state_dict.items()
    }
    meta = {
        "name": spec["name"],
        "kwargs": spec["kwargs"],
        "stage": stage,
        "step": step,
        "config_hash": config_hash,
        "format_version": FORMAT_VERSION,
    }
    if preprocess is not None:
        meta["preprocess"] = preprocess
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
    (tmp / SPEC).write_text(json.dumps(meta, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def export_model(
    model: nn.Module, out_dir: Path, *, stage: int, step: int, config_hash: str
) -> Path:
    return write_export(
        model.state_dict(), model.spec, out_dir, stage=stage, step=step, config_hash=config_hash
    )


def read_export_spec(path: str | Path) -> dict:
    """The export's model.json (registry name, kwargs, stage, step, preprocess), checked."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    spec_file = directory / SPEC
    if not spec_file.is_file():
        raise ExportError(f"{spec_file}: no such file (not an export directory)")
    try:
        meta = json.loads(spec_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{spec_file}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ExportError(f"{spec_file}: format_version {version} is not {FORMAT_VERSION}")
    for key in ("name", "kwargs"):
        if key not in meta:
            raise ExportError(f"{spec_file}: missing '{key}'")
    return meta


def load_export(path: str | Path) -> Autoencoder:
    """Rebuild a model from an export directory (or a file in it), in eval mode, without pickle.

    The model's `export_spec` attribute holds its model.json, preprocessing included.
    Raises ExportError (one line, naming the file) for a missing, truncated or
    mismatched export.
    """
    from safetensors.torch import load_file

    from pretrain.models import build_model

    path = Path(path)
    directory = path.parent if path.is_file() else path
    meta = read_export_spec(directory)
    model = build_model(meta["name"], **meta["kwargs"])
    weights_file = directory / WEIGHTS
    try:
        weights = load_file(weights_file)
    except FileNotFoundError:
        raise ExportError(f"{weights_file}: no such file") from None
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ExportError(f"{weights_file}: unreadable safetensors file ({e})") from None
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ExportError(f"{weights_file}: does not match {meta['name']} ({first})") from None
    model.export_spec = meta
    return model.eval()


def export_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """Write the export of checkpoint `step` (default: latest) and return its directory."""
    from pretrain import checkpoint  # DeepSpeed: only here, not for every load_export

    checkpoint_dir = run_dir / "checkpoints"
    tag = checkpoint.latest_tag(checkpoint_dir) if step is None else checkpoint.tag_for(step)
    if tag is None or not (checkpoint_dir / tag).is_dir():
        found = (
            ", ".join(str(checkpoint.step_of(t)) for t in checkpoint.list_tags(checkpoint_dir))
            or "none"
        )
        raise FileNotFoundError(
            f"{checkpoint_dir}: no checkpoint {tag or '(latest)'}; steps on disk: {found}"
        )
    state, model_state = checkpoint.read_checkpoint(checkpoint_dir, tag)
    config: TrainConfig = from_dict(state.config)
    spec = {"name": config.model.name, "kwargs": config.model.kwargs}
    out_dir = export_dir(run_dir, state.global_step)
    return write_export(
        model_state,
        spec,
        out_dir,
        stage=state.stage,
        step=state.global_step,
        config_hash=config.recipe_hash(),
        preprocess=preprocess_spec(config),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="catneuron export",
        description="Write RUN/exports/step_N/{model.safetensors,model.json} from a run's DeepSpeed checkpoint.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("run", type=Path, help="run directory (holding checkpoints/)")
    parser.add_argument(
        "--step", type=int, default=None, help="global step of the checkpoint (default: the latest)"
    )
    args = parser.parse_args(argv)
    try:
        out_dir = export_checkpoint(args.run, args.step)
    except (FileNotFoundError, ValueError) as e:
        print(f"catneuron export: {e}", file=sys.stderr)
        return 2
    print(out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
