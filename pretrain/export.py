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

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pretrain import checkpoint
from pretrain.config import TrainConfig, from_dict
from pretrain.models import Autoencoder, build_model

FORMAT_VERSION = 1
WEIGHTS, SPEC = "model.safetensors", "model.json"


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
) -> Path:
    """Write an export atomically: under a temporary name, then renamed over any older one.

    Floating tensors are stored as float32 (a bf16 run exports the same format as an
    fp32 one); each tensor is copied so that tied weights do not share storage, which
    safetensors refuses.
    """
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


def load_export(path: str | Path) -> Autoencoder:
    """Rebuild a model from an export directory (or a file in it), in eval mode, without pickle."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    meta = json.loads((directory / SPEC).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{directory / SPEC}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}"
        )
    model = build_model(meta["name"], **meta["kwargs"])
    model.load_state_dict(load_file(directory / WEIGHTS), strict=True)
    return model.eval()


def export_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """Write the export of checkpoint `step` (default: latest) and return its directory."""
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
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="catneuron export",
        description="Write RUN/exports/step_N/{model.safetensors,model.json} from a run's DeepSpeed checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("run", type=Path, help="run directory (holding checkpoints/)")
    parser.add_argument(
        "--step", type=int, default=None, help="global step of the checkpoint (None: the latest)"
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
