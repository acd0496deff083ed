"""Experiment configuration: TOML in, frozen dataclasses out, validated once with clear errors.

A config has seven tables. ``run``, ``train``, ``eval`` and ``server`` have fixed keys (below);
``federation``, ``model`` and ``algorithm`` have a ``name`` plus options that the named
builder validates itself (so each method documents its own hyperparameters).

Example::

    [run]
    name = "fedavg-nuclei"
    rounds = 10
    [federation]
    name = "nuclei-multisource"
    crop_size = 128
    [model]
    name = "unet"
    channels = [16, 32, 64, 128]
    [algorithm]
    name = "fedprox"
    mu = 0.01
    [train]
    local_steps = 30
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histofed.registry import closest


class ConfigError(ValueError):
    """A config problem; the message names the table, the key and the fix."""


@dataclass(frozen=True)
class RunConfig:
    name: str = "experiment"
    seed: int = 0
    rounds: int = 10
    engine: str = "inprocess"  # "inprocess" | "flower"
    workers: int = 0  # clients trained at once; 0 = number of cores, 1 = sequential in one process
    eval_every: int = 1  # evaluate every N rounds (the last round is always evaluated)
    keep_checkpoints: int = 2  # newest checkpoints kept (0 = keep all)
    tensorboard: bool = False


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = 30  # optimiser steps per client per round
    batch_size: int = 8
    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" | "adamw" | "sgd"
    momentum: float = 0.9  # sgd only
    betas: tuple[float, float] = (0.9, 0.999)  # adam/adamw only
    weight_decay: float = 0.0
    loss: str = "bce"  # segmentation: "bce" (default: chosen on validation, benchmarks/results/defaults.md) | "bce_dice"; classification/mil: "ce"


@dataclass(frozen=True)
class EvalConfig:
    splits: tuple[str, ...] = ("val", "test")  # splits evaluated when a client has them
    window: int = 0  # sliding-window size for segmentation; 0 = the federation's crop size
    overlap: float = 0.25
    batch_size: int = 4  # windows (segmentation) or items (classification) per forward pass
    threshold: float = 0.5
    select: str = "last"  # final models: "last" round, or "best-val" (best mean validation score)
    after_fit: bool = False  # also score each site's locally trained model ("finetuned") each eval round
    instances: str = "components"  # nuclei from binary predictions: "components" | "watershed"


AGGREGATORS = ("mean", "median", "trimmed-mean", "krum", "multi-krum")  # [server].aggregator


@dataclass(frozen=True)
class ServerConfig:
    """What the server accepts and how it combines it (docs/robustness.md)."""

    aggregator: str = "mean"  # "mean" | "median" | "trimmed-mean" | "krum" | "multi-krum"
    trim_fraction: float = 0.2  # trimmed-mean: share of values cut at each end, per coordinate
    byzantine: int = 1  # krum / multi-krum: f, the number of attackers tolerated
    norm_limit: float = 10.0  # reject an update with norm > norm_limit x the round median; 0 = off
    max_rejected_rounds: int = 3  # stop after this many rounds in a row with every update rejected


@dataclass(frozen=True)
class NamedConfig:
    """``name`` plus free options for a registry-built object (federation/model/algorithm)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    run: RunConfig
    federation: NamedConfig
    model: NamedConfig
    algorithm: NamedConfig
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    server: ServerConfig = ServerConfig()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for table in _FIXED:
            out[table] = {k: _plain(v) for k, v in dataclasses.asdict(getattr(self, table)).items()}
        for table in ("federation", "model", "algorithm"):
            named: NamedConfig = getattr(self, table)
            out[table] = {"name": named.name, **{k: _plain(v) for k, v in named.options.items()}}
        return out

    def replace(self, **tables: Any) -> Config:
        return dataclasses.replace(self, **tables)


