"""Data layer: readers for real pathology formats, torch datasets, partitioners, federations."""

from histofed.data.federation import (
    FEDERATIONS,
    ClientData,
    Federation,
    build_federation,
    register_federation,
)

__all__ = ["FEDERATIONS", "ClientData", "Federation", "build_federation", "register_federation"]
