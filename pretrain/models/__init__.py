"""The model registry: one name -> one constructor, used by the trainer and by exports.

`build_model(name, **kwargs)` is the only way the rest of catneuron makes a model, so
an export's `model.json` ({"name", "kwargs"}) always rebuilds the same architecture.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from pretrain.models.base import Autoencoder, Metrics, Stage

_REGISTRY: dict[str, Callable[..., Autoencoder]] = {}

# Modules that register models on import; imported lazily by `build_model`.
_MODEL_MODULES = (
    "pretrain.models.stacked_ae",
    "pretrain.models.conv_ae",
    "pretrain.models.wta_conv_ae",
    "pretrain.models.vae",
    "pretrain.models.vqvae2",
    "pretrain.models.local_sparse",
    "pretrain.models.shared_encoder",
)


def register(name: str) -> Callable[[Callable[..., Autoencoder]], Callable[..., Autoencoder]]:
    def deco(cls: Callable[..., Autoencoder]) -> Callable[..., Autoencoder]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name '{name}' is registered twice")
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_all() -> None:
    for module in _MODEL_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:  # a family not written yet must not hide the others
            if e.name != module:
                raise


def available_models() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def build_model(name: str, **kwargs) -> Autoencoder:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model '{name}'; registered: {', '.join(sorted(_REGISTRY))}")
    model = _REGISTRY[name](**kwargs)
    model.spec = {"name": name, "kwargs": dict(kwargs)}
    return model


__all__ = ["Autoencoder", "Metrics", "Stage", "available_models", "build_model", "register"]
