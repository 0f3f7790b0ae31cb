"""Pretraining: the model zoo, the DeepSpeed trainer, checkpoints and exports.

Evals read trained models only through `load_export`: safetensors weights and a JSON
spec, no pickle, independent of how the model was trained.
"""

import os

import torch

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    # Say it instead of letting DeepSpeed guess: its guess prints a warning in every process.
    os.environ["DS_ACCELERATOR"] = "cpu"

from pretrain.export import ExportError, load_export, read_export_spec
from pretrain.models import Autoencoder, Stage, available_models, build_model

__all__ = [
    "ExportError",
    "read_export_spec",
    "Autoencoder",
    "Stage",
    "available_models",
    "build_model",
    "load_export",
]
