"""Importing this module registers every built-in federation (see data/federation.py)."""

from histofed.data import (  # noqa: F401
    fed_camelyon16,
    fed_classification,
    fed_folders,
    fed_image_bags,
    fed_nuclei,
    medmnist,
)
