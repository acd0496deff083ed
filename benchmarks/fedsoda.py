"""FedSODA on real multi-source nuclei data next to the baselines (FedAvg, FedProx, FedBN,
local-only, centralised, FedDP) and FedSODA's ablation, paired by seed, in the shape of the
paper's Table 1/2 (Zhang et al. 2024).

Every row is a full federated run of histofed's engine on ``nuclei-multisource`` (one client
per source/organ, real H&E; CryoNuSeg left out because its masks are partial, as in
benchmarks/defaults.py) with one hospital held out of training (``[federation].unseen``,
default ``monuseg-other``: bladder, colon and stomach, organs no training site has). Each
model is scored two ways, for every method alike:

- **before local training**: the model the server sends (theta_g; personal models such as
  FedBN's, local-only's or FedSODA's theta_hat_i where a method has them);
- **after local training** (``[eval].after_fit``, model "finetuned"): each site's model after
  the round's local steps. This is what FedSODA's reference code scores (trainer.py) and so
  the paper's protocol.

Each model kind takes the eval round with the best mean validation Dice over the training
sites (ties: the earlier round; the test split is never used to select), and reports the
test Dice of the sites at that round, their mean, then mean +- sample std (ddof=1) over
seeds. Differences to FedAvg are paired by seed (a seed fixes split, initial weights and
batches) and compare like with like (finetuned with finetuned). "unseen" is the held-out
hospital's Dice of the global model (for methods without one: the mean over the sites'
personal models) at the selected round. Writes benchmarks/results/fedsoda.md, .json, .png.

    nice -n 10 python benchmarks/fedsoda.py --data-root ../shared/data --work runs/bench-fedsoda
    python benchmarks/fedsoda.py --data-root ../shared/data --work runs/bench-fedsoda --report-only

Runs are seed-major (every row of seed 0, then seed 1, ...), so a partial benchmark has whole
seeds. A finished run whose config.toml equals this invocation's is reused, an unfinished one
with the same config resumes from its last checkpoint, and one made with other settings is
redone; so the same command continues an interrupted benchmark. ``--report-only`` writes the
result files from the finished runs (the header says how many of how many). The reference
code's scale (yuanzhang7/FedSODA; GPU-sized): a UNet 32-256 with two convs per block and
GroupNorm of 4 channels per group, AdamW lr 1e-4 with weight decay 0.01, batch 4, crops 512,
5 warm-up epochs, then 60 rounds x 5 local epochs; the nearest flags here: --channels 32 64
128 256 --res-units 2 --crop 512 --batch 4 --optimizer adamw --lr 1e-4 --weight-decay 0.01
--rounds 61 --local-epochs 5 (MONAI's GroupNorm here has up to 8 groups, not 4 channels per
group). The defaults instead are histofed's (benchmarks/results/defaults.md: GroupNorm, BCE,
Adam lr 2e-3, batch 8, crops 128).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from histofed.config import config_from_dict, dump_toml
from histofed.engine import data_root_from, load_federation, run_experiment
from histofed.engine.rundir import finished_with, list_checkpoints, new_run_dir, read_jsonl
from histofed.report_plots import atomic_path, write_text

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("dice", "jaccard", "pixel_acc")
MB = 1e6
OFF = {"so": False, "da": False, "lsc": False}
# FedDP settings of benchmarks/feddp.py (mirrored, not imported: that script pulls in the
# attack audit): the paper's grid point (Pan et al., Table II) and the epsilon <= 8 target,
# both client level with central noise, q = 1, at delta = 1e-5 and clip C = 0.5
FEDDP_DELTA, FEDDP_PAPER_SIGMA, FEDDP_CLIP, FEDDP_TARGET_EPSILON = 1e-5, 0.05, 0.5, 8.0
FEDDP = {"name": "feddp", "clip": FEDDP_CLIP, "delta": FEDDP_DELTA}
# name -> (table label, [algorithm] table, models scored before local training)
ROWS: dict[str, tuple[str, dict, tuple[str, ...]]] = {
    "fedavg": ("FedAvg", {"name": "fedavg"}, ("global",)),
    "fedsoda": ("FedSODA = SO + DA + L_sc", {"name": "fedsoda"}, ("global",)),
    "so_da": ("SO + DA", {"name": "fedsoda", **OFF, "so": True, "da": True}, ("global",)),
    "local": ("local only (each site alone)", {"name": "local"}, ("personal",)),
    "centralized": ("centralised (pooled data)", {"name": "centralized"}, ("global",)),
    "fedprox": ("FedProx (mu = 0.01)", {"name": "fedprox", "mu": 0.01}, ("global",)),
    "fedbn": ("FedBN (GroupNorm local)", {"name": "fedbn"}, ("personal",)),
    "so": ("SO", {"name": "fedsoda", **OFF, "so": True}, ("global",)),
    "da": ("DA", {"name": "fedsoda", **OFF, "da": True}, ("global",)),
    "feddp_paper": (f"FedDP sigma = {FEDDP_PAPER_SIGMA}, C = {FEDDP_CLIP} (paper's grid point)",
                    {**FEDDP, "sigma": FEDDP_PAPER_SIGMA}, ("global",)),
    "feddp_eps8": (f"FedDP epsilon <= {FEDDP_TARGET_EPSILON:g}, C = {FEDDP_CLIP}",
                   {**FEDDP, "target_epsilon": FEDDP_TARGET_EPSILON}, ("global",)),
    "fedsoda_p": ("FedSODA personalised", {"name": "fedsoda", "personalised": True},
                  ("global", "personal")),
    # control: lambda = 1 keeps theta_hat_i = theta_i, so theta_g is the plain unweighted mean
    "mean": ("control: unweighted mean (DA, lambda = 1)", {"name": "fedsoda", **OFF, "da": True,
                                                           "lambda": 1.0}, ("global",)),
}
# the rows (fedsoda_p and the control "mean" on request: --rows ... fedsoda_p mean)
DEFAULT_ROWS = tuple(r for r in ROWS if r not in ("fedsoda_p", "mean"))
KINDS = ("global", "personal", "finetuned")  # "finetuned" = after local training (paper protocol)


def make_config(args, row: str, seed: int) -> dict:
    algorithm = dict(ROWS[row][1])
    if algorithm["name"] == "fedsoda":
        algorithm.update(synthetic_size=args.crop, stages=args.stages)
        if algorithm.get("so", True):  # log the weights the reference's 0-255 statistics give
            algorithm["compare_raw_space"] = True
        if args.local_epochs:
            algorithm["local_epochs"] = args.local_epochs
    if algorithm.get("target_epsilon") is not None:
        algorithm["target_rounds"] = args.rounds
    return {
        "run": {"name": f"{row}-s{seed}", "seed": seed, "rounds": args.rounds, "workers": args.workers,
                "eval_every": args.eval_every, "keep_checkpoints": 1},
        "federation": {"name": "nuclei-multisource", "crop_size": args.crop, "test_fraction": 0.34,
                       "val_fraction": 0.2, "include_cryonuseg": False, "unseen": [args.unseen]},
        "model": {"name": "unet", "channels": args.channels, "norm": "group",
                  "num_res_units": args.res_units},
        "algorithm": algorithm,
        "train": {"local_steps": args.steps, "batch_size": args.batch, "lr": args.lr,
                  "optimizer": args.optimizer, "loss": "bce", "weight_decay": args.weight_decay},
        "eval": {"splits": ["val", "test"], "overlap": args.overlap, "batch_size": 8,
                 "select": "best-val", "after_fit": True},
    }


def run_dir_for(args, row: str, seed: int) -> Path:
    return Path(args.work) / f"{row}-seed{seed}"


def config_toml(args, row: str, seed: int) -> str:
    return dump_toml(config_from_dict(make_config(args, row, seed),
                                      source=f"benchmark row {row}").to_dict())


def run_one(args, row: str, seed: int, root: Path, federations: dict) -> Path:
    """Run, resume or reuse one (row, seed); returns its run directory."""
    out = run_dir_for(args, row, seed)
    config = config_from_dict(make_config(args, row, seed), source=f"benchmark row {row}")
    wanted = dump_toml(config.to_dict())
    if finished_with(out, wanted):
        return out
    saved = out / "config.toml"
    resume = saved.exists() and saved.read_text() == wanted and bool(list_checkpoints(out))
    if out.exists() and not resume:
        shutil.rmtree(out)  # made with other settings, or died before its first checkpoint
    if seed not in federations:
        federations[seed] = load_federation(config, root)
    t0 = time.time()
    run_experiment(config, data_root=root, run_dir=out if resume else new_run_dir(out, row),
                   resume=resume, federation=federations[seed])
    print(f"[fedsoda-bench] {row} seed {seed}: {time.time() - t0:.0f} s"
          + (" (resumed)" if resume else ""), flush=True)
    return out


def select_scores(lines: list[dict], metrics: tuple[str, ...] = METRICS) -> dict:
    """Per model kind (global / personal / finetuned): the eval round with the best mean
    validation Dice over the training sites (ties: the earlier round; test never looked at)
    and the test scores at that round, per site and their mean, plus the last round's mean
    test Dice and the held-out site's Dice at the selected round ("unseen": the global model
    for "global", the mean over the sites' models "personal:<site>" for "personal")."""
    out: dict = {}
    for kind in KINDS:
        val: dict[int, list[float]] = {}
        for r in lines:
            if r.get("split") == "val" and r.get("model") == kind:
                val.setdefault(r["round"], []).append(r["dice"])
        if not val:
            continue
        rounds = sorted(val)
        means = [float(np.mean(val[r])) for r in rounds]
        best = rounds[int(np.nanargmax(means))]  # argmax returns the first maximum
        test = {r["client"]: {m: float(r[m]) for m in metrics} for r in lines
                if r.get("split") == "test" and r.get("model") == kind and r["round"] == best}
        last = max(r["round"] for r in lines if r.get("split") == "test" and r.get("model") == kind)
        entry = {"round": best, "val_dice": float(np.mean(val[best])), "clients": test,
                 "mean": {m: float(np.mean([c[m] for c in test.values()])) for m in metrics},
                 "last_round": last, "last_test_dice": float(np.mean(
                     [r["dice"] for r in lines if r.get("split") == "test"
                      and r.get("model") == kind and r["round"] == last]))}
        prefix = {"global": "global", "personal": "personal:"}.get(kind)
        unseen = [r["dice"] for r in lines if r.get("split") == "unseen" and r["round"] == best
                  and prefix and (r.get("model") == prefix if kind == "global"
                                  else str(r.get("model", "")).startswith(prefix))]
        entry["unseen_dice"] = float(np.mean(unseen)) if unseen else None
        if unseen and kind == "personal":
            entry["unseen_best_site_dice"] = float(np.max(unseen))
        out[kind] = entry
    return out


