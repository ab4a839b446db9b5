"""The run folder's name stays what it was when the config became typed: a relaunch finds the
records of runs made before, also those committed under results/."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import ROOT, compose_config
from normbench.config import RunConfig, config_hash, parse_config, run_key, run_name

# Names computed with the untyped config's code (main before the typed RunConfig), from the
# shipped YAML; they must never change for these configs.
PINNED = {
    (): "bn_b32x8_before_s0_b07050e6",
    ("norm=gn", "batch=2"): "gn_b2x8_before_s0_18f9caad",
    # epochs=15: the name pinned when the experiment trained 15 epochs (now 30, another name)
    ("experiment=cifar10", "norm=gn8", "batch=2", "epochs=15"): "gn_b2x2_before_s0_4dd3482b",
    ("norm=brn", "batch=8", "model=resnet8"): "brn_b8x8_before_s0_c8f66689",
    ("norm=frn", "norm.learnable_eps=true", "dataset=imagefolder"):
        "frn_b32x8_before_s0_b81187cf",
    ("norm=evonorm_s0", "optim.warmup_epochs=1", "model.width=4"):
        "evonorm_s0_b32x8_before_s0_aa7fb70d",
    ("dataset=cifar100", "norm=ln", "placement=after", "ws=true", "act=silu"):
        "ln_b32x8_after_s0_ddcd4e9f",
    ("norm=syncbn", "batch=4", "bn_eval=precise", "optim.nesterov=false", "deterministic=true"):
        "syncbn_b4x8_before_s0_6ddcbfdd",
}


@pytest.mark.parametrize("overrides", list(PINNED), ids=lambda o: " ".join(o) or "defaults")
def test_run_names_of_shipped_configs_are_pinned(overrides):
    plain = compose_config(list(overrides))
    parsed = parse_config(plain)
    assert isinstance(parsed, RunConfig)
    assert run_name(parsed) == run_name(plain) == PINNED[overrides]
    # the typed config gives back the very mapping it was parsed from: keys, values and types
    # (an int stays an int: json writes 1 and 1.0 differently)
    assert parsed.to_dict() == plain
    assert json.dumps(run_key(parsed), sort_keys=True) == json.dumps(run_key(plain),
                                                                     sort_keys=True)


def committed_run_folders():
    return sorted(path.parent for path in (ROOT / "results").rglob("config.yaml")
                  if (path.parent / "summary.json").exists())


def test_there_are_committed_runs_to_check():
    assert committed_run_folders(), "no committed run folder under results/"


@pytest.mark.parametrize("folder", committed_run_folders(),
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_committed_runs_keep_their_folder_names(folder):
    plain = yaml.safe_load((folder / "config.yaml").read_text())
    parsed = parse_config(plain)
    assert run_name(parsed) == folder.name
    assert config_hash(parsed) == folder.name.rsplit("_", 1)[1]


def test_a_synthetic_config_from_before_the_brightness_key_parses_and_keeps_its_name():
    plain = compose_config([])
    before = {**plain, "dataset": {k: v for k, v in plain["dataset"].items() if k != "brightness"}}
    assert run_name(before) == run_name(plain) == PINNED[()]
    assert parse_config(before).dataset.options["brightness"] == 0.05
    # another value is another run
    brighter = {**plain, "dataset": {**plain["dataset"], "brightness": 0.15}}
    assert run_name(brighter) != run_name(plain)
