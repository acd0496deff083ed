"""Shared fixtures. Real data comes from HISTOFED_DATA or ../shared/data; tests that need it skip
with a reason when it is absent (e.g. on a user's machine)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

REPO = Path(__file__).resolve().parents[1]


def _shared_data_root() -> Path | None:
    env = os.environ.get("HISTOFED_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if (cand / "nuclei").is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real H&E data (../shared/data); skips when absent."""
    root = _shared_data_root()
    if root is None:
        pytest.skip("real data not found: set HISTOFED_DATA or place it at ../shared/data")
    return root
