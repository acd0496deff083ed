"""Models by name, and which architecture each client has.

The config's ``[model]`` table names a registered model and passes its options. Clients may
differ (FedWSIDD's heterogeneous MIL models, a site with less compute)::

    [model]
    name = "unet"
    channels = [16, 32, 64, 128]
    clients = { cpm15 = { channels = [8, 16, 32, 64] } }   # a table per client (merged over
                                                            # [model] when the name is the same)
    # or: heterogeneous = [{ name = "abmil" }, { name = "abmil", hidden = 64 }]
    #     every client draws one, seeded by (run seed, client index)

:func:`client_model_spec` resolves the spec of one client (on the client side; the site reports
it in its roster entry); :func:`build_model` builds any spec with seeded initial weights.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from histofed.config import ConfigError, NamedConfig
from histofed.models import cnn, encoders, mil, unet  # noqa: F401  (register the built-in models)
from histofed.models.registry import MODELS, register_model
from histofed.options import check_call

_SPEC_KEYS = ("clients", "heterogeneous")
_DATA_GIVEN = ("num_classes", "in_dim")  # set from the data, not by the user


def client_model_spec(cfg: NamedConfig, *, client: str, cid: int, seed: int,
                      defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model spec ``{"name": ..., **options}`` of one client, data-given defaults included.

    Raises:
        ConfigError: ``clients`` names a table that is not a table, or ``heterogeneous`` is
            empty or holds something other than model tables.
    """
    options = dict(cfg.options)
    per_client = options.pop("clients", {}) or {}
    pool = options.pop("heterogeneous", []) or []
    if not isinstance(per_client, dict) or not all(isinstance(v, dict) for v in per_client.values()):
        raise ConfigError("[model].clients must map client names to tables, e.g. "
                          "clients = { cpm15 = { channels = [8, 16] } }")
    if pool and (not isinstance(pool, list) or not all(isinstance(v, dict) for v in pool)):
        raise ConfigError('[model].heterogeneous must be a list of model tables, e.g. '
                          '[{ name = "abmil" }, { name = "abmil", hidden = 64 }]')
    if client in per_client:
        own = dict(per_client[client])
        name = own.pop("name", cfg.name)
        spec = {"name": name, **(options if name == cfg.name else {}), **own}
    elif pool:
        draw = int(np.random.default_rng([seed, cid, 0x40DE1]).integers(len(pool)))
        own = dict(pool[draw])
        name = own.pop("name", cfg.name)
        spec = {"name": name, **(options if name == cfg.name else {}), **own}
    else:
        spec = {"name": cfg.name, **options}
    return {"name": spec.pop("name"), **(defaults or {}), **spec}


def shared_model_spec(cfg: NamedConfig) -> dict[str, Any]:
    """The architecture every client shares when ``[model]`` has no per-client entries."""
    return {"name": cfg.name, **{k: v for k, v in cfg.options.items() if k not in _SPEC_KEYS}}


def canonical_spec(spec: dict[str, Any]) -> str:
    """A spec as sorted JSON with the model's own defaults filled in, so that two specs that
    differ only by spelling out a default (``norm = "group"`` vs nothing) compare equal.

    Example:
        >>> canonical_spec({"name": "cnn"}) == canonical_spec({"name": "cnn", "norm": "group"})
        True
    """
    full = dict(spec)
    factory = MODELS.get(full["name"]) if full.get("name") in MODELS else None
    if factory is not None:
        for param in inspect.signature(factory).parameters.values():
            if param.default is not inspect.Parameter.empty and param.name != "num_classes":
                full.setdefault(param.name, param.default)
    return json.dumps(full, sort_keys=True, default=str)


def check_client_tables(cfg: NamedConfig, sites: list[str]) -> None:
    """``[model].clients`` may only name sites of the federation (a typo would silently give
    that site the shared model).

    Raises:
        ConfigError: a table names no site; lists the valid names and the closest one.
    """
    from histofed.registry import closest

    for name in (cfg.options.get("clients") or {}):
        if name not in sites:
            raise ConfigError(f"[model].clients names {name!r}, which is no site of this "
                              f"federation.{closest(str(name), sites)} Sites: {', '.join(sites)}")


@contextlib.contextmanager
def seeded_init(seed: int | None) -> Iterator[None]:
    """Initial weights drawn from torch's generator seeded with ``seed`` in a forked RNG state:
    the caller's global RNG is untouched (None: no seeding)."""
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread, then restore. On a shared CPU, multi-threaded (OpenMP) inference
    of small models measured 20x slower than one thread here; the engine's client workers use
    one thread too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def init_seed(run_seed: int, who: int | str) -> int:
    """Seed of the initial weights of client ``who`` (an index) or "global" (the shared model)."""
    key = who + 1 if isinstance(who, int) else 1_000_003 + sum(map(ord, who))  # -1: pooled
    return int(np.random.SeedSequence([run_seed, 0x1217, key]).generate_state(1)[0] & 0x7FFFFFFF)


def build_model(cfg: NamedConfig | dict[str, Any], *, num_classes: int, seed: int | None = None,
                **defaults: Any) -> nn.Module:
    """Build a model from ``[model]`` (or a spec dict); ``defaults`` (e.g. in_dim from the data)
    yield to the config. ``seed`` seeds the initial weights (see :func:`seeded_init`).

    Raises:
        ConfigError: unknown model or option (closest name), wrong option type.
    """
    if isinstance(cfg, NamedConfig):
        spec = shared_model_spec(cfg)
    else:
        spec = dict(cfg)
    name = spec.pop("name")
    factory = MODELS.get(name)
    kwargs = check_call(f"[model] {name!r}", factory, {**defaults, **spec, "num_classes": num_classes},
                        fixed=tuple(k for k in _DATA_GIVEN if k in defaults or k == "num_classes"))
    with seeded_init(seed):
        try:
            return factory(**kwargs)
        except TypeError as err:
            raise ConfigError(f"[model] {name!r}: {err}. Check the option names in [model].") from None


__all__ = ["MODELS", "build_model", "canonical_spec", "check_client_tables", "client_model_spec",
           "init_seed", "one_torch_thread", "register_model", "seeded_init", "shared_model_spec"]
