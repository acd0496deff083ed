"""`histofed audit invert RUN_DIR|CONFIG`: a gradient-inversion attack on a client's update,
with and without the run's defence (privacy/invert.py). Writes invert.md, invert.json and
invert.png (original | flat colour | reconstructions) to a new directory.
`histofed audit egress RUN_DIR`: what left each site (cli/audit_egress.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer

from histofed.cli.audit_egress import egress
from histofed.cli.errors import friendly_errors

app = typer.Typer(help="Privacy audits: gradient inversion, egress.", no_args_is_help=True)
app.command("egress")(egress)


@app.callback()
def _group() -> None:
    """Privacy audits: gradient inversion (invert), what left each site (egress)."""


def _load_target(target: Path):
    """(config, run_dir or None) from a run directory or a TOML file."""
    from histofed.config import load_config

    if target.is_dir():
        if not (target / "config.toml").exists():
            raise FileNotFoundError(f"{target} is not a run directory (no config.toml); pass a "
                                    "run directory or an experiment TOML")
        return load_config(target / "config.toml"), target
    return load_config(target), None


def _defences(config, clip: float | None, sigma: float | None) -> tuple[list, str]:
    """Columns of the audit and a sentence saying where the defence came from."""
    from histofed.algorithms import build_algorithm
    from histofed.privacy.dp import check_mechanism
    from histofed.privacy.invert import Defence

    source = "--clip/--sigma"
    if clip is None and sigma is None and config.algorithm.name == "feddp":
        alg = build_algorithm(config.algorithm)
        clip, sigma = alg.clip, alg.sigma
        if sigma is None:  # record level with a target epsilon: sigma is chosen per client
            raise typer.BadParameter("this run picks sigma per client (record level, "
                                     "target_epsilon); pass --sigma")
        where = "server-side (central)" if alg.level == "client" and alg.noise == "central" \
            else "on the client"
        source = (f"the run's FedDP: level {alg.level}, noise {where}, C = {clip:g}, "
                  f"sigma = {sigma:g}")
    cols = [Defence("none")]
    if sigma is None and clip is None:
        return cols, "no defence configured (pass --clip/--sigma to test one)"
    clip = 1.0 if clip is None else clip
    sigma = 0.0 if sigma is None else sigma
    check_mechanism(sigma=sigma, clip=clip, where="audit")
    cols.append(Defence("clip only", clip=clip))
    if sigma > 0:
        cols.append(Defence(f"clip + noise sigma={sigma:g}", clip=clip, sigma=sigma))
    return cols, source


def _grid_png(path: Path, tiles: list[np.ndarray],
              columns: list[tuple[str, list[np.ndarray]]]) -> None:
    """Rows = tiles; columns = original, flat colour, then each reconstruction."""
    from matplotlib.figure import Figure

    from histofed.privacy.invert import flat_baseline
    from histofed.report_plots import atomic_path

    cols = [("original", tiles), ("flat colour", [flat_baseline(t) for t in tiles]), *columns]
    fig = Figure(figsize=(1.6 * len(cols), 1.7 * len(tiles) + 0.4))
    axes = np.atleast_2d(fig.subplots(len(tiles), len(cols), squeeze=False))
    for j, (title, images) in enumerate(cols):
        for i, img in enumerate(images):
            ax = axes[i, j]
            ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _markdown(info: dict[str, Any], parts: dict[str, dict]) -> str:
    from histofed.privacy.invert import MARGIN_DB
    from histofed.report import PRIVACY_NOTE

    lines = ["# Gradient-inversion audit", "",
             f"Target: `{info['target']}` ({info['weights']}); client {info['client']!r}; "
             f"{info['tiles']} textured {info['size']} x {info['size']} tiles; "
             f"{info['iterations']} attack iterations x {info['restarts']} restart(s) (kept by "
             "the attacker's gradient-matching loss); segmentation mask "
             f"{'known to the attacker' if info['known_mask'] else 'optimised jointly'}; "
             f"seed {info['seed']}.", "",
             f"Defence: {info['defence_source']}.", "",
             "Threat model: an honest-but-curious server sees one client update made of one "
             "gradient step on one tile, at the clipping bound (the case most favourable to the "
             "attacker), and knows the starting weights. With central noise the server itself "
             "sees only the clipped update ('clip only').", ""]
    for name, part in parts.items():
        lines += [f"## {name}: {part['model']} ({part['params']} parameters)", "",
                  "| defence | PSNR raw (flat) | PSNR affine (flat) | SSIM affine (flat) | "
                  "pixel corr. | cosine dist. | beats flat |",
                  "|---|---|---|---|---|---|---|"]
        for s in part["summary"]:
            lines.append(f"| {s['defence']} | {s['psnr']:.2f} ({s['flat_psnr']:.2f}) | "
                         f"{s['psnr_affine']:.2f} ({s['flat_psnr_affine']:.2f}) | "
                         f"{s['ssim_affine']:.3f} ({s['flat_ssim_affine']:.3f}) | "
                         f"{s['corr']:.2f} | {s['cosine_distance']:.3f} | "
                         f"{'yes' if s['beats_flat'] else 'no'} |")
        lines.append("")
    lines += ["Affine = after a per-channel least-squares fit a*x+b of the reconstruction onto "
              "the original (the scale a normalised model cannot reveal is not held against "
              "the attacker); flat = the tile's mean colour, whose affine fit is itself and "
              f"whose correlation is 0. Beats flat: affine PSNR >= flat + {MARGIN_DB:g} dB. A "
              "reconstruction that does not beat the flat-colour image has learnt nothing "
              "beyond the mean colour.", "", PRIVACY_NOTE, ""]
    return "\n".join(lines)


@app.command()
@friendly_errors
def invert(
    target: Annotated[Path, typer.Argument(help="A run directory or an experiment TOML.")],
    data_root: Annotated[Optional[Path], typer.Option(
        help="Folder with the real data. Default: the run's, then $HISTOFED_DATA.")] = None,
    client: Annotated[Optional[str], typer.Option(help="Client whose tiles are attacked.")] = None,
    tiles: Annotated[int, typer.Option(help="Number of tiles.")] = 3,
    size: Annotated[int, typer.Option(help="Tile side in pixels.")] = 32,
    iterations: Annotated[int, typer.Option(help="Attack iterations (Adam steps).")] = 500,
    restarts: Annotated[int, typer.Option(
        help="Random restarts; the attacker keeps the lowest gradient-matching loss.")] = 1,
    known_mask: Annotated[bool, typer.Option(
        help="Give the attacker the tile's mask (segmentation; it optimises the image only).")
    ] = False,
    model: Annotated[str, typer.Option(
        help="probe (DLG's LeNet), run (the run's architecture) or both.")] = "both",
    clip: Annotated[Optional[float], typer.Option(help="Override the defence's C.")] = None,
    sigma: Annotated[Optional[float], typer.Option(help="Override the defence's sigma.")] = None,
    seed: Annotated[int, typer.Option(help="Seeds tiles, noise and the attack.")] = 0,
    out: Annotated[Optional[Path], typer.Option(
        help="Output directory (must not exist). Default: RUN_DIR/audit-invert or "
             "./audit-invert-<name>.")] = None,
) -> None:
    """Invert a client's update (Geiping et al. 2020) with and without the run's defence.

    \b
    Example:
      histofed audit invert runs/20261123-101500-feddp-nuclei --data-root ../shared/data
      histofed audit invert configs/feddp-nuclei.toml --sigma 0.01 --clip 0.5 --tiles 4

    Reports raw PSNR, PSNR and SSIM after a per-channel affine fit, and pixel correlation of each
    reconstruction against the original tile, each beside a flat image of the tile's mean
    colour, and writes a PNG grid.
    """
    import torch

    from histofed.engine import data_root_from, load_federation
    from histofed.engine.rundir import new_run_dir
    from histofed.privacy.invert import (AttackConfig, ProbeLeNet, audit, pick_tiles,
                                         run_start_weights, summarize)
    from histofed.report_plots import write_text

    torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves cores to others
    if model not in ("probe", "run", "both"):
        raise typer.BadParameter(f"--model {model!r}: choose probe, run or both")
    if tiles < 1 or size < 8 or iterations < 1 or restarts < 1:
        raise typer.BadParameter("--tiles, --iterations and --restarts must be >= 1 and "
                                 "--size >= 8")
    config, run_dir = _load_target(target)
    if data_root is None and run_dir is not None and (run_dir / "run.json").exists():
        saved = json.loads((run_dir / "run.json").read_text()).get("data_root")
        data_root = Path(saved) if saved else None
    federation = load_federation(config, data_root_from(data_root))
    if federation.task != "segmentation":
        raise typer.BadParameter(f"{config.federation.name!r} is a {federation.task} federation; "
                                 "the audit reads image tiles from segmentation federations")
    names = federation.client_names
    if client is not None and client not in names:
        raise typer.BadParameter(
            f"--client {client!r}: not in this federation ({', '.join(names)})")
    data = federation.clients[names.index(client) if client else 0]
    train = data.train
    if not hasattr(train, "images"):
        raise typer.BadParameter(f"client {data.name!r}: its training set exposes no images")
    picked, masks = pick_tiles(train.images, train.masks, n=tiles, size=size,
                               rng=np.random.default_rng(seed))
    defences, source = _defences(config, clip, sigma)
    out = new_run_dir(out or (run_dir / "audit-invert" if run_dir else
                              Path(f"audit-invert-{config.run.name}")), "audit")
    cfg = AttackConfig(iterations=iterations, restarts=restarts, known_target=known_mask)
    parts: dict[str, dict] = {}
    columns: list[tuple[str, list[np.ndarray]]] = []
    weights, weights_note = run_start_weights(run_dir)
    if model in ("probe", "both"):
        probe = ProbeLeNet(size=size, generator=torch.Generator().manual_seed(seed))
        rows, recons = audit(probe, picked, masks, defences, task="classification", cfg=cfg,
                             seed=seed)
        parts["probe"] = {"model": "ProbeLeNet (Zhu et al. 2019, sigmoid, uniform init)",
                          "params": sum(p.numel() for p in probe.parameters()),
                          "summary": summarize(rows), "rows": rows}
        columns += [(f"probe: {d.label}", [r[j] for r in recons]) for j, d in enumerate(defences)]
    if model in ("run", "both"):
        from histofed.algorithms.weights import load_weights
        from histofed.models import build_model

        torch.manual_seed(config.run.seed)
        net = build_model(config.model, num_classes=federation.num_classes)
        if weights:
            load_weights(net, weights)
        rows, recons = audit(net, picked, masks, defences, task="segmentation", cfg=cfg, seed=seed)
        parts["run"] = {"model": f"{config.model.name} {config.model.options} ({weights_note})",
                        "params": sum(p.numel() for p in net.parameters()),
                        "summary": summarize(rows), "rows": rows}
        columns += [(f"run: {d.label}", [r[j] for r in recons]) for j, d in enumerate(defences)]
    info = {"target": str(target), "weights": weights_note, "client": data.name, "tiles": tiles,
            "size": size, "iterations": iterations, "restarts": restarts,
            "known_mask": known_mask, "seed": seed, "defence_source": source}
    write_text(out / "invert.json", json.dumps({**info, "models": parts}, indent=2))
    write_text(out / "invert.md", _markdown(info, parts))
    _grid_png(out / "invert.png", picked, columns)
    typer.echo(_markdown(info, parts))
    typer.echo(f"audit: {out}/invert.md, invert.json, invert.png")