def summarise_run(run_dir: Path) -> dict:
    """Validation-selected scores per model kind, MB per fit round, time, FedSODA's weights."""
    lines = read_jsonl(run_dir / "metrics.jsonl")
    out: dict = {"models": select_scores(lines)}
    train = [r for r in lines if r.get("split") == "train"]
    if train:
        last = max(r["round"] for r in train)
        out["train_loss_last_round"] = float(np.mean([r["loss"] for r in train if r["round"] == last]))
    egress = [r for r in read_jsonl(run_dir / "egress.jsonl") if r.get("phase") == "fit"]
    rounds = max(r["round"] for r in egress)
    for direction in ("up", "down"):
        sent = sum(r["bytes"] for r in egress if r["direction"] == direction)
        out[f"mb_{direction}_per_round"] = sent / rounds / MB
    out["scalar_bytes_up_per_round"] = sum(
        r["bytes"] for r in egress if r["direction"] == "up" and r["kind"] == "scalars") / rounds
    timing = read_jsonl(run_dir / "timing.jsonl")
    out["fit_seconds_per_round"] = float(np.mean([t["fit_seconds"] for t in timing]))
    out["run_seconds"] = float(sum(t["fit_seconds"] + t["eval_seconds"] + t["checkpoint_seconds"]
                                   for t in timing))
    info = json.loads((run_dir / "run.json").read_text())
    out["selected_round_engine"] = info.get("selected_round")
    if (run_dir / "fedsoda.jsonl").exists():
        logs = read_jsonl(run_dir / "fedsoda.jsonl")
        out["spread"] = [r["spread"] for r in logs if "spread" in r]
        out["spread_raw_space"] = [r["spread_raw_space"] for r in logs if "spread_raw_space" in r]
    if (run_dir / "privacy.jsonl").exists():
        privacy = read_jsonl(run_dir / "privacy.jsonl")
        out["epsilon"] = privacy[-1].get("epsilon") if privacy else None
        out["sigma"] = privacy[-1].get("sigma") if privacy else None
    return out


