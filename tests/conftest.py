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


def tiny_config_dict(method: str = "fedavg", **tables) -> dict:
    """A seconds-fast segmentation experiment on the synthetic federation (no real data)."""
    base = {
        "run": {"name": f"tiny-{method}", "seed": 0, "rounds": 3, "workers": 1},
        "federation": {"name": "synthetic-nuclei", "num_clients": 3, "images_per_client": 3,
                       "size": 64, "crop_size": 32, "crops_per_image": 4},
        "model": {"name": "unet", "channels": [4, 8], "num_res_units": 0},
        "algorithm": {"name": method},
        "train": {"local_steps": 2, "batch_size": 4, "lr": 0.01},
        "eval": {"splits": ["test"]},
    }
    for table, values in tables.items():
        base.setdefault(table, {}).update(values)
    return base


@pytest.fixture
def tiny_config():
    """Factory: tiny_config("fedprox", algorithm={"mu": 0.1}, run={"rounds": 2}) -> Config."""
    from histofed.config import config_from_dict

    return lambda method="fedavg", **tables: config_from_dict(
        tiny_config_dict(method, **tables), source="tiny")


@pytest.fixture
def one_thread():
    """Tiny models run far faster on one thread than on a shared, busy machine's several."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
