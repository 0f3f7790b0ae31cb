"""Pretraining: the model zoo, the DeepSpeed trainer, checkpoints and exports.

Evals read trained models only through `load_export`: safetensors weights and a JSON
spec, no pickle, independent of how the model was trained.

The names below load on first use (PEP 562), so that `pretrain.config` and the
`catneuron train --help` path do not pay for importing torch and DeepSpeed.
"""

import importlib
import os
import shutil

if "DS_ACCELERATOR" not in os.environ and not (
    os.path.exists("/proc/driver/nvidia") or shutil.which("nvidia-smi")
):
    # Say it instead of letting DeepSpeed guess: its guess prints a warning in every process.
    os.environ["DS_ACCELERATOR"] = "cpu"

_EXPORTS = {
    "ExportError": "pretrain.export",
    "load_export": "pretrain.export",
    "read_export_spec": "pretrain.export",
    "Autoencoder": "pretrain.models",
    "Stage": "pretrain.models",
    "available_models": "pretrain.models",
    "build_model": "pretrain.models",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pretrain' has no attribute {name!r}")
