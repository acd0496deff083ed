"""`histofed run | demo | evaluate | report`: run experiments and look at their results."""

from __future__ import annotations

import ast
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from histofed.cli.errors import friendly_errors


def parse_overrides(pairs: list[str]) -> dict:
    """["train.lr=0.01", "run.rounds=3"] -> {"train.lr": 0.01, "run.rounds": 3}."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or "." not in key:
            raise typer.BadParameter(f"--set {pair!r}: use TABLE.KEY=VALUE, e.g. --set train.lr=0.001")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare string such as fedavg
        out[key.strip()] = value
    return out


def _check_eval_images(run_dir: Path, data_dirs: list[Path]) -> None:
    """Refuse images too small for the run's evaluation window, naming the file (headers only)."""
    from PIL import Image

    from histofed.config import load_config
    from histofed.data.formats import IMAGE_SUFFIXES, DataFormatError
    from histofed.engine import too_small_to_evaluate

    config = load_config(run_dir / "config.toml")
    window = config.eval.window or int(config.federation.options.get("crop_size", 128))
    for folder in data_dirs:
        for path in sorted((Path(folder) / "images").glob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as im:
                    size = im.size
            except Exception:  # noqa: BLE001 - the reader gives the clear error later
                continue
            if too_small_to_evaluate(size, window):
                raise DataFormatError(
                    f"image {path} is {size[0]} x {size[1]} px, too small for the run's {window} "
                    "px evaluation window (sliding windows pad at most half a window). Fix: "
                    "remove it from the folder or evaluate larger images")


def register(app: typer.Typer) -> None:
    """Attach the run-related commands to the main app."""

    @app.command()
    @friendly_errors
    def run(
        config: Annotated[Optional[Path], typer.Argument(help="Experiment TOML (see configs/).")] = None,
        engine: Annotated[Optional[str], typer.Option(help="inprocess (default) or flower.")] = None,
        data_root: Annotated[Optional[Path], typer.Option(
            help="Folder with the real data (e.g. ../shared/data). Default: $HISTOFED_DATA.")] = None,
        out: Annotated[Optional[Path], typer.Option(
            help="Run directory (must not exist). Default: runs/<date>-<time>-<name>/.")] = None,
        resume: Annotated[Optional[Path], typer.Option(
            help="Continue RUN_DIR from its last intact checkpoint (identical to an uninterrupted "
            "run); may change --workers, --data-root and --set train.lr=VALUE.")] = None,
        set_: Annotated[list[str], typer.Option("--set", help="Override a config value: TABLE.KEY=VALUE.")] = [],  # noqa: B006
        workers: Annotated[Optional[int], typer.Option(help="Clients trained at once (0 = cores).")] = None,
        tensorboard: Annotated[bool, typer.Option(help="Also log to TensorBoard (needs the optional tensorboard extra).")] = False,
    ) -> None:
        """Run a federated experiment and write a run directory with a report.

        \b
        Example:
          histofed run configs/fedavg-nuclei.toml --data-root ../shared/data
          histofed run configs/fedavg-nuclei.toml --set algorithm.name=fedprox --set algorithm.mu=0.1
          histofed run --resume runs/20261123-101500-fedavg-nuclei
          histofed run --resume runs/20261123-101500-fedavg-nuclei --set train.lr=0.0001 --workers 2

        The run directory holds config.toml, metrics.jsonl, egress.jsonl (bytes that left each
        site), checkpoints/, final/ weights, report.html and summary.md.
        """
        from histofed.config import load_config
        from histofed.engine import data_root_from, resume_experiment, run_experiment
        from histofed.engine.rundir import new_run_dir
        from histofed.report import write_report

        start = time.time()
        if resume is not None:
            if config is not None:
                raise typer.BadParameter("give either CONFIG or --resume RUN_DIR, not both")
            fixed = [flag for flag, given in (("--engine", engine), ("--out", out),
                                              ("--tensorboard", tensorboard)) if given]
            if fixed:
                raise typer.BadParameter(
                    f"{', '.join(fixed)} cannot change a resumed run (it continues in RUN_DIR "
                    "with its own config); --resume accepts --workers, --data-root and "
                    "--set train.lr=VALUE")
            overrides = parse_overrides(set_)
            if workers is not None:
                overrides["run.workers"] = workers
            resume_experiment(resume, data_root=data_root_from(data_root), overrides=overrides)
            run_dir = resume
        else:
            if config is None:
                raise typer.BadParameter("missing CONFIG (a TOML file; see configs/) or --resume RUN_DIR")
            overrides = parse_overrides(set_)
            if engine:
                overrides["run.engine"] = engine
            if workers is not None:
                overrides["run.workers"] = workers
            if tensorboard:
                overrides["run.tensorboard"] = True
            cfg = load_config(config, overrides)
            run_dir = new_run_dir(out, cfg.run.name)
            run_experiment(cfg, data_root=data_root_from(data_root), run_dir=run_dir)
        html, md = write_report(run_dir)
        typer.echo(Path(md).read_text())
        typer.echo(f"\nreport: {html}\nrun directory: {run_dir}  ({time.time() - start:.0f} s)")

    @app.command()
    @friendly_errors
    def demo(
        data_root: Annotated[Optional[Path], typer.Option(
            help="Real data root (default $HISTOFED_DATA); without it the synthetic federation is used.")] = None,
        out: Annotated[Optional[Path], typer.Option(help="Folder for the demo's runs.")] = None,
        rounds: Annotated[Optional[int], typer.Option(help="Rounds per method (default from the demo config).")] = None,
        workers: Annotated[int, typer.Option(help="Clients trained at once (0 = cores).")] = 0,
        steps: Annotated[Optional[int], typer.Option(help="Local steps per round (default from the demo config).")] = None,
    ) -> None:
        """FedAvg vs local-only vs FedProx vs FedBN on nuclei segmentation, then a comparison table.

        Uses nuclei-multisource (MoNuSeg by organ + CPM-15 + CryoNuSeg, one client per source) when
        --data-root / $HISTOFED_DATA holds the real data, otherwise synthetic tiles. About 5 minutes on
        a 2-core laptop.
        """
        from histofed.demo import run_demo

        run_demo(data_root=data_root, out=out, rounds=rounds, workers=workers, local_steps=steps)

    @app.command()
    @friendly_errors
    def evaluate(
        run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
        data: Annotated[list[Path], typer.Option(
            help="Image/mask folder(s) (<dir>/images + <dir>/masks); repeat for several.")] = [],  # noqa: B006
        clients: Annotated[bool, typer.Option(
            help="Also evaluate on each of the run's own clients' test split (one grid each).")] = False,
        data_root: Annotated[Optional[Path], typer.Option(
            help="Real data for --clients (default $HISTOFED_DATA, then the run's data_root).")] = None,
        out: Annotated[Optional[Path], typer.Option(help="Where to write the table (.md and .csv).")] = None,
        watershed: Annotated[bool, typer.Option(
            help="Split touching predicted nuclei by a distance-transform watershed.")] = False,
        min_area: Annotated[int, typer.Option(help="Drop predicted nuclei smaller than this, pixels.")] = 10,
        grid_images: Annotated[int, typer.Option(
            help="Images per picture grid (image | reference | prediction | errors); 0 = none.")] = 4,
    ) -> None:
        """Evaluate a run's final global model (and personalised ones) on new image/mask folders.

        Pixel scores (Dice, Jaccard) and nucleus instance scores (AJI, PQ, SQ, F1 at IoU 0.5),
        against the masks' instance ids where they have them, connected components otherwise
        (the 'reference' column says which). Writes RUN/evaluate.md, .csv and one picture grid
        per model and folder in RUN/evaluate-grids/ (shown by `histofed report`).

        \b
        Example:
          histofed evaluate runs/20261123-fedavg --data ../shared/data/nuclei/cryonuseg
          histofed evaluate runs/20261123-fedavg --data ../shared/data/nuclei/cpm15 --watershed
          histofed evaluate runs/20261123-fedavg --clients   # every client's test split
        """
        from histofed.engine.rundir import RunDirError
        from histofed.evaluate import evaluate_run
        from histofed.instances import InstanceOptions

        if not run_dir.is_dir() or not (run_dir / "config.toml").is_file():
            what = "does not exist" if not run_dir.exists() else (
                "is not a folder" if not run_dir.is_dir() else "has no config.toml")
            raise RunDirError(f"run directory {run_dir} {what}; give the folder of a finished "
                              "run (runs/<date>-<time>-<name>/ or the --out of `histofed run`)")
        _check_eval_images(run_dir, data or [])
        options = InstanceOptions(split="watershed" if watershed else "components",
                                  min_area=min_area)
        table = evaluate_run(run_dir, data, out, clients=clients, data_root=data_root,
                             options=options, grid_images=grid_images)
        typer.echo(table)

    @app.command()
    @friendly_errors
    def report(run_dir: Annotated[Path, typer.Argument(help="A run directory.")]) -> None:
        """(Re)write report.html and summary.md of a run directory, e.g. during or after a run."""
        from histofed.report import write_report

        html, md = write_report(run_dir)
        typer.echo(f"{html}\n{md}")
