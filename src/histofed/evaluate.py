"""`histofed evaluate`: a run's final models on any image/mask folder (new hospitals, new organs)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from histofed.algorithms.weights import load_weights
from histofed.config import load_config
from histofed.engine.rundir import atomic_write_text, load_payload
from histofed.models import build_model
from histofed.tasks import make_task


def run_task(run_dir: Path, config) -> str:
    """The task of a run: run.json's "task", else the registered federation's."""
    info = Path(run_dir) / "run.json"
    if info.exists():
        task = json.loads(info.read_text(encoding="utf-8")).get("task")
        if task:
            return str(task)
    import histofed.data.registry  # noqa: F401  (registers the built-in federations)
    from histofed.data.federation import FEDERATIONS

    return FEDERATIONS.get(config.federation.name).task


def load_run_model(run_dir: Path, which: str = "global"):
    """A finished segmentation run's config, task and model with final weights loaded.

    Args:
        run_dir: the run directory (config.toml, run.json, final/*.npz).
        which: "global" or "personal:<client>" (see :func:`final_models`).

    Returns:
        ``(config, task, model)`` with the model in eval mode.

    Raises:
        FileNotFoundError: no config.toml or no final weights.
        ValueError: the run is not a segmentation run, or ``which`` is not one of its models.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").exists():
        raise FileNotFoundError(f"{run_dir} has no config.toml: pass a run directory made by "
                                "`histofed run`")
    config = load_config(run_dir / "config.toml")
    kind = run_task(run_dir, config)
    if kind != "segmentation":
        raise ValueError(
            f"run {run_dir} trained a {kind} model (federation {config.federation.name!r}); "
            "nucleus masks, AJI/PQ and predictions need a segmentation run, e.g. one made with "
            "configs/fedavg-nuclei.toml")
    models = final_models(run_dir)
    if which not in models:
        raise ValueError(f"run {run_dir} has no {which!r} model; it has: {', '.join(models)}")
    crop = int(config.federation.options.get("crop_size", 128))
    task = make_task("segmentation", config.train, 1, crop)
    model = build_model(config.model, num_classes=1)
    load_weights(model, load_payload(models[which]).arrays)
    return config, task, model.eval()


def final_models(run_dir: Path) -> dict[str, Path]:
    """{"global": stem, "personal:<client>": stem} for the weights a run saved in final/."""
    final = run_dir / "final"
    models = {}
    if (final / "global.npz").exists():
        models["global"] = final / "global"
    for p in sorted((final / "personal").glob("*.npz")) if (final / "personal").exists() else []:
        models[f"personal:{p.stem}"] = p.with_suffix("")
    if not models:
        raise FileNotFoundError(f"{run_dir}/final holds no weights: is the run finished? "
                                f"(continue it with `histofed run --resume {run_dir}`)")
    return models


