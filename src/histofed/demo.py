"""`histofed demo`: FedAvg, FedProx, FedBN, local-only and centralised training on multi-source
nuclei segmentation, with one hospital held out of training and scored by every model."""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime
from importlib import resources
from pathlib import Path

import typer

from histofed.config import NamedConfig, load_config
from histofed.engine import data_root_from, load_federation, run_experiment
from histofed.engine.loop import config_with
from histofed.engine.rundir import new_run_dir

# (method, its options, model overrides): FedBN keeps BatchNorm layers local, so it gets them
METHODS = [("fedavg", {}, {}), ("fedprox", {"mu": 0.01}, {}), ("fedbn", {}, {"norm": "batch"}),
           ("local", {}, {}), ("centralized", {}, {})]
SYNTHETIC_UNSEEN = "synthetic-3"


def demo_config_path() -> Path:
    return Path(str(resources.files("histofed") / "configs" / "demo.toml"))


def run_demo(*, data_root: Path | None, out: Path | None, rounds: int | None, workers: int = 0,
             local_steps: int | None = None) -> Path:
    """Run the five methods on one federation (built once) and print the comparison table."""
    from histofed.report import compare_runs, write_report

    start = time.time()
    base = load_config(demo_config_path())
    root = data_root_from(data_root)
    if root is None or not (root / "nuclei").is_dir() and not (root / "monuseg").is_dir():
        typer.echo("no real data root given (--data-root / HISTOFED_DATA): using synthetic tiles")
        base = base.replace(federation=NamedConfig("synthetic-nuclei", {
            "crop_size": 128, "unseen": [SYNTHETIC_UNSEEN]}))
        root = None
    base = config_with(base, workers=workers, **({"rounds": rounds} if rounds else {}))
    if local_steps:
        base = base.replace(train=dataclasses.replace(base.train, local_steps=local_steps))
    federation = load_federation(base, root)
    unseen = [c.name for c in federation.clients if c.info.get("unseen")]
    training = [c.name for c in federation.clients if not c.info.get("unseen")]
    typer.echo(f"federation {federation.name}: {len(training)} training hospitals "
               f"({', '.join(training)}); held out: {', '.join(unseen) or 'none'}")
    out = Path(out or Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-demo")
    run_dirs = []
    for name, options, model in METHODS:
        cfg = base.replace(algorithm=NamedConfig(name, options),
                           model=NamedConfig(base.model.name, {**base.model.options, **model}))
        cfg = config_with(cfg, name=f"demo-{name}")
        run_dir = new_run_dir(out / name, cfg.run.name)
        typer.echo(f"\n== {name} ==")
        run_experiment(cfg, data_root=root, run_dir=run_dir, federation=federation)
        write_report(run_dir)
        run_dirs.append(run_dir)
    from histofed.tasks import TASKS

    metric = TASKS.get(federation.task).headline
    table = compare_runs(run_dirs, out / "compare.md", metric=metric)
    typer.echo(f"\n{table}\nTest {metric} per hospital at the last round (no model selection on "
               f"test); 'unseen' = the global model on the held-out hospital "
               f"({', '.join(unseen)}), 'best local on unseen' = the best hospital's own model there.")
    typer.echo(f"reports: {', '.join(str(d / 'report.html') for d in run_dirs)}")
    typer.echo(f"comparison: {out / 'compare.md'}  ({time.time() - start:.0f} s)")
    return out
