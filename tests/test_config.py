"""Typed configs: every bad field reported with its dotted key before anything runs; overrides."""

from __future__ import annotations

import pytest
import yaml

from n2g_ct.config import apply_overrides, from_dict, load_config, to_dict
from n2g_ct.errors import ConfigError
from n2g_ct.training.config import TrainConfig

POOLS = {"noisy": [{"series": "ld"}], "clean": [{"series": "nd", "slices": [0, 2]}]}


def test_valid_config_round_trips_through_yaml(tmp_path):
    data = {"data": POOLS, "optim": {"steps": 30, "batch_size": 2}, "method": {"noise2grad": {"period": 7}}}
    config = from_dict(TrainConfig, data)
    assert config.optim.steps == 30 and config.method.noise2grad.period == 7
    assert config.data.clean[0].slices == (0, 2)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    assert load_config(TrainConfig, path) == config


def test_every_problem_is_reported_with_its_key():
    data = {
        "data": {**POOLS, "crop_size": "big", "colour": 1},
        "optim": {"steps": 0, "lr": -1},
        "method": {"name": "magic"},
    }
    with pytest.raises(ConfigError) as info:
        from_dict(TrainConfig, data, "train.yaml")
    message = str(info.value)
    assert message.startswith("train.yaml is invalid")
    for expected in ("data.crop_size: expected int, got 'big'", "data.colour: unknown key",
                     "method.name: must be one of 'noise2grad', 'supervised', 'noise2noise', got 'magic'"):
        assert expected in message


def test_range_checks_name_the_section():
    with pytest.raises(ConfigError, match=r"optim: steps and batch_size must be ≥ 1"):
        from_dict(TrainConfig, {"data": POOLS, "optim": {"steps": 0}})
    with pytest.raises(ConfigError, match=r"method.noise2grad: .*period"):
        from_dict(TrainConfig, {"data": POOLS, "method": {"noise2grad": {"period": 0}}})
    with pytest.raises(ConfigError, match="window_hu must be"):
        from_dict(TrainConfig, {"data": {**POOLS, "window_hu": [100, -100]}})


def test_method_needs_its_data():
    with pytest.raises(ConfigError, match="noise2grad needs data.noisy and data.clean"):
        from_dict(TrainConfig, {})
    with pytest.raises(ConfigError, match="supervised needs data.paired"):
        from_dict(TrainConfig, {"data": POOLS, "method": {"name": "supervised"}})


def test_overrides_use_dotted_keys_and_yaml_values():
    data = apply_overrides({"optim": {"steps": 5}}, ["optim.steps=12", "run.amp=false", "data.window_hu=[-100, 300]"])
    assert data == {"optim": {"steps": 12}, "run": {"amp": False}, "data": {"window_hu": [-100, 300]}}
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["optim.steps"])
    runs = {"train": [{"name": "a", "config": {}}, {"name": "b"}]}
    assert apply_overrides(runs, ["train.1.config.optim.lr=0.001"])["train"][1] == {
        "name": "b", "config": {"optim": {"lr": 0.001}}}
    with pytest.raises(ConfigError, match="'2' is not an index of a list of 2"):
        apply_overrides(runs, ["train.2.name=c"])
    with pytest.raises(ConfigError, match="name is not a section"):
        apply_overrides(runs, ["train.0.name.x=1"])


def test_unreadable_or_non_mapping_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(TrainConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(TrainConfig, bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(TrainConfig, listing)


def test_yaml_cannot_execute_code(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("data: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainConfig, evil)
