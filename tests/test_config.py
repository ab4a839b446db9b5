"""Configuration: composition, the checks made before any work, and run-folder naming."""

import itertools

import pytest
import yaml

from conftest import ROOT, TINY, compose_config
import dataclasses

from normbench.config import (DATASET_FIELDS, DATASET_OPTIONS, NORM_OPTIONS, TOP_LEVEL_KEYS,
                              ConfigError, RunConfig, config_differences, parse_config, run_name,
                              validate_config)
from normbench.norms import NORMS, norm_options


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
    # typed: every boolean, number and option, as Hydra passes them from the command line
    (["ws=yes"], r"ws='yes' is not allowed; choose one of: true, false"),
    (["compile=1"], r"compile=1 is not allowed; choose one of: true, false"),
    (["progress=off"], r"progress='off' is not allowed; choose one of: true, false"),
    (["archive_commit=no"], r"archive_commit='no' is not allowed; choose one of: true, false"),
    (["optim.momentum=-inf"], r"optim.momentum=-inf is not allowed; it must be a finite number"),
    (["optim.warmup_epochs=nan"], r"optim.warmup_epochs=nan is not allowed"),
    (["model.width=inf"], r"model.width=inf is not allowed; it must be a finite number > 0"),
    (["batch=2.5"], r"batch=2.5 is not allowed; it must be an integer >= 1"),
    (["seed=true"], r"seed=True is not allowed; it must be an integer >= 0"),
    (["num_workers=many"], r"num_workers='many' is not allowed; it must be an integer >= 0 "
                           r"\(or auto\)"),
    (["channels_last=yes"], r"channels_last='yes' is not allowed; choose one of: auto, true, false"),
    (["norm=bn", "norm.momentum=2"], r"norm.momentum=2 is not allowed; it must be a number "
                                     r"between 0 and 1"),
    (["norm=frn", "norm.learnable_eps=no"], r"norm.learnable_eps='no' is not allowed"),
    (["norm=bn", "+norm.groups=4"], r"norm.groups is not an option of norm=bn; its options are: "
                                    r"eps, momentum"),
    (["dataset.mean=[0.5,0.5]"], r"dataset.mean=\[0.5, 0.5\] is not allowed; it must be a list "
                                 r"of 3 numbers"),
    (["dataset.std=[0.3,0,0.3]"], r"dataset.std\[1\]=0 is not allowed; it must be a finite "
                                  r"number > 0"),
    (["+dataset.colour=red"], r"dataset.colour is not a key of dataset=synthetic; its keys are: "),
    (["+colour=red"], r"colour is not a key of the run config; its keys are: experiment_name, "),
    (["dataset=imagefolder", "dataset.skip_corrupt=maybe"],
     r"dataset.skip_corrupt='maybe' is not allowed; choose one of: true, false"),
    (["dataset=imagefolder", "dataset.test_dir=dev"],
     r"dataset.test_dir='dev' is not allowed; choose one of: auto, val, test"),
    (["dataset=cifar10", "dataset.download=no"],
     r"dataset.download='no' is not allowed; choose one of: true, false"),
    (["experiment_name=a/b"], r"experiment_name='a/b' is not allowed; it names a folder"),
    (["experiment_name=.."], r"experiment_name='..' is not allowed; it names a folder"),
    (["archive_dir=''"], r"archive_dir='' is not allowed; it must be a folder path"),
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


def sweep_cells(experiment: str) -> list[list[str]]:
    """The override lists of every run an experiment's sweep launches (its hydra.sweeper.params)."""
    spec = yaml.safe_load((ROOT / "experiments" / f"{experiment}.yaml").read_text())
    params = spec["hydra"]["sweeper"]["params"]
    choices = [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()]
    return [[f"experiment={experiment}", *cell] for cell in itertools.product(*choices)]


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml")))
def test_every_run_of_every_experiment_is_valid(experiment):
    # An experiment whose grid holds an impossible cell (GN's 32 groups on a 16-channel stage,
    # say) would fail that run only, after hours of the others: check every cell up front.
    cells = sweep_cells(experiment)
    assert cells
    for overrides in cells:
        cfg = compose_config(overrides)
        validate_config(cfg)
        assert cfg["experiment_name"] != "default"  # its runs go to their own folder


