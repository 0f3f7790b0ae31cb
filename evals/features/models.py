"""What features are extracted from: an export, its random-init twin, or raw pixels.

A `FeatureSource` is a model in eval mode with the preprocessing its training used and a
hash of its weights (the cache keys on it). Exports are read only through
`pretrain.load_export`; random-init baselines are rebuilt from the export's registry name
and kwargs under a fixed seed; raw pixels are a one-layer "model" so the pixel baseline
takes the same pass and the same cache as everything else.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from evals.features.cache import content_hash, file_sha256


class FeatureError(ValueError):
    """One line naming the export/layer and the problem (e.g. unknown layer, listing valid ones)."""


@dataclass
class FeatureSource:
    """What is being evaluated: a model in eval mode and how its inputs are preprocessed.

    weights_hash: sha256 of the export's model.safetensors, or of the random init's
    tensors; name: for reports, e.g. "export step_400" or "random-init seed 0"; spec:
    model.json ({"name", "kwargs", "step", ...}); path: the export directory, if any.
    """

    model: nn.Module
    preprocess: dict
    weights_hash: str
    name: str
    spec: dict | None = None
    path: Path | None = None
    _layers: list[str] | None = field(default=None, repr=False)


def from_export(path: str | Path, *, preprocess: dict | None = None) -> FeatureSource:
    """Load an export via `pretrain.load_export`; preprocessing from its model.json.

    An export written before model.json held `preprocess` raises FeatureError asking to
    re-export, unless `preprocess` is given explicitly. A missing or corrupt export raises
    `pretrain.ExportError` (one line, naming the file)."""
    from data_pipeline.images import check_preprocess
    from pretrain import load_export
    from pretrain.export import WEIGHTS

    path = Path(path)
    directory = path.parent if path.is_file() else path
    model = load_export(directory)
    spec = dict(model.export_spec)
    if preprocess is None:
        if "preprocess" not in spec:
            raise FeatureError(
                f"{directory / 'model.json'}: no 'preprocess' (an older export); re-export it "
                f"with `catneuron export RUN --step {spec.get('step', 'N')}`"
            )
        preprocess = spec["preprocess"]
    try:
        check_preprocess(preprocess)
    except ValueError as e:
        raise FeatureError(f"{directory / 'model.json'}: {e}") from None
    step = spec.get("step")
    return FeatureSource(
        model=model,
        preprocess=dict(preprocess),
        weights_hash=file_sha256(directory / WEIGHTS),
        name=f"export step_{step}" if step is not None else f"export {directory.name}",
        spec=spec,
        path=directory,
    )


def _tensors_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def random_init(spec_or_source: FeatureSource | dict, seed: int = 0) -> FeatureSource:
    """The same architecture (registry name + kwargs) and preprocessing with random weights
    drawn under `torch.manual_seed(seed)` (the global RNG is left as it was): the baseline
    every figure sits beside. A dict is a model.json with `preprocess`."""
    from pretrain import build_model

    if isinstance(spec_or_source, FeatureSource):
        spec, preprocess = spec_or_source.spec, spec_or_source.preprocess
        if spec is None:
            raise FeatureError(f"{spec_or_source.name}: no model spec to rebuild it from")
    else:
        spec, preprocess = spec_or_source, spec_or_source.get("preprocess")
        if preprocess is None:
            raise FeatureError(f"model spec {spec.get('name')}: no 'preprocess' for random init")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(spec["name"], **spec["kwargs"])
    model.eval()
    random_spec = {**spec, "random_init_seed": seed}
    return FeatureSource(
        model=model,
        preprocess=dict(preprocess),
        weights_hash=_tensors_sha256(model),
        name=f"random-init seed {seed}",
        spec=random_spec,
    )


class _Pixels(nn.Module):
    """The raw-pixels baseline as a model: its one feature is the preprocessed input."""

    def features(self, x: Tensor, cond: Tensor | None = None) -> dict[str, Tensor]:
        return {"pixels": x.flatten(1)}


def pixels(preprocess: dict) -> FeatureSource:
    """Raw pixels at the model's input size and normalization, as a source of one layer
    `pixels` (N, C*H*W): the probes' pixel baseline goes through the same pass and cache."""
    from data_pipeline.images import check_preprocess

    check_preprocess(preprocess)
    return FeatureSource(
        model=_Pixels(),
        preprocess=dict(preprocess),
        weights_hash=content_hash("raw pixels", 1),
        name="raw pixels",
        spec={"name": "pixels", "kwargs": {}},
    )
