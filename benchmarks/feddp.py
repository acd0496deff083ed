"""FedAvg vs FedDP on real multi-source nuclei data, with the epsilon each setting really gives
and a gradient-inversion audit per noise level.

Rows: non-private FedAvg; FedDP (client level, central noise, q = 1) over the grid of Pan et al.'s
Table II, sigma in {0.05, 0.15, 0.25, 0.35} x C in {0.1, 0.3, 0.5}; and two settings whose sigma
is found by Opacus for epsilon <= 8 and <= 3 at delta = 1e-5 over the same rounds. Utility:
mean over clients of Dice / Jaccard / pixel accuracy on each client's test images after the
last round. Attack: the audit of privacy/invert.py on real 32 x 32 tiles, against DLG's probe
LeNet (where inversion works without a defence) and against this benchmark's UNet.

Sized for a shared 2-core CPU (22.7 minutes there, under nice -n 5 next to other jobs): a
small UNet, 128 px crops, 8 rounds, 3 seeds. Writes benchmarks/results/feddp.md and .json.

    nice -n 5 python benchmarks/feddp.py --data-root ../shared/data
    python benchmarks/feddp.py --data-root ../shared/data --quick      # 2 rounds, a handful of rows
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from histofed.config import config_from_dict
from histofed.engine import data_root_from, load_federation, run_experiment
from histofed.engine.rundir import new_run_dir, read_jsonl
from histofed.models import build_model
from histofed.privacy.accountant import gaussian_epsilon, noise_for_epsilon
from histofed.privacy.invert import AttackConfig, Defence, ProbeLeNet, audit, pick_tiles, summarize

RESULTS = Path(__file__).resolve().parent / "results"
SIGMAS = (0.05, 0.15, 0.25, 0.35)
CLIPS = (0.1, 0.3, 0.5)
DELTA = 1e-5
TARGETS = (8.0, 3.0)
TARGET_CLIP = 0.5


def base_config(args, seed: int) -> dict:
    return {
        "run": {"name": "feddp-bench", "seed": seed, "rounds": args.rounds,
                "workers": args.workers, "eval_every": 10_000, "keep_checkpoints": 1},
        "federation": {"name": "nuclei-multisource", "crop_size": 128},
        "model": {"name": "unet", "channels": [16, 32, 64], "norm": "instance",
                  "num_res_units": 0},
        "algorithm": {"name": "fedavg"},
        "train": {"local_steps": args.steps, "batch_size": 4, "lr": 0.002},
        "eval": {"splits": ["test"], "overlap": 0.0, "batch_size": 8},
    }


def rows_to_run(args) -> list[dict]:
    rows = [{"label": "FedAvg (no DP)", "algorithm": {"name": "fedavg"}}]
    grid = [(s, c) for s in SIGMAS for c in CLIPS]
    if args.quick:
        grid = [(0.05, 0.5)]
    # control: FedDP's unweighted fixed-denominator mean without clipping or noise, so the cost
    # of clipping is not confused with losing FedAvg's size weighting (issue #10)
    rows.append({"label": "control: sigma=0, C=1e9 (unweighted mean, no clipping)", "sigma": 0.0,
                 "clip": 1e9, "algorithm": {"name": "feddp", "sigma": 0.0, "clip": 1e9,
                                            "delta": DELTA}})
    rows.append({"label": f"clip only C={TARGET_CLIP} (sigma=0)", "sigma": 0.0, "clip": TARGET_CLIP,
                 "algorithm": {"name": "feddp", "sigma": 0.0, "clip": TARGET_CLIP, "delta": DELTA}})
    # the paper's Fig. 1 adds the noise on the client: local noise at its grid point
    rows.append({"label": "FedDP local noise sigma=0.05 C=0.5", "sigma": 0.05, "clip": 0.5,
                 "algorithm": {"name": "feddp", "sigma": 0.05, "clip": 0.5, "noise": "local",
                               "delta": DELTA}})
    for sigma, clip in grid:
        rows.append({"label": f"FedDP sigma={sigma} C={clip}", "sigma": sigma, "clip": clip,
                     "algorithm": {"name": "feddp", "sigma": sigma, "clip": clip, "delta": DELTA}})
    for target in TARGETS[: 1 if args.quick else None]:
        sigma = noise_for_epsilon(target_epsilon=target, delta=DELTA, q=1.0, steps=args.rounds)
        rows.append({"label": f"FedDP epsilon<={target:g} C={TARGET_CLIP}", "sigma": sigma,
                     "clip": TARGET_CLIP, "target_epsilon": target,
                     "algorithm": {"name": "feddp", "sigma": sigma, "clip": TARGET_CLIP,
                                   "delta": DELTA}})
    return rows


def run_row(row: dict, args, federation, work: Path, seed: int) -> dict:
    """One setting, one seed: train, then read the last round's test metrics and epsilon."""
    cfg_dict = base_config(args, seed)
    cfg_dict["algorithm"] = row["algorithm"]
    cfg_dict["run"]["name"] = row["label"]
    config = config_from_dict(cfg_dict, source="benchmarks/feddp.py")
    safe = "".join(ch if ch.isalnum() else "-" for ch in row["label"]) + f"-seed{seed}"
    out = new_run_dir(work / safe, safe)
    t0 = time.perf_counter()
    run_experiment(config, data_root=args.data_root, run_dir=out, federation=federation)
    seconds = time.perf_counter() - t0
    last = max(r["round"] for r in read_jsonl(out / "metrics.jsonl") if r.get("split") == "test")
    test = [r for r in read_jsonl(out / "metrics.jsonl")
            if r.get("split") == "test" and r["round"] == last and "dice" in r]
    privacy = read_jsonl(out / "privacy.jsonl")
    norms = [r["update_norm"] for r in read_jsonl(out / "metrics.jsonl") if "update_norm" in r]
    return {
        "seed": seed,
        "dice": float(np.mean([r["dice"] for r in test])),
        "jaccard": float(np.mean([r["jaccard"] for r in test])),
        "pixel_acc": float(np.mean([r["pixel_acc"] for r in test])),
        "clients": len(test),
        "epsilon": privacy[-1]["epsilon"] if privacy else None,
        "median_update_norm": float(np.median(norms)) if norms else None,
        "seconds": seconds, "run_dir": str(out),
    }


