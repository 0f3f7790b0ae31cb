"""The run config: one YAML file, typed dataclasses behind it, `key.sub=value` overrides.

Every field carries a docstring because the YAML is the user interface of `catneuron
train`. Unknown keys are errors that name the dotted key, so a typo never silently trains
with a default. The `deepspeed:` section is a plain DeepSpeed config; `resolve_deepspeed`
fills in what the rest of the config already decides (batch sizes, clipping, precision
on CPU) and refuses a `deepspeed:` key that contradicts it, so nothing is set twice.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user error in a run config: the message names the file and the key."""


@dataclass
class RunConfig:
    name: str = "run"
    """Run name: the run directory is `<output_dir>/<name>`, and a rerun with the same name resumes."""
    output_dir: str = "runs"
    """Parent directory of run directories (checkpoints/, exports/, tb/, log.jsonl)."""
    seed: int = 0
    """Seed for model initialization and every random draw of the trainer."""
    stop_after_step: int | None = None
    """End this invocation after this global step, with a checkpoint; a rerun resumes (fixed-length job slots)."""
    compile: bool = False
    """Wrap each stage in torch.compile through the DeepSpeed engine."""
    channels_last: bool = False
    """Keep the model and its inputs in channels_last memory format (faster convolutions on GPU)."""


@dataclass
class DataConfig:
    source: str = ""
    """Shard directory, `manifest/shards.parquet`, or brace pattern of `.tar` shards."""
    batch_size: int = 32
    """Micro batch per rank; DeepSpeed's batch keys are derived from it."""
    resize: int | None = None
    """Resize the shorter side to this many pixels before cropping."""
    crop: int | None = None
    """Square crop size (center crop unless `random_crop`)."""
    random_crop: bool = False
    """Crop at a random position (patch sampling) instead of the center."""
    flip: bool = False
    """Random horizontal flips."""
    grayscale: bool = False
    """Convert frames to one channel."""
    mean: list[float] = field(default_factory=lambda: [0.0])
    """Mean subtracted after scaling pixels to [0, 1]: one value per channel, or one for all."""
    std: list[float] = field(default_factory=lambda: [1.0])
    """Standard deviation divided out after the mean: one value per channel, or one for all."""
    shuffle_buffer: int = 1000
    """Samples held in the shuffle buffer (0: shard order only)."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    resampled: bool = False
    """Draw shards with replacement (an endless stream; needs fewer shards than ranks x workers)."""
    batches_per_epoch: int | None = None
    """Batches per rank that make an epoch; by default the shards' sample count decides."""
    with_labels: bool = False
    """Read the `cls` member; conditional models need it."""


@dataclass
class ModelConfig:
    name: str = "conv_ae"
    """Registry name (`pretrain.available_models()` lists them)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Constructor keyword arguments, stored in every export's model.json."""


@dataclass
class StagesConfig:
    steps: int | list[int] = 1000
    """Optimizer steps per greedy stage: one number for every stage, or a list with one per stage."""


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""


@dataclass
class ScheduleConfig:
    warmup_steps: int = 0
    """Linear warmup from 0 at the start of every stage."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at `lr * min_lr_ratio` at the end of each stage."""


@dataclass
class CheckpointConfig:
    every: int = 1000
    """Save a DeepSpeed checkpoint (and an export) every this many global steps, and at each stage end."""
    keep_last: int = 3
    """Checkpoints kept on disk; older ones are deleted (exports are kept)."""
    resume: bool = True
    """Resume from `checkpoints/latest` when the run directory has one."""


@dataclass
class LoggingConfig:
    every: int = 10
    """Steps between scalar logs (TensorBoard, log.jsonl, one console line)."""
    image_every: int = 200
    """Steps between image logs (inputs beside reconstructions, filters, code histograms); 0: never."""
    peak_tflops: float | None = None
    """Peak dense TFLOPS of one device for MFU; by default known GPUs are looked up, CPUs get none."""


def _default_deepspeed() -> dict[str, Any]:
    return {
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 0},
    }


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    """Where the run lives and how it is seeded."""
    data: DataConfig = field(default_factory=DataConfig)
    """The frame loader."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Which model to build."""
    stages: StagesConfig = field(default_factory=StagesConfig)
    """How long each greedy stage trains."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """The optimizer of every stage."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Warmup + cosine learning-rate schedule, restarted per stage."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and retention."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Monitoring cadence."""
    deepspeed: dict[str, Any] = field(default_factory=_default_deepspeed)
    """A plain DeepSpeed config (zero_optimization, bf16/fp16, gradient_accumulation_steps, gradient_clipping, ...)."""

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def recipe_hash(self) -> str:
        """Identifies what determines the weights; bookkeeping sections (run, checkpoint, logging) are left out."""
        recipe = {
            k: v for k, v in self.to_dict().items() if k not in ("run", "checkpoint", "logging")
        }
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]

    def steps_per_stage(self, n_stages: int) -> list[int]:
        steps = self.stages.steps
        if isinstance(steps, int):
            return [steps] * n_stages
        if len(steps) != n_stages:
            raise ConfigError(
                f"stages.steps has {len(steps)} entries but model '{self.model.name}' has {n_stages} stages"
            )
        return list(steps)


# --------------------------------------------------------------------------- reference


def describe() -> str:
    """Every config key with its default and docstring: the reference `catneuron train --help` prints."""
    docs = field_docs()
    lines = []
    for section in dataclasses.fields(TrainConfig):
        lines.append(f"{section.name}:  {docs[('TrainConfig', section.name)]}")
        hint = typing.get_type_hints(TrainConfig)[section.name]
        if dataclasses.is_dataclass(hint):
            for f in dataclasses.fields(hint):
                default = getattr(hint(), f.name)
                lines.append(
                    f"  {section.name}.{f.name} = {default!r}\n      {docs[(hint.__name__, f.name)]}"
                )
    return "\n".join(lines)