def effective_weights(run_dir: Path, lam: float) -> np.ndarray:
    """Weight of client j in theta_g at the last round, per stage (K x L):
    c_j^l = 1/K [lam + (1 - lam) sum_{i != j} w_ij^l], from fedsoda.jsonl."""
    w = np.asarray(read_jsonl(run_dir / "fedsoda.jsonl")[-1]["weights"])  # K x K x L
    return (lam + (1 - lam) * w.sum(axis=0)) / w.shape[0]


def confidence_counts(prob: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> dict:
    """Pixel counts behind the calibration diagnostic: tp, fp, fn at ``threshold``, predicted and
    true foreground, pixels with 0.1 < p < 0.9 ("uncertain"), the summed probability on nuclei."""
    pred, truth = prob >= threshold, truth > 0
    return {"tp": int((pred & truth).sum()), "fp": int((pred & ~truth).sum()),
            "fn": int((~pred & truth).sum()), "pred_fg": int(pred.sum()), "true_fg": int(truth.sum()),
            "uncertain": int(((prob > 0.1) & (prob < 0.9)).sum()), "pixels": int(truth.size),
            "p_on_nuclei": float(prob[truth].sum())}


def calibration(run_dir: Path, root: Path) -> dict:
    """How confident and how precise a run's final global model is on its sites' test tiles
    (counts pooled over every test pixel; cached in the run directory as calibration.json)."""
    cache = run_dir / "calibration.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from histofed.evaluate import client_test_sets
    from histofed.predict import Predictor

    predictor, total = Predictor(run_dir), {}
    for source in client_test_sets(run_dir, root):
        for image, mask in zip(source.images, source.masks, strict=True):
            counts = confidence_counts(predictor.probabilities(np.asarray(image)), np.asarray(mask))
            total = {k: total.get(k, 0) + v for k, v in counts.items()}
    t = total
    out = {"precision": t["tp"] / max(1, t["tp"] + t["fp"]), "recall": t["tp"] / max(1, t["tp"] + t["fn"]),
           "pred_fg": t["pred_fg"] / t["pixels"], "true_fg": t["true_fg"] / t["pixels"],
           "uncertain": t["uncertain"] / t["pixels"], "p_on_nuclei": t["p_on_nuclei"] / max(1, t["true_fg"])}
    write_text(cache, json.dumps(out, indent=1))
    return out


def calibration_lines(args, root: Path, runs: dict) -> list[str]:
    """The mechanism table for L_sc: FedAvg, SO + DA and FedSODA's final global models."""
    rows = [r for r in ("fedavg", "so_da", "fedsoda") if r in runs]
    if "fedsoda" not in rows:
        return []
    lines = ["", "## What L_sc does to the model", "",
             "Final (last-round) global model of each seed on the sites' test tiles, pixels pooled; "
             "mean ± sd over seeds. 'uncertain' = share of all pixels with 0.1 < p < 0.9; 'p on nuclei' = "
             "mean probability on true nucleus pixels (computed by `calibration()` in this script, "
             "cached as calibration.json in each run).", "",
             "| method | seeds | precision | recall | predicted fg | true fg | uncertain | p on nuclei |",
             "|---|---|---|---|---|---|---|---|"]
    means = {}
    for row in rows:
        stats = [calibration(run_dir_for(args, row, s), root) for s in sorted(runs[row])]
        cells = [_ms([c[k] for c in stats]) for k in
                 ("precision", "recall", "pred_fg", "true_fg", "uncertain", "p_on_nuclei")]
        lines.append(f"| {ROWS[row][0]} | {len(stats)} | " + " | ".join(cells) + " |")
        means[row] = {k: 100 * np.mean([c[k] for c in stats]) for k in stats[0]}
    ref = next((r for r in ("so_da", "fedavg") if r in means), None)
    if ref:
        f, o = means["fedsoda"], means[ref]
        lines += ["", f"Reading: with L_sc the final model leaves {f['uncertain']:.0f} % of all pixels "
                  f"uncertain against {o['uncertain']:.0f} % for {ROWS[ref][0]} (same fusion, no L_sc), "
                  f"predicts {f['pred_fg']:.1f} % foreground against {f['true_fg']:.1f} % true "
                  f"({o['pred_fg']:.1f} % without L_sc) and has precision {f['precision']:.1f} against "
                  f"{o['precision']:.1f} at the 0.5 threshold. L_sc is a class-balanced cross-entropy "
                  "towards the frozen global model's *soft* output p_g on every pixel where the two "
                  "differ by more than 0.1; at this budget p_g is itself unsure (a third of the pixels "
                  "without L_sc), so the loss pulls the "
                  "local models towards unsure, over-wide nuclei rather than sharpening them. The "
                  "reference trains 5 local epochs x 60 rounds before its teachers are confident; "
                  "whether L_sc then helps is not measured here."]
    return lines


def _ms(values: list[float], scale: float = 100.0, sign: str = "") -> str:
    """mean ± sample std (ddof=1) of ``values`` x ``scale``; ``sign="+"`` shows the sign."""
    v = np.asarray(values, dtype=float) * scale
    if not len(v):
        return "—"
    mean = f"{v.mean():{sign}.2f}"
    return f"{mean} ± {v.std(ddof=1):.2f}" if len(v) > 1 else mean


def paired_delta(runs: dict, a: str, b: str, kind_a: str = "global", kind_b: str = "global",
                 key: str = "dice") -> list[float]:
    """Per-seed difference a - b of the client-mean test score (``key``) over the seeds where
    both runs have that model kind (a seed fixes split, initial weights and batches)."""
    seeds = sorted(s for s in set(runs.get(a, {})) & set(runs.get(b, {}))
                   if kind_a in runs[a][s]["models"] and kind_b in runs[b][s]["models"])
    return [runs[a][s]["models"][kind_a]["mean"][key] - runs[b][s]["models"][kind_b]["mean"][key]
            for s in seeds]


def verdict(deltas: list[float]) -> str:
    """The rule of benchmarks/results/defaults.md: a paired difference counts when its mean is
    beyond 2 sample std of the per-seed differences, over >= 3 seeds."""
    if len(deltas) < 3:
        return f"{len(deltas)} paired seed(s): too few to call"
    mean, sd = float(np.mean(deltas)), float(np.std(deltas, ddof=1))
    if abs(mean) > 2 * sd:
        return "beyond 2 sd of the paired differences: " + ("higher" if mean > 0 else "lower")
    return "within 2 sd of the paired differences: not distinguishable at these seeds"


def baseline_kind(kind: str) -> str:
    """FedAvg's model a kind is compared with: finetuned with finetuned, else FedAvg's global."""
    return "finetuned" if kind == "finetuned" else "global"


def aggregate(runs: dict) -> tuple[list[dict], list[str]]:
    """Table rows (one per row x model kind scored in every seed of that row), client order."""
    table, clients = [], []
    for row, (label, _, before) in ROWS.items():
        if row not in runs:
            continue
        seeds = sorted(runs[row])
        for kind in (*before, "finetuned"):
            if not all(kind in runs[row][s]["models"] for s in seeds):
                continue
            per_seed = [runs[row][s]["models"][kind] for s in seeds]
            clients += [c for c in dict.fromkeys(c for p in per_seed for c in p["clients"])
                        if c not in clients]  # first-seen order, each site once
            delta = [] if row == "fedavg" and kind != "personal" else \
                paired_delta(runs, row, "fedavg", kind, baseline_kind(kind))
            unseen = [p["unseen_dice"] for p in per_seed if p.get("unseen_dice") is not None]
            table.append({
                "row": row, "label": label, "model": kind, "seeds": seeds,
                "protocol": "after local training (paper)" if kind == "finetuned" else "before local training",
                "mean": {m: [p["mean"][m] for p in per_seed] for m in METRICS},
                "clients": {c: [p["clients"][c]["dice"] for p in per_seed if c in p["clients"]]
                            for c in clients},
                "selected_rounds": [p["round"] for p in per_seed],
                "last_test_dice": [p["last_test_dice"] for p in per_seed],
                "unseen_dice": unseen,
                "delta_fedavg": delta, "delta_seeds": len(delta),
                "mb_up": float(np.mean([runs[row][s]["mb_up_per_round"] for s in seeds])),
                "mb_down": float(np.mean([runs[row][s]["mb_down_per_round"] for s in seeds])),
                "s_per_round": float(np.mean([runs[row][s]["fit_seconds_per_round"] for s in seeds])),
                "epsilon": runs[row][seeds[0]].get("epsilon")})
    return table, clients


def plot(table: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 0.32 * len(table) + 1.4))
    ax = fig.subplots()
    labels = [f"{t['label']} [{t['model']}]" for t in table]
    means = [100 * np.mean(t["mean"]["dice"]) for t in table]
    stds = [100 * np.std(t["mean"]["dice"], ddof=1) if len(t["seeds"]) > 1 else 0 for t in table]
    colors = ["tab:green" if t["model"] == "finetuned" else "tab:gray" if t["row"] in
              ("fedavg", "fedprox", "fedbn", "local", "centralized") else "tab:red"
              if t["row"].startswith("feddp") else "tab:blue" for t in table]
    y = np.arange(len(table))[::-1]
    ax.barh(y, means, xerr=stds, color=colors, alpha=0.8, capsize=3)
    for yi, t in zip(y, table, strict=True):
        seeds = np.asarray(t["mean"]["dice"]) * 100
        ax.plot(seeds, [yi] * len(seeds), "k.", ms=4)
    ax.set_yticks(y, labels, fontsize="small")
    lo = min(min(np.asarray(t["mean"]["dice"]) * 100) for t in table)
    ax.set_xlim(max(0, lo - 5), min(100, max(m + s for m, s in zip(means, stds)) + 2))
    ax.set_xlabel("mean test Dice over sites (%) at the validation-selected round; bar = mean ± std "
                  "over seeds, dots = seeds; green = after local training (paper's protocol)",
                  fontsize="small")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _entry(table: list[dict], row: str, model: str) -> dict | None:
    return next((t for t in table if t["row"] == row and t["model"] == model), None)