def test_cifar10_cpu_is_the_protocol_its_report_states():
    # results/cifar10_cpu/REPORT.md states this protocol; the experiment file is its source.
    cells = sweep_cells("cifar10_cpu")
    assert len(cells) == 20  # bn, gn8, ln, in x 32, 16, 8, 4, 2
    cfg = compose_config(["experiment=cifar10_cpu", "norm=gn8", "batch=2"])
    assert cfg["model"]["name"] == "resnet8" and cfg["model"]["stem"] == "cifar"
    assert cfg["dataset"]["name"] == "imagefolder" and cfg["dataset"]["preset"] == "cifar"
    assert cfg["dataset"]["max_per_class"] == 1500 and cfg["dataset"]["max_test_per_class"] is None
    assert (cfg["workers"], cfg["epochs"], cfg["placement"]) == (8, 10, "before")
    assert cfg["norm"] == {"name": "gn", "groups": 8, "group_channels": None, "eps": 1e-5}
    assert cfg["optim"]["lr_per_256"] == 0.4 and cfg["optim"]["milestones"] == [0.5, 0.8]
    # the same protocol for every norm: only the norm differs between the cells' configs
    base = compose_config(["experiment=cifar10_cpu", "norm=bn", "batch=2"])
    assert {k: v for k, v in cfg.items() if k != "norm"} == {k: v for k, v in base.items() if k != "norm"}


def test_parse_config_gives_a_frozen_typed_config_that_gives_back_its_mapping():
    plain = compose_config(["norm=gn", "batch=2", "optim.warmup_epochs=1"])
    cfg = parse_config(plain)
    assert isinstance(cfg, RunConfig) and parse_config(cfg) is cfg
    assert cfg.norm.name == "gn" and cfg.norm.options["groups"] == 32
    assert cfg.optim.lr_per_256 == 0.1 and cfg.optim.nesterov is True
    assert cfg.dataset.image_size == 32 and cfg.dataset.options["noise"] == 0.3
    assert cfg.global_batch == 16 and cfg.wandb.mode == plain["wandb"]["mode"]
    assert cfg.to_dict() == plain and list(cfg.to_dict()) == list(TOP_LEVEL_KEYS)
    assert type(cfg.optim.warmup_epochs) is int  # kept as given: the run's hash depends on it
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch = 4  # type: ignore[misc]


def test_the_typed_keys_are_the_keys_of_the_shipped_configs():
    # the keys of conf/config.yaml and of its config groups, as composed
    assert set(TOP_LEVEL_KEYS) == set(compose_config())
    # each data set's keys: the fields every data set has plus its own options
    from normbench.data import DATASET_BUILDERS
    assert set(DATASET_OPTIONS) == set(DATASET_BUILDERS)
    for name, options in DATASET_OPTIONS.items():
        node = compose_config([f"dataset={name}"])["dataset"]
        assert set(node) == {"name", *DATASET_FIELDS, *options}, name
    # every option a norm takes (the registry's builders) has a type, and each norm's YAML
    # names exactly those options
    assert {o for name in NORMS for o in norm_options(name)} == set(NORM_OPTIONS)
    for path in (ROOT / "conf" / "norm").glob("*.yaml"):
        node = compose_config([f"norm={path.stem}"])["norm"]
        assert set(node) - {"name"} == set(norm_options(node["name"])), path.name


def test_a_norm_node_may_leave_options_to_the_librarys_defaults():
    cfg = compose_config()
    cfg["norm"] = {"name": "gn", "groups": 4}
    assert parse_config(cfg).norm.options == {"groups": 4}
