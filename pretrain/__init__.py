"""Pretraining: the model zoo, the DeepSpeed trainer, checkpoints and exports.

Evals read trained models only through `load_export` (added with the trainer).
"""

from pretrain.models import Autoencoder, Stage, available_models, build_model

__all__ = ["Autoencoder", "Stage", "available_models", "build_model"]