def _claim(runs: dict, name: str, a: str, b: str, kind_a: str, kind_b: str) -> str | None:
    d = paired_delta(runs, a, b, kind_a, kind_b)
    if not d:
        return None
    return (f"- {name}: {_ms(d, sign='+')} Dice points (per seed: {', '.join(f'{100 * x:+.2f}' for x in d)}; "
            f"{verdict(d)}).")


def spread_lines(runs: dict) -> list[str]:
    """The spread (max - min of the off-diagonal fusion weights) in the space the models see
    ([0, 1]) and in the reference's raw 0-255 space, over rounds and seeds."""
    out = []
    for row in ("so", "so_da", "fedsoda", "fedsoda_p"):
        unit = [v for r in runs.get(row, {}).values() for v in r.get("spread", [])]
        raw = [v for r in runs.get(row, {}).values() for v in r.get("spread_raw_space", [])]
        if not unit or not raw:
            continue
        last = [(r["spread"][-1], r["spread_raw_space"][-1]) for r in runs[row].values()
                if r.get("spread") and r.get("spread_raw_space")]
        out.append(f"| {ROWS[row][0]} | {len(runs[row])} | {min(unit):.4f} – {max(unit):.4f} | "
                   f"{min(raw):.4f} – {max(raw):.4f} | "
                   f"{np.mean([u for u, _ in last]):.4f} | {np.mean([w for _, w in last]):.4f} |")
    return out


