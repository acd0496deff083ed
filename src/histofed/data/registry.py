"""Importing this module registers every built-in federation (see data/federation.py)."""

from histofed.data import fed_classification, fed_folders, fed_nuclei, medmnist  # noqa: F401
