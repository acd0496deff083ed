"""Federated methods and baselines, by name. See base.py for the contract.

Each method registers itself with ``@register_algorithm("name")``; importing this package
imports the built-in ones.
"""

from __future__ import annotations

from histofed.algorithms import (  # noqa: F401  (register the built-in methods)
    centralized,
    fedavg,
    fedbn,
    feddp,
    fedmic,
    fedprox,
    fedsoda,
    fedwsidd,
    local,
)
from histofed.algorithms.base import (
    ALGORITHMS,
    Algorithm,
    ClientContext,
    ClientInfo,
    Payload,
    ServerContext,
    register_algorithm,
)
from histofed.config import NamedConfig


def build_algorithm(cfg: NamedConfig) -> Algorithm:
    return ALGORITHMS.get(cfg.name).from_options(**cfg.options)


__all__ = ["ALGORITHMS", "Algorithm", "ClientContext", "ClientInfo", "Payload", "ServerContext",
           "build_algorithm", "register_algorithm"]
