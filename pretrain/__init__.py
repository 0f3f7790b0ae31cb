"""Pretraining: the model zoo, the DeepSpeed trainer, checkpoints and exports.

Evals read trained models only through `load_export`: safetensors weights and a JSON
spec, no pickle, independent of how the model was trained.
"""

from pretrain.export import load_export
from pretrain.models import Autoencoder, Stage, available_models, build_model

__all__ = ["Autoencoder", "Stage", "available_models", "build_model", "load_export"]
