"""Configuration: composition, the checks made before any work, and run-folder naming."""

import pytest

from conftest import TINY, compose_config
from normbench.config import (ConfigError, config_differences, run_name, validate_config)


def test_default_config_composes_and_validates():
    cfg = compose_config()
    validate_config(cfg)
    assert cfg["norm"]["name"] == "bn" and cfg["batch"] == 32 and cfg["workers"] == 8
    assert cfg["model"]["stem"] == cfg["dataset"]["stem"]  # the stem follows the data set


@pytest.mark.parametrize("norm", ["bn", "gn", "ln", "in", "brn", "syncbn", "frn", "evonorm_b0",
                                  "evonorm_s0", "none"])
def test_every_norm_runs_with_the_default_model_at_batch_2(norm):
    # `python run.py norm=gn batch=2` (the README's first example) must be a valid run for every
    # norm with its paper defaults: the default model is wide enough for GN's 32 groups.
    cfg = compose_config([f"norm={norm}", "batch=2"])
    validate_config(cfg)
    assert cfg["model"]["name"] == "resnet20" and cfg["model"]["width"] == 2.0


def test_nested_overrides_reach_the_config():
    cfg = compose_config(["norm=gn", "norm.groups=16", "model=resnet50",
                          "optim.lr_per_256=0.2"])
    assert cfg["norm"] == {"name": "gn", "groups": 16, "group_channels": None, "eps": 1e-5}
    assert cfg["model"]["name"] == "resnet50" and cfg["optim"]["lr_per_256"] == 0.2


@pytest.mark.parametrize("overrides,message", [
    (["norm=gn", "model=resnet20"],
     r"norm=gn with model=resnet20: at layer stem: gn: groups=32 does not divide 16 channels"),
    (["norm=gn", "model=resnet20", "norm.groups=8", "norm.group_channels=3"],
     r"at layer stem: gn: group_channels=3 does not divide 16 channels"),
    (["norm=bn", "batch=1"],
     r"batch=1 is not allowed with norm=bn: its statistics need at least 2 images per worker"),
    (["norm=in", "model=resnet50", "model.stem=imagenet", "dataset.image_size=32"],
     r"norm=in at layer stages\.3\.\d\.conv\d\.norm would normalize a single value "
     r"\(input \d+x1x1"),
    (["batch=0"], r"batch=0 is not allowed; it must be an integer >= 1"),
    (["workers=0"], r"workers=0 is not allowed; it must be an integer >= 1"),
    (["placement=sideways"], r"placement='sideways' is not allowed; choose one of: before, after"),
    (["act=swish"], r"act='swish' is not allowed; choose one of: relu, leaky_relu, prelu"),
    (["model.stem=tiny"], r"model.stem='tiny' is not allowed; choose one of: imagenet, cifar"),
    (["epochs=0"], r"epochs=0 is not allowed"),
    (["device=tpu"], r"device='tpu' is not allowed; choose auto, cpu, cuda or cuda:N"),
    (["precision=fp8"], r"precision='fp8' is not allowed; choose one of: auto, fp32, bf16"),
    (["optim.milestones=[30,60]"], r"optim.milestones=\[30, 60\] is not allowed"),
    (["threads=0"], r"threads=0 is not allowed; it must be an integer >= 1"),
    (["wandb.mode=cloud"], r"wandb.mode='cloud' is not allowed; choose one of: online, offline"),
])
def test_invalid_configs_are_refused_naming_key_value_and_allowed(overrides, message):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_bn_on_a_one_by_one_map_with_batch_two_is_allowed():
    # BN over batch x 1 x 1 still has `batch` values per statistic; IN has one and is refused.
    validate_config(compose_config(["norm=bn", "batch=2", "model=resnet50",
                                    "model.stem=imagenet"]))


def test_unknown_norm_name_in_the_library_config_is_refused():
    cfg = compose_config()
    cfg["norm"]["name"] = "xn"
    with pytest.raises(ConfigError, match=r"norm.name='xn' is not allowed; choose one of: bn, .*gn, ln, in"):
        validate_config(cfg)


def test_run_name_is_stable_readable_and_keyed_by_what_changes_results():
    cfg = compose_config(TINY + ["norm=gn", "norm.groups=4", "batch=2"])
    name = run_name(cfg)
    assert name.startswith("gn_b2x4_before_s0_") and name == run_name(compose_config(
        TINY + ["norm=gn", "norm.groups=4", "batch=2"]))
    # things that do not change results keep the name ...
    same = compose_config(TINY + ["norm=gn", "norm.groups=4", "batch=2", "wandb.mode=offline",
                                  "progress=true", "eval_batch=100", "device=cpu",
                                  "threads=1"])
    assert run_name(same) == name
    # ... anything else changes it
    for override in ("seed=1", "norm.groups=2", "optim.lr_per_256=0.2", "epochs=3"):
        other = compose_config(TINY + ["norm=gn", "norm.groups=4", "batch=2", override])
        assert run_name(other) != name, override


def test_config_differences_names_the_changed_keys():
    a = compose_config(TINY)
    b = compose_config(TINY + ["optim.momentum=0.5", "wandb.mode=offline"])
    assert config_differences(a, b) == ["optim.momentum"]