def summarize_row(row: dict, runs: list[dict], base_runs: list[dict] | None,
                  rounds: int) -> dict:
    """Mean and SD over seeds; the Dice drop is paired by seed against FedAvg."""
    out = {k: v for k, v in row.items() if k != "algorithm"}
    for key in ("dice", "jaccard", "pixel_acc"):
        vals = [r[key] for r in runs]
        out[key] = float(np.mean(vals))
        out[f"{key}_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    if base_runs is not None:
        drops = [100 * (b["dice"] - r["dice"]) for b, r in zip(base_runs, runs, strict=True)]
        out["dice_drop_points"] = float(np.mean(drops))
        out["dice_drop_sd"] = float(np.std(drops, ddof=1)) if len(drops) > 1 else 0.0
    out["epsilon"] = runs[0]["epsilon"]  # the same for every seed (depends on sigma, q, T)
    out["epsilon_exact"] = exact_epsilon(row.get("sigma"), rounds)
    norms = [r["median_update_norm"] for r in runs if r["median_update_norm"] is not None]
    out["median_update_norm"] = float(np.median(norms)) if norms else None
    out["seconds"] = float(sum(r["seconds"] for r in runs))
    out["runs"] = runs
    return out


def exact_epsilon(sigma: float | None, rounds: int) -> float | None:
    """q = 1: the exact (closed-form Gaussian DP) epsilon of the same releases."""
    return None if sigma is None else gaussian_epsilon(sigma=sigma, steps=rounds, delta=DELTA)


def attack_section(args, federation, sigmas: list[float]) -> dict:
    """Audit per distinct sigma (at or above the bound, the result depends on sigma only)."""
    client = federation.clients[0]
    seed = args.seeds[0]
    rng = np.random.default_rng(seed)
    tiles, masks = pick_tiles(client.train.images, client.train.masks, n=args.tiles,
                              size=args.tile_size, rng=rng)
    clip = 1.0  # any C: the observed update is C * (g/|g| + sigma z); cosine ignores C
    defences = [Defence("none"), Defence("clip only", clip=clip)]
    defences += [Defence(f"clip + noise sigma={s:.4g}", clip=clip, sigma=s) for s in sigmas]
    cfg = AttackConfig(iterations=args.attack_iterations)
    out = {"client": client.name, "tile_size": args.tile_size, "tiles": args.tiles,
           "iterations": args.attack_iterations}
    t0 = time.perf_counter()
    probe = ProbeLeNet(size=args.tile_size, generator=torch.Generator().manual_seed(seed))
    rows, _ = audit(probe, tiles, masks, defences, task="classification", cfg=cfg, seed=seed)
    out["probe"] = {"model": "ProbeLeNet (DLG, sigmoid, uniform init)",
                    "params": sum(p.numel() for p in probe.parameters()),
                    "summary": summarize(rows), "rows": rows}
    torch.manual_seed(seed)
    cfg_dict = base_config(args, seed)
    unet = build_model(config_from_dict(cfg_dict, "benchmarks/feddp.py").model, num_classes=1)
    unet_defences = defences[:2]  # the undefended attack already fails on this UNet
    rows, _ = audit(unet, tiles, masks, unet_defences, task="segmentation", cfg=cfg, seed=seed)
    out["unet"] = {"model": f"UNet {cfg_dict['model']['channels']} (this benchmark, "
                            "initial weights)",
                   "params": sum(p.numel() for p in unet.parameters()),
                   "summary": summarize(rows), "rows": rows}
    out["seconds"] = time.perf_counter() - t0
    return out


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def fmt(v, nd=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not np.isfinite(v):
        return "inf"
    if isinstance(v, float) and abs(v) >= 1e4:
        return f"{v:.3g}"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def markdown(results: dict) -> str:
    a = results["args"]
    rows = results["rows"]
    base = rows[0]
    attack = results["attack"]
    by_sigma = {s["sigma"]: s for s in attack["probe"]["summary"]
                if s["defence"].startswith("clip +")}
    none, clip_only = attack["probe"]["summary"][:2]
    lines = [
        "# FedDP on nuclei-multisource: utility, real epsilon, gradient inversion",
        "",
        f"{a['rounds']} rounds x {a['steps']} local steps (batch 4, Adam lr 0.002), UNet "
        "[16, 32, 64] with instance norm, 128 px crops, 7 clients (MoNuSeg by organ, CPM-15, "
        f"CryoNuSeg); seeds {a['seeds']} (each seed also changes the clients' train/test "
        "split), mean +- SD over seeds; the Dice drop is paired by seed. FedDP = DP-FedAvg, "
        "client level, central Gaussian noise, q = 1 (every client every round), fixed "
        "denominator 7, unweighted mean of clipped updates. Epsilon at delta = "
        f"{DELTA:g} after the last round (add/remove one client) from Opacus' RDP accountant, "
        "and exact (closed form for q = 1: T Gaussian releases = one with mu = sqrt(T)/sigma). "
        "Metrics: mean over clients of the last round's test-image scores.",
        "",
        "| setting | sigma | C | Dice | Jaccard | pixel acc. | Dice drop (points) | epsilon "
        "(RDP) | epsilon (exact) | median update norm | attack PSNR (dB) | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        psnr = by_sigma.get(r.get("sigma"), none if r is base else None)
        if r.get("sigma") == 0.0:
            psnr = clip_only
        drop = "-" if r is base else f"{r['dice_drop_points']:+.2f} +- {r['dice_drop_sd']:.2f}"
        lines.append(
            f"| {r['label']} | {fmt(r.get('sigma'))} | {fmt(r.get('clip'))} | "
            f"{r['dice']:.3f} +- {r['dice_sd']:.3f} | {r['jaccard']:.3f} | "
            f"{r['pixel_acc']:.3f} | {drop} | {fmt(r['epsilon'], 2)} | "
            f"{fmt(r.get('epsilon_exact'), 2)} | {fmt(r.get('median_update_norm'))} | "
            f"{fmt(psnr['psnr'], 1) if psnr else '-'} | {r['seconds'] / 60:.1f} |")
    lines += [
        "",
        "Attack PSNR: mean over the audited tiles, probe model (below), with that row's defence "
        "(no defence for FedAvg). At or above the clipping bound it depends on sigma only, so "
        "rows with the same sigma share one attack.",
        "",
        "## Gradient-inversion audit",
        "",
        f"Geiping et al. (2020) attack, {attack['iterations']} Adam iterations on signed "
        "gradients, TV prior, on "
        f"{attack['tiles']} textured {attack['tile_size']} x {attack['tile_size']} tiles of client "
        f"{attack['client']}; the observed update is one gradient step on one tile at the "
        "clipping bound (the most favourable case for the attacker). Flat = the tile's own mean "
        "colour everywhere. A reconstruction that scores below flat has learnt nothing.",
        "",
    ]
    for key in ("probe", "unet"):
        part = attack[key]
        lines += [f"**{part['model']}**, {part['params']} parameters", "",
                  "| defence | PSNR (dB) | SSIM | flat PSNR | flat SSIM | beats flat |",
                  "|---|---|---|---|---|---|"]
        for s in part["summary"]:
            lines.append(f"| {s['defence']} | {s['psnr']:.1f} | {s['ssim']:.3f} | "
                         f"{s['flat_psnr']:.1f} | {s['flat_ssim']:.3f} | {s['beats_flat']} |")
        lines.append("")
    lines += [
        "An attack that fails is not a guarantee; epsilon is the guarantee, under the "
        "accountant's assumptions. Central noise is added by the server: a curious server sees "
        "the clipped updates (the 'clip only' line), so only local noise (noise = \"local\") "
        "defends against the server itself.",
        "",
        f"Machine: {results['machine']}. Total wall time {results['seconds'] / 60:.1f} min.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tiles", type=int, default=3)
    parser.add_argument("--tile-size", type=int, default=32)
    parser.add_argument("--attack-iterations", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="2 rounds, 3 rows, 1 tile")
    parser.add_argument("--work", type=Path, default=None, help="run directories (default: temp)")
    parser.add_argument("--out", type=Path, default=RESULTS / "feddp")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.tiles, args.attack_iterations, args.seeds = 2, 1, 100, args.seeds[:1]
    args.data_root = data_root_from(args.data_root)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="feddp-bench-"))
    federations = {seed: load_federation(config_from_dict(base_config(args, seed), "bench"),
                                         args.data_root) for seed in args.seeds}
    results: dict = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "rows": []}
    base_runs = None
    for row in rows_to_run(args):
        runs = [run_row(row, args, federations[seed], work, seed) for seed in args.seeds]
        res = summarize_row(row, runs, base_runs, args.rounds)
        base_runs = base_runs or runs
        results["rows"].append(res)
        print(json.dumps({k: res.get(k) for k in ("label", "dice", "dice_sd", "epsilon",
                                                  "seconds")}), flush=True)
    sigmas = sorted({r["sigma"] for r in results["rows"] if r.get("sigma")})
    results["attack"] = attack_section(args, federations[args.seeds[0]], sigmas)
    results["seconds"] = time.perf_counter() - t0
    write_atomic(args.out.with_suffix(".json"), json.dumps(results, indent=2, default=str))
    write_atomic(args.out.with_suffix(".md"), markdown(results))
    print(f"wrote {args.out.with_suffix('.md')} in {results['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