_FIXED = {"run": RunConfig, "train": TrainConfig, "eval": EvalConfig, "server": ServerConfig}
_NAMED = ("federation", "model", "algorithm")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _typed(table: str, cls: type, raw: dict[str, Any], source: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown key [{table}].{key}.{closest(key, list(fields))} "
                f"Valid keys in [{table}]: {', '.join(fields)}"
            )
        default = getattr(cls(), key)
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{source}: [{table}].{key} = {value!r} should be a list "
                                  f"(default {list(default)!r})")
            value = tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif default is not None and (
                not isinstance(value, type(default))
                or (isinstance(value, bool) and not isinstance(default, bool))):
            # bool is an int in Python: `rounds = true` must not silently mean 1 round
            raise ConfigError(
                f"{source}: [{table}].{key} = {value!r} should be of type {type(default).__name__} "
                f"(default {default!r})"
            )
        kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a parsed TOML dict into a :class:`Config`.

    Raises:
        ConfigError: unknown table or key (with the closest valid name), wrong type,
            missing ``name`` in federation/model/algorithm, or a value out of range.
    """
    valid_tables = list(_FIXED) + list(_NAMED)
    for table in data:
        if table not in valid_tables:
            raise ConfigError(
                f"{source}: unknown table [{table}].{closest(table, valid_tables)} "
                f"Valid tables: {', '.join(valid_tables)}"
            )
    typed = {t: _typed(t, cls, data.get(t, {}), source) for t, cls in _FIXED.items()}
    named = {}
    for table in _NAMED:
        raw = dict(data.get(table, {}))
        if "name" not in raw:
            raise ConfigError(f'{source}: [{table}] needs a name, e.g. name = "..."')
        name = raw.pop("name")
        named[table] = NamedConfig(name=name, options=raw)
    cfg = Config(**typed, **named)
    _check_ranges(cfg, source)
    return cfg


def _check_ranges(cfg: Config, source: str) -> None:
    checks = [
        (cfg.run.rounds >= 1, "[run].rounds must be >= 1"),
        (cfg.run.workers >= 0, "[run].workers must be >= 0 (0 = number of cores)"),
        (cfg.run.eval_every >= 1, "[run].eval_every must be >= 1"),
        (cfg.run.engine in ("inprocess", "flower"), '[run].engine must be "inprocess" or "flower"'),
        (cfg.train.local_steps >= 1, "[train].local_steps must be >= 1"),
        (cfg.train.batch_size >= 1, "[train].batch_size must be >= 1"),
        (cfg.train.lr > 0, "[train].lr must be > 0"),
        (cfg.train.optimizer in ("adam", "adamw", "sgd"), '[train].optimizer: "adam", "adamw" or "sgd"'),
        (cfg.train.loss in ("bce_dice", "bce", "ce"), '[train].loss: "bce_dice", "bce" or "ce"'),
        (0 <= cfg.eval.overlap < 1, "[eval].overlap must be in [0, 1)"),
        (set(cfg.eval.splits) <= {"val", "test"}, '[eval].splits may hold "val" and "test"'),
        (cfg.eval.instances in ("components", "watershed"),
         '[eval].instances: "components" (connected components) or "watershed" (splits touching nuclei)'),
        (cfg.eval.select in ("last", "best-val"),
         '[eval].select: "last" or "best-val" (model selection never looks at the test split)'),
        (cfg.eval.select == "last" or "val" in cfg.eval.splits,
         '[eval].select = "best-val" needs "val" in [eval].splits'),
        (cfg.eval.batch_size >= 1, "[eval].batch_size must be >= 1"),
        (cfg.eval.window >= 0, "[eval].window must be >= 0 (0 = the federation's crop size)"),
        (0 < cfg.eval.threshold < 1, "[eval].threshold is a probability: it must be in (0, 1), "
                                     "e.g. 0.5 (a threshold >= 1 marks no pixel as nucleus)"),
        (cfg.run.keep_checkpoints >= 0, "[run].keep_checkpoints must be >= 0 (0 = keep all)"),
        (cfg.train.weight_decay >= 0, "[train].weight_decay must be >= 0"),
        (cfg.server.aggregator in AGGREGATORS,
         f"[server].aggregator = {cfg.server.aggregator!r}: choose one of {', '.join(AGGREGATORS)}"),
        (0 <= cfg.server.trim_fraction < 0.5, "[server].trim_fraction must be in [0, 0.5), "
                                              "e.g. 0.2 (cut at each end)"),
        (cfg.server.byzantine >= 0, "[server].byzantine must be >= 0"),
        (cfg.server.norm_limit == 0 or cfg.server.norm_limit > 1,
         "[server].norm_limit must be 0 (off) or > 1 (a multiple of the round's median norm; "
         "<= 1 would reject about half of the honest clients)"),
        (cfg.server.max_rejected_rounds >= 1, "[server].max_rejected_rounds must be >= 1"),
        (cfg.run.seed >= 0, "[run].seed must be >= 0 (numpy seeds are non-negative)"),
        (0 <= cfg.train.momentum < 1, "[train].momentum must be in [0, 1)"),
        (len(cfg.train.betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                           and 0 <= b < 1 for b in cfg.train.betas),
         "[train].betas must be two numbers in [0, 1), e.g. [0.9, 0.999]"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{source}: {message}")


def load_config(path: Path | str, overrides: dict[str, Any] | None = None) -> Config:
    """Read a TOML config file; ``overrides`` maps "table.key" to values (e.g. from the CLI)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (see configs/ for examples)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    for dotted, value in (overrides or {}).items():
        table, _, key = dotted.partition(".")
        data.setdefault(table, {})[key] = value
    return config_from_dict(data, source=str(path))


def dump_toml(data: dict[str, Any]) -> str:
    """Write a config dict as TOML (flat tables of scalars and lists only)."""
    lines: list[str] = []
    for table, values in data.items():
        lines.append(f"[{table}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} to TOML")


def _toml_key(key: str) -> str:
    """A bare key where TOML allows one, else quoted (``"site.a"`` must not become a table)."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(str(key))
