"""`histofed evaluate`: a run's final models on any image/mask folder (new hospitals, new organs)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from histofed.algorithms.weights import load_weights
from histofed.config import load_config
from histofed.engine.rundir import atomic_write_text, load_payload
from histofed.models import build_model
from histofed.tasks import make_task


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


def evaluate_run(run_dir: Path, data_dirs: list[Path], out: Path | None = None) -> str:
    """Evaluate every final model of a segmentation run on each folder; returns a Markdown table."""
    from histofed.data.datasets import SegmentationTiles
    from histofed.data.formats import read_source

    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.toml")
    crop = int(config.federation.options.get("crop_size", 128))
    task = make_task("segmentation", config.train, 1, crop)
    model = build_model(config.model, num_classes=1)
    sources = [read_source(Path(d)) for d in data_dirs]
    rows = []
    for label, stem in final_models(run_dir).items():
        load_weights(model, load_payload(stem).arrays)
        for src in sources:
            masks = [(m > 0).astype(np.uint8) for m in src.masks]
            metrics = task.evaluate(model, SegmentationTiles(src.images, masks), config.eval)
            rows.append({"model": label, "data": src.name, "images": len(src.images),
                         **{k: round(float(v), 4) for k, v in metrics.items()}})
    keys = list(rows[0])
    md = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    md += "".join("| " + " | ".join(str(r[k]) for k in keys) + " |\n" for r in rows)
    out = Path(out) if out else run_dir / "evaluate"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out.with_suffix(".csv"), buf.getvalue())
    atomic_write_text(out.with_suffix(".md"), md)
    return md