def write_markdown(args, table: list[dict], clients: list[str], runs: dict, wall: float,
                   sizes: dict[str, int], mechanism: list[str] = ()) -> str:
    expected = len(args.rows) * len(args.seeds)
    done = sum(len(v) for v in runs.values())
    whole = [s for s in args.seeds if all(s in runs.get(r, {}) for r in args.rows)]
    mean_run = float(np.mean([r["run_seconds"] for d in runs.values() for r in d.values()])) / 60
    status = (f"**Complete: {done} of {expected} runs** ({len(args.rows)} rows x seeds {args.seeds})."
              if done == expected else
              f"**Partial: {done} of {expected} runs finished** (seeds complete for every row: "
              f"{whole or 'none'}); the rest continue with the same command (below), about "
              f"{(expected - done) * mean_run / 60:.1f} h more at the mean time per finished run "
              f"({mean_run:.0f} min).")
    lines = [f"# FedSODA on nuclei-multisource (real H&E), held-out hospital {args.unseen}", "", status, "",
             f"**Budget.** {args.rounds} rounds x {args.steps} local steps (batch {args.batch}, crop "
             f"{args.crop}) per run, evaluated every {args.eval_every} rounds and at the last (sliding "
             f"window {args.crop} px, overlap {args.overlap}); UNet "
             f"{args.channels} GroupNorm (num_res_units = {args.res_units}), {args.optimizer} lr {args.lr}, "
             f"weight decay {args.weight_decay}, BCE loss (histofed's defaults, "
             "benchmarks/results/defaults.md). Sites: MoNuSeg by organ and CPM-15 (CryoNuSeg left out: "
             "partial masks), each split train/val/test (val_fraction 0.2, test_fraction 0.34); "
             f"`{args.unseen}` never trains and all its tiles score the models"
             + (" (bladder, colon, stomach: organs no training site has; the demo's and "
                "defaults.md's held-out site, so the numbers compare)." if args.unseen == "monuseg-other"
                else "."), "",
             "**Scoring.** Every method is scored two ways: *before local training* (the model the "
             "server sends, θ_g, or a method's personal model) and *after local training* (model "
             "`finetuned`: each site's model after the round's local steps, `[eval].after_fit`). "
             "**The rows marked † are the paper's protocol**: FedSODA's reference code scores each "
             "client's locally trained model (trainer.py) and keeps its best checkpoint. Each model "
             "kind takes the eval round with the best mean validation Dice (never test; the "
             "reference selects on test, per client). Test Dice = mean over the sites' test tiles "
             "at that round; mean ± sample std over seeds. Δ FedAvg: paired by seed against "
             "FedAvg scored the same way (finetuned vs finetuned, otherwise FedAvg's θ_g). unseen: "
             f"`{args.unseen}`'s Dice of θ_g (local only / FedBN: mean over the "
             "sites' own models) at the selected round.", "",
             "| method | model | Dice (test) | Δ FedAvg (paired) | unseen Dice | val-selected round(s) | "
             "last-round Dice | Jaccard | MB up / round | s / round (fit + after-fit scoring) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        mark = " †" if t["model"] == "finetuned" else ""
        delta = _ms(t["delta_fedavg"], sign="+") if t["delta_fedavg"] else "—"
        lines.append(f"| {t['label']}{mark} | {t['model']} | {_ms(t['mean']['dice'])} | {delta} | "
                     f"{_ms(t['unseen_dice'])} | {', '.join(map(str, t['selected_rounds']))} | "
                     f"{_ms(t['last_test_dice'])} | {_ms(t['mean']['jaccard'])} | {t['mb_up']:.3f} | "
                     f"{t['s_per_round']:.1f} |")
    lines += ["", "Per-site test Dice (%), mean over seeds, at the validation-selected round "
              "(paper Table 1 layout):", "",
              "| method | model | " + " | ".join(clients) + " | avg |",
              "|---|---|" + "---|" * (len(clients) + 1)]
    for t in table:
        cells = [f"{100 * np.mean(t['clients'][c]):.2f}" if t["clients"].get(c) else "—" for c in clients]
        lines.append(f"| {t['label']} | {t['model']} | " + " | ".join(cells)
                     + f" | {100 * np.mean(t['mean']['dice']):.2f} |")
    lines += ["", "![mean test Dice per method](fedsoda.png)", "", "## Claims and their evidence", "",
              "Zhang et al. report FedSODA 83.41 vs FedAvg 82.62 average Dice (+0.79 points) on their "
              "data. Each line: paired differences in Dice points (mean ± sd over seeds, then per seed); "
              "a difference counts when its mean is beyond 2 sd of the per-seed differences over >= 3 "
              "seeds (the rule of benchmarks/results/defaults.md)."]
    claims = [
        ("FedSODA − FedAvg, paper's protocol (both after local training) †", "fedsoda", "fedavg",
         "finetuned", "finetuned"),
        ("FedSODA − FedAvg, global models before local training", "fedsoda", "fedavg", "global", "global"),
        ("FedSODA after local training − FedSODA global (what local fine-tuning adds)", "fedsoda",
         "fedsoda", "finetuned", "global"),
        ("FedAvg after local training − FedAvg global", "fedavg", "fedavg", "finetuned", "global"),
        ("SO + DA − FedAvg (global)", "so_da", "fedavg", "global", "global"),
        ("FedSODA − SO + DA (the effect of L_sc; global)", "fedsoda", "so_da", "global", "global"),
        ("FedSODA − SO + DA (the effect of L_sc; after local training)", "fedsoda", "so_da",
         "finetuned", "finetuned"),
        ("SO − FedAvg (global)", "so", "fedavg", "global", "global"),
        ("DA − FedAvg (global)", "da", "fedavg", "global", "global"),
        ("FedSODA personalised θ̂_i − FedAvg global", "fedsoda_p", "fedavg", "personal", "global"),
        ("SO + DA − control (unweighted mean)", "so_da", "mean", "global", "global"),
        ("FedProx − FedAvg (global)", "fedprox", "fedavg", "global", "global"),
        ("FedBN personal − FedAvg global", "fedbn", "fedavg", "personal", "global"),
        ("local only − FedAvg global (does federation pay on the sites' own test tiles?)", "local",
         "fedavg", "personal", "global"),
        ("centralised − FedAvg (global)", "centralized", "fedavg", "global", "global"),
        ("FedDP at the paper's grid point − FedAvg (global)", "feddp_paper", "fedavg", "global", "global"),
        (f"FedDP epsilon <= {FEDDP_TARGET_EPSILON:g} − FedAvg (global)", "feddp_eps8", "fedavg",
         "global", "global"),
    ]
    lines += [""] + [c for c in (_claim(runs, *spec) for spec in claims) if c]
    for row in ("feddp_paper", "feddp_eps8"):
        eps = [r.get("epsilon") for r in runs.get(row, {}).values() if r.get("epsilon") is not None]
        sig = [r.get("sigma") for r in runs.get(row, {}).values() if r.get("sigma") is not None]
        if eps:
            lines.append(f"- {ROWS[row][0]}: epsilon = {max(eps):.3g} at delta = {FEDDP_DELTA:g} after "
                         f"{args.rounds} rounds (privacy.jsonl; sigma = {sig[0]:.4g}, client level, "
                         "central noise, q = 1).")
    if "fedsoda" in runs:
        ref = next((r for r in ("so_da", "fedavg") if r in runs), None)
        loss = {r: [v["train_loss_last_round"] for v in runs[r].values() if "train_loss_last_round" in v]
                for r in ("fedsoda", ref) if r}
        if ref and loss["fedsoda"] and loss[ref]:
            lines.append(f"- L_sc's size: last-round training loss of FedSODA (BCE + L_sc) "
                         f"{np.mean(loss['fedsoda']):.3f} vs {ROWS[ref][0]} (BCE only) "
                         f"{np.mean(loss[ref]):.3f}, mean over sites and seeds (metrics.jsonl, split train).")
    unseen_lines = []
    for row, kind in (("fedavg", "global"), ("fedsoda", "global"), ("centralized", "global"),
                      ("local", "personal")):
        t = _entry(table, row, kind)
        if t and t["unseen_dice"]:
            best = [runs[row][s]["models"][kind].get("unseen_best_site_dice") for s in t["seeds"]]
            extra = (f" (best single site's own model: {_ms([b for b in best if b is not None])})"
                     if row == "local" and any(b is not None for b in best) else "")
            unseen_lines.append(f"{t['label']} {_ms(t['unseen_dice'])}{extra}")
    if unseen_lines:
        lines.append(f"- On the held-out hospital {args.unseen} (Dice, mean ± sd over seeds): "
                     + "; ".join(unseen_lines) + ".")
    spread = spread_lines(runs)
    if spread:
        lines += ["", "## Similarity weights in the two spaces", "",
                  "Spread = max − min of the off-diagonal fusion weights w_ij^l (0 = an unweighted mean; "
                  f"with {len(clients)} sites uniform is 1/{len(clients) - 1} = {1 / max(1, len(clients) - 1):.3f}). "
                  "'[0, 1]' is what histofed uses (the statistics of the inputs the models are trained "
                  "on); 'raw 0-255' is what the reference's banks give (255 x the same draws, run "
                  "through the same models, logged by `compare_raw_space`; fedsoda.jsonl).", "",
                  "| row | seeds | spread [0, 1], all rounds | spread raw 0-255, all rounds | "
                  "last round [0, 1] (mean over seeds) | last round raw (mean over seeds) |",
                  "|---|---|---|---|---|---|", *spread]
    fused = next((r for r in ("so_da", "fedsoda") if r in runs), None)  # finished runs only
    soda = Path(args.work) / f"{fused}-seed{min(runs[fused])}" if fused else None
    if sizes and soda and (soda / "fedsoda.jsonl").exists():
        c = effective_weights(soda, 0.4)
        trained = read_jsonl(soda / "fedsoda.jsonl")[-1]["clients"]
        n = np.array([sizes[name] for name in trained], float)
        lines += ["", "## Where each site's weights go", "",
                  f"Effective weight of each site in θ_g ({soda.name}, last round, over sites and stages): "
                  f"{c.min():.3f} to {c.max():.3f} (uniform = {1 / len(n):.3f}). FedAvg weights by "
                  f"training crops n_k: {n.min() / n.sum():.3f} to {n.max() / n.sum():.3f} "
                  f"({', '.join(f'{k} {sizes[k]}' for k in trained)})."]
    lines += list(mechanism)
    lines += ["", "## Differences from the paper that remain", "",
              "- **Selection.** The reference keeps each client's checkpoint with the best *test* Dice "
              "(`model_name_max` in trainer.py); here one round per model kind is chosen on the mean "
              "validation Dice of the sites, and test is only read at that round.",
              "- **Scale and data.** "
              f"{args.rounds} rounds x {args.steps} steps on a shared CPU, against the reference's 5 "
              "warm-up epochs + 60 rounds x 5 epochs on a GPU; 5 small sites (MoNuSeg organs, CPM-15) "
              "rather than the paper's data; MONAI's UNet with one conv per block rather than the "
              "reference UNet (see the docstring of benchmarks/fedsoda.py for the paper-scale flags)."]
    total = sum(r["run_seconds"] for d in runs.values() for r in d.values())
    per_run = {row: np.mean([r["run_seconds"] for r in d.values()]) / 60 for row, d in runs.items()}
    lines += ["", f"Time: {total / 60:.1f} min of training + evaluation in all (the last invocation "
              f"{wall / 60:.1f} min; finished runs are reused); minutes per run: "
              + ", ".join(f"{row} {m:.1f}" for row, m in per_run.items())
              + f". {platform.machine()}, torch {torch.__version__}, {args.workers} workers, shared 2-core "
              "CPU (other jobs ran at the same time; s/round is indicative only).",
              f"Command: `python benchmarks/fedsoda.py {' '.join(command_args(args))}`",
              f"Written {time.strftime('%Y-%m-%d %H:%M %Z')}.", ""]
    return "\n".join(lines)


def command_args(args) -> list[str]:
    """The flags that reproduce (or continue) this benchmark, without --report-only."""
    return [a for a in sys.argv[1:] if a != "--report-only"]


def report(args, runs: dict, wall: float, root: Path) -> None:
    table, clients = aggregate(runs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(table, RESULTS / "fedsoda.png")
    config = config_from_dict(make_config(args, "fedavg", min(args.seeds)))
    sizes = {c.name: c.num_train for c in load_federation(config, root).clients}
    text = write_markdown(args, table, clients, runs, wall, sizes, calibration_lines(args, root, runs))
    write_text(RESULTS / "fedsoda.md", text)
    write_text(RESULTS / "fedsoda.json", json.dumps(
        {"args": vars(args), "runs": {r: {str(s): v for s, v in d.items()} for r, d in runs.items()},
         "table": table}, indent=1))
    print(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--overlap", type=float, default=0.0,
                        help="sliding-window overlap at evaluation (0.25 costs ~1.9x the windows)")
    parser.add_argument("--local-epochs", type=float, default=0.0, help="fedsoda rows only; 0 = --steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd"])
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0,
                        help="weight decay (the reference: AdamW with 0.01)")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--channels", nargs="+", type=int, default=[16, 32, 64, 128])
    parser.add_argument("--res-units", type=int, default=0)
    parser.add_argument("--stages", type=int, default=0)
    parser.add_argument("--unseen", default="monuseg-other", help="the held-out hospital")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default="/tmp/histofed-bench-fedsoda", help="run directories (reused)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the result files from the finished runs; train nothing")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    root = data_root_from(args.data_root)
    if root is None:
        sys.exit("pass --data-root (the folder holding nuclei/) or set HISTOFED_DATA")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    t0, federations, runs = time.time(), {}, {}
    for seed in args.seeds:  # seed-major: a partial benchmark still has complete seeds
        for row in args.rows:
            out = run_dir_for(args, row, seed)
            if args.report_only:
                if not finished_with(out, config_toml(args, row, seed)):
                    continue
            else:
                try:
                    run_one(args, row, seed, root, federations)
                except Exception as err:  # noqa: BLE001 - one broken run must not stop the others
                    print(f"[fedsoda-bench] {row} seed {seed} FAILED: {type(err).__name__}: {err}",
                          flush=True)
                    continue
            runs.setdefault(row, {})[seed] = summarise_run(out)
    if not runs:
        sys.exit(f"no finished run in {args.work} for these settings")
    report(args, runs, time.time() - t0, root)


if __name__ == "__main__":
    main()
