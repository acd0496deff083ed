"""Federated methods and baselines, by name. See base.py for the contract."""

from __future__ import annotations

from histofed.algorithms.base import Algorithm, ClientContext, Payload, ServerContext
from histofed.algorithms.centralized import Centralized
from histofed.algorithms.fedavg import FedAvg
from histofed.algorithms.fedbn import FedBN
from histofed.algorithms.fedprox import FedProx
from histofed.algorithms.fedsoda import FedSODA
from histofed.algorithms.local import LocalOnly
from histofed.config import NamedConfig
from histofed.registry import Registry

ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm")
for _cls in (FedAvg, FedProx, FedBN, LocalOnly, Centralized, FedSODA):
    ALGORITHMS.add(_cls.name, _cls)


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    ALGORITHMS.add(cls.name, cls)
    return cls


def build_algorithm(cfg: NamedConfig) -> Algorithm:
    return ALGORITHMS.get(cfg.name).from_options(**cfg.options)


from histofed.algorithms import feddp as _feddp  # noqa: E402,F401  (registers "feddp")


__all__ = ["ALGORITHMS", "Algorithm", "ClientContext", "Payload", "ServerContext",
           "build_algorithm", "register_algorithm"]
