"""Config values that used to be accepted and give a silently wrong run (issue #14)."""

import pytest

from histofed.config import ConfigError, config_from_dict
from conftest import tiny_config_dict


@pytest.mark.parametrize("table, key, value, message", [
    ("run", "rounds", True, r"\[run\].rounds = True should be of type int"),
    ("train", "local_steps", False, r"\[train\].local_steps = False should be of type int"),
    ("eval", "threshold", 5.0, r"\[eval\].threshold is a probability"),
    ("eval", "threshold", 0, r"\[eval\].threshold is a probability"),
    ("eval", "batch_size", 0, r"\[eval\].batch_size must be >= 1"),
    ("eval", "window", -1, r"\[eval\].window must be >= 0"),
    ("eval", "splits", "test", r"\[eval\].splits = 'test' should be a list"),
    ("train", "betas", 0.9, r"\[train\].betas = 0.9 should be a list"),
    ("run", "keep_checkpoints", -1, r"\[run\].keep_checkpoints must be >= 0"),
    ("run", "seed", -1, r"\[run\].seed must be >= 0"),
    ("train", "momentum", 1.5, r"\[train\].momentum must be in \[0, 1\)"),
    ("train", "betas", [0.9], r"\[train\].betas must be two numbers in \[0, 1\)"),
    ("train", "betas", [0.9, "x"], r"\[train\].betas must be two numbers"),
])
def test_bad_fixed_values_are_refused_with_the_key(table, key, value, message):
    data = tiny_config_dict(**{table: {key: value}})
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_good_values_still_pass():
    cfg = config_from_dict(tiny_config_dict(run={"rounds": 2, "tensorboard": True},
                                            eval={"threshold": 0.3, "splits": ["test"]}))
    assert cfg.run.rounds == 2 and cfg.run.tensorboard is True and cfg.eval.threshold == 0.3