def field_docs() -> dict[tuple[str, str], str]:
    """Attribute docstrings (the string literal after each field), read from this module's source."""
    import ast
    import inspect
    import sys

    docs = {}
    for node in ast.parse(inspect.getsource(sys.modules[__name__])).body:
        if isinstance(node, ast.ClassDef):
            for field_node, doc in zip(node.body, node.body[1:], strict=False):
                if isinstance(field_node, ast.AnnAssign) and isinstance(doc, ast.Expr):
                    docs[(node.name, field_node.target.id)] = doc.value.value
    return docs


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML run config and apply `key.sub=value` overrides (values parsed as YAML)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a run config is a mapping of sections")
    try:
        for item in overrides:
            apply_override(raw, item)
        config = from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return config


def from_dict(raw: dict[str, Any]) -> TrainConfig:
    config = _build(TrainConfig, copy.deepcopy(raw), prefix="")
    validate(config)
    return config


def apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    value = yaml.safe_load(text) if text else None
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{'.'.join(parents[: i + 1])}' is not a section")
        node = child
    node[leaf] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"unknown key '{prefix}{key}'")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value if value is not None else {}, f"{prefix}{name}.")
        else:
            values[name] = _check_type(value, hint, f"{prefix}{name}")
    return cls(**values)


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """Accept `value` if it fits `hint` (ints are accepted for floats); raise naming the key otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _check_type(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"'{key}' must be {_type_name(hint)}, got {value!r}")
    if hint is Any or hint is type(None) and value is None:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        return [_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # PyYAML follows YAML 1.1, which reads `3e-4` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if (
        isinstance(hint, type)
        and isinstance(value, hint)
        and not (hint is int and isinstance(value, bool))
    ):
        return value
    raise ConfigError(f"'{key}' must be {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


# --------------------------------------------------------------------------- validation

# DeepSpeed keys that another section of the run config owns.
_OWNED_ELSEWHERE = {"optimizer": "optimizer", "scheduler": "schedule"}


def validate(config: TrainConfig) -> None:
    positive = {
        "data.batch_size": config.data.batch_size,
        "checkpoint.every": config.checkpoint.every,
        "checkpoint.keep_last": config.checkpoint.keep_last,
        "logging.every": config.logging.every,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"'{key}' must be >= 1, got {value}")
    steps = config.stages.steps
    if any(s < 1 for s in ([steps] if isinstance(steps, int) else steps)) or steps == []:
        raise ConfigError(f"'stages.steps' must be positive step counts, got {steps!r}")
    if len(config.data.mean) != len(config.data.std):
        raise ConfigError("'data.mean' and 'data.std' must have the same length")
    if not 0 <= config.schedule.min_lr_ratio <= 1:
        raise ConfigError(
            f"'schedule.min_lr_ratio' must be in [0, 1], got {config.schedule.min_lr_ratio}"
        )
    for key, owner in _OWNED_ELSEWHERE.items():
        if key in config.deepspeed:
            raise ConfigError(
                f"'deepspeed.{key}' conflicts with the '{owner}' section: set it there"
            )
    ds = config.deepspeed
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(
            "'deepspeed.bf16.enabled' and 'deepspeed.fp16.enabled' are both set: pick one"
        )
    zero_stage = ds.get("zero_optimization", {}).get("stage", 0)
    if zero_stage not in (0, 1, 2):
        raise ConfigError("'deepspeed.zero_optimization.stage' must be 0, 1 or 2")
    if ds.get("bf16", {}).get("enabled") and zero_stage == 0:
        raise ConfigError(
            "'deepspeed.bf16.enabled' with 'deepspeed.zero_optimization.stage' 0 keeps no fp32 master "
            "weights in DeepSpeed: use stage 1 or 2"
        )
    accumulation = ds.get("gradient_accumulation_steps", 1)
    if not isinstance(accumulation, int) or accumulation < 1:
        raise ConfigError(
            f"'deepspeed.gradient_accumulation_steps' must be >= 1, got {accumulation!r}"
        )
    micro = ds.get("train_micro_batch_size_per_gpu")
    if micro is not None and micro != config.data.batch_size:
        raise ConfigError(
            f"'deepspeed.train_micro_batch_size_per_gpu' ({micro}) conflicts with 'data.batch_size' "
            f"({config.data.batch_size}): set only data.batch_size"
        )


def resolve_deepspeed(config: TrainConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config handed to `deepspeed.initialize`, with every derived key written out.

    `gradient_clipping` is always explicit because its default moved between DeepSpeed
    versions. On CPU, bf16/fp16 are switched off: training there is fp32.
    """
    ds = copy.deepcopy(config.deepspeed)
    accumulation = ds.setdefault("gradient_accumulation_steps", 1)
    ds["train_micro_batch_size_per_gpu"] = config.data.batch_size
    global_batch = config.data.batch_size * accumulation * world_size
    if ds.setdefault("train_batch_size", global_batch) != global_batch:
        raise ConfigError(
            f"'deepspeed.train_batch_size' ({ds['train_batch_size']}) conflicts with data.batch_size x "
            f"gradient_accumulation_steps x world size ({global_batch}): leave it out"
        )
    ds.setdefault("gradient_clipping", 1.0)
    ds.setdefault("zero_optimization", {}).setdefault("stage", 0)
    if not on_gpu:
        for precision in ("bf16", "fp16"):
            ds[precision] = {"enabled": False}
    ds.setdefault("steps_per_print", 10**9)  # the trainer's own monitor prints
    ds.setdefault("wall_clock_breakdown", False)
    return ds
