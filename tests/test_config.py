"""Config validation: unknown/mistyped keys get the closest valid name."""

import pytest

from histofed.config import ConfigError, config_from_dict, dump_toml, load_config
from conftest import tiny_config_dict


def test_roundtrip_through_toml(tmp_path):
    cfg = config_from_dict(tiny_config_dict())
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(cfg.to_dict()))
    assert load_config(path) == cfg


def test_mistyped_key_suggests_closest():
    data = tiny_config_dict()
    data["train"]["local_step"] = 3
    with pytest.raises(ConfigError, match=r'unknown key \[train\].local_step. Did you mean "local_steps"'):
        config_from_dict(data)


def test_unknown_table():
    data = tiny_config_dict()
    data["trian"] = {}
    with pytest.raises(ConfigError, match='Did you mean "train"'):
        config_from_dict(data)


def test_wrong_type_and_range():
    data = tiny_config_dict()
    data["run"]["rounds"] = "ten"
    with pytest.raises(ConfigError, match="should be of type int"):
        config_from_dict(data)
    data["run"]["rounds"] = 0
    with pytest.raises(ConfigError, match="rounds must be >= 1"):
        config_from_dict(data)


def test_missing_name():
    data = tiny_config_dict()
    del data["algorithm"]["name"]
    with pytest.raises(ConfigError, match=r"\[algorithm\] needs a name"):
        config_from_dict(data)


def test_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(tiny_config_dict()))
    cfg = load_config(path, {"train.lr": 0.5, "algorithm.name": "fedprox"})
    assert cfg.train.lr == 0.5 and cfg.algorithm.name == "fedprox"


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.toml")
