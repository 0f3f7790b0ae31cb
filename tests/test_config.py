"""The run config: YAML + overrides into typed dataclasses, errors that name the key."""

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from pretrain.config import (
    ConfigError,
    TrainConfig,
    describe,
    field_docs,
    from_dict,
    load_config,
    resolve_deepspeed,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("tiny/*.yaml"))


def write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_yaml_and_overrides_become_typed_fields(tmp_path):
    path = write(
        tmp_path, {"data": {"batch_size": 16, "source": "shards/"}, "optimizer": {"lr": "3e-4"}}
    )
    config = load_config(
        path, ["data.batch_size=4", "model.kwargs.depth=3", "stages.steps=[5, 7]", "run.name=x"]
    )
    assert config.data.batch_size == 4
    assert config.data.source == "shards/"
    assert config.optimizer.lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string
    assert config.model.kwargs == {"depth": 3}
    assert config.steps_per_stage(2) == [5, 7]
    assert config.run_dir == Path("runs/x")


@pytest.mark.parametrize(
    ("config", "overrides", "message"),
    [
        ({"data": {"batchsize": 4}}, [], "unknown key 'data.batchsize'"),
        ({}, ["optimizer.learning_rate=1"], "unknown key 'optimizer.learning_rate'"),
        ({"trainer": {}}, [], "unknown key 'trainer'"),
        ({"data": {"batch_size": "many"}}, [], "'data.batch_size' must be int"),
        ({"data": {"flip": 1}}, [], "'data.flip' must be bool"),
        ({}, ["data.batch_size=0"], "'data.batch_size' must be >= 1"),
        (
            {"deepspeed": {"optimizer": {"type": "Adam"}}},
            [],
            "'deepspeed.optimizer' conflicts with the 'optimizer'",
        ),
        ({"deepspeed": {"scheduler": {"type": "WarmupLR"}}}, [], "'deepspeed.scheduler' conflicts"),
        (
            {"data": {"batch_size": 8}, "deepspeed": {"train_micro_batch_size_per_gpu": 4}},
            [],
            "'deepspeed.train_micro_batch_size_per_gpu' (4) conflicts with 'data.batch_size' (8)",
        ),
        ({"deepspeed": {"bf16": {"enabled": True}, "fp16": {"enabled": True}}}, [], "both set"),
        ({"deepspeed": {"zero_optimization": {"stage": 3}}}, [], "must be 0, 1 or 2"),
        ({"deepspeed": {"bf16": {"enabled": True}}}, [], "keeps no fp32 master weights"),
        ({}, ["data=3"], "'data' must be a mapping"),
        ({}, ["novalue"], "not of the form key.sub=value"),
    ],
)
def test_bad_configs_name_the_file_and_the_key(tmp_path, config, overrides, message):
    path = write(tmp_path, config)
    with pytest.raises(ConfigError) as error:
        load_config(path, overrides)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


def test_stage_count_must_match_the_model():
    config = from_dict({"stages": {"steps": [10, 20]}})
    with pytest.raises(
        ConfigError, match="stages.steps has 2 entries but model 'conv_ae' has 3 stages"
    ):
        config.steps_per_stage(3)
    assert from_dict({"stages": {"steps": 10}}).steps_per_stage(3) == [10, 10, 10]


def test_deepspeed_batch_keys_are_derived_and_conflicts_refused():
    config = from_dict({"data": {"batch_size": 8}, "deepspeed": {"gradient_accumulation_steps": 2}})
    ds = resolve_deepspeed(config, world_size=4, on_gpu=False)
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["train_batch_size"] == 8 * 2 * 4
    assert ds["gradient_clipping"] == 1.0  # explicit: its default moved between DeepSpeed versions
    assert ds["zero_optimization"]["stage"] == 0
    config = from_dict({"data": {"batch_size": 8}, "deepspeed": {"train_batch_size": 64}})
    with pytest.raises(ConfigError, match=r"'deepspeed.train_batch_size' \(64\) conflicts"):
        resolve_deepspeed(config, world_size=2, on_gpu=False)


def test_cpu_training_is_fp32_and_gpu_keeps_the_precision_section():
    config = from_dict(
        {"deepspeed": {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}}
    )
    assert resolve_deepspeed(config, 1, on_gpu=False)["bf16"] == {"enabled": False}
    assert resolve_deepspeed(config, 1, on_gpu=True)["bf16"] == {"enabled": True}


def test_recipe_hash_ignores_bookkeeping_but_not_the_recipe():
    base = from_dict({})
    assert (
        from_dict({"run": {"name": "other"}, "logging": {"every": 1}}).recipe_hash()
        == base.recipe_hash()
    )
    assert from_dict({"optimizer": {"lr": 0.5}}).recipe_hash() != base.recipe_hash()


def test_every_field_has_a_docstring_and_appears_in_the_reference():
    """The YAML is the interface: each field is documented where it is declared."""
    docs = field_docs()
    reference = describe()
    for section in dataclasses.fields(TrainConfig):
        assert ("TrainConfig", section.name) in docs
        hint = typing.get_type_hints(TrainConfig)[section.name]
        for field in dataclasses.fields(hint) if dataclasses.is_dataclass(hint) else ():
            assert (hint.__name__, field.name) in docs, f"{section.name}.{field.name}"
            assert f"  {section.name}.{field.name} = " in reference


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.data.batch_size >= 1
    assert (
        config.deepspeed["gradient_clipping"] > 0
    )  # written out, never left to the version's default
