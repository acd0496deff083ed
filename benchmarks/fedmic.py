"""FedMIC on real nucleus patches (CRCHisto, 4 classes) with Dirichlet label skew: baselines,
FedMIC and its two ablations, at full and partial participation, mean +- std over seeds.

Every row is a full federated run of histofed's engine on ``crchisto-dirichlet`` (5 clients,
32 x 32 patches). Scores are the test split at the LAST round (no model selection on test),
averaged over clients, then mean +- sample std (ddof = 1) over seeds: accuracy, balanced
accuracy, macro one-vs-rest AUC. "KB up / client / round" is what one participating client
uploaded in one training round, summed from egress.jsonl (arrays and scalars: what crossed the
engine). Writes benchmarks/results/fedmic.md, fedmic.json and fedmic.png (accuracy against
cumulative MB uploaded by all clients).

    nice -n 5 python benchmarks/fedmic.py --data-root ../shared/data        # the default grid
    python benchmarks/fedmic.py --data-root ../shared/data --alphas 0.1 --fractions 1.0 \\
        --rows fedavg fedmic --seeds 0

Finished runs are reused (``--work`` keeps the run directories; a run is redone only if its
config changed), so an interrupted benchmark continues where it stopped.

Partial participation for the FedAvg family: histofed's FedAvg/FedProx/FedBN always train every
client, so this script registers benchmark-only subclasses ("bench-fedavg", ...) that add the
very same client sampling as FedMIC (``fraction``, seeded by (seed, round)) and nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from histofed.algorithms.base import ALGORITHMS, register_algorithm
from histofed.algorithms.fedavg import FedAvg
from histofed.algorithms.fedbn import FedBN
from histofed.algorithms.fedmic import FedMIC
from histofed.algorithms.fedprox import FedProx
from histofed.config import config_from_dict, dump_toml
from histofed.engine import data_root_from, load_federation, run_experiment
from histofed.engine.rundir import finished_with, new_run_dir, read_jsonl
from histofed.options import option
from histofed.report_plots import atomic_path, write_text

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("accuracy", "balanced_accuracy", "auc")
KB, MB = 1e3, 1e6


def _sampled(cls, name: str):
    """``cls`` plus FedMIC's client sampling (benchmark only; see the module docstring)."""

    @dataclass
    class Sampled(cls):
        fraction: float = option(1.0, gt=0, le=1)

        def configure_fit(self, sctx, state):
            chosen = FedMIC.sample(self, sctx)  # type: ignore[arg-type]  (uses only .fraction)
            return super().configure_fit(dataclasses.replace(sctx, clients=chosen), state)

        def configure_evaluate(self, sctx, state):  # every site is scored, sampled or not
            return super().configure_fit(sctx, state)

    Sampled.__name__ = f"Sampled{cls.__name__}"
    if name not in ALGORITHMS:
        register_algorithm(name)(Sampled)
    return Sampled


for _cls, _name in ((FedAvg, "bench-fedavg"), (FedProx, "bench-fedprox"), (FedBN, "bench-fedbn")):
    _sampled(_cls, _name)

# name -> (table label, [algorithm] table, models to report, takes part in partial participation)
ROWS: dict[str, tuple[str, dict, tuple[str, ...], bool]] = {
    "fedavg": ("FedAvg", {"name": "bench-fedavg"}, ("global",), True),
    "fedprox": ("FedProx (mu = 0.01)", {"name": "bench-fedprox", "mu": 0.01}, ("global",), True),
    "fedbn": ("FedBN (GroupNorm local)", {"name": "bench-fedbn"}, ("personal",), True),
    "local": ("local only", {"name": "local"}, ("personal",), False),
    "centralized": ("centralised (pooled)", {"name": "centralized"}, ("global",), False),
    "fedmic": ("FedMIC", {"name": "fedmic"}, ("global", "personal"), True),
    "fedmic_nogpd": ("FedMIC without GPD", {"name": "fedmic", "gpd": False},
                     ("global", "personal"), True),
    "fedmic_nokd": ("FedMIC without dual KD", {"name": "fedmic", "kd": False},
                    ("global", "personal"), True),
}


def make_config(args, row: str, alpha: float, fraction: float, seed: int) -> dict:
    algorithm = dict(ROWS[row][1])
    if algorithm["name"] == "fedmic":
        algorithm.update(teacher={"name": "cnn", "width": args.teacher_width, "depth": 3},
                         t_min=args.t_min, t_max=args.t_max, tau=args.tau, rep_dim=args.rep_dim)
    if ROWS[row][3]:
        algorithm["fraction"] = fraction
    return {
        "run": {"name": f"{row}-a{alpha}-p{fraction}-s{seed}", "seed": seed, "rounds": args.rounds,
                "workers": args.workers, "eval_every": args.eval_every, "keep_checkpoints": 1},
        "federation": {"name": "crchisto-dirichlet", "alpha": alpha, "num_clients": args.clients},
        "model": {"name": "cnn", "width": args.width, "depth": 3},
        "algorithm": algorithm,
        "train": {"local_steps": args.steps, "batch_size": args.batch, "lr": args.lr,
                  "optimizer": "adam"},
        "eval": {"splits": ["test"]},
    }


def run_one(args, key: tuple, root: Path, federations: dict) -> Path:
    """Run (or reuse) one (row, alpha, fraction, seed); returns its run directory."""
    row, alpha, fraction, seed = key
    out = Path(args.work) / f"{row}-a{alpha}-p{fraction}-seed{seed}"
    config = config_from_dict(make_config(args, row, alpha, fraction, seed),
                              source=f"benchmark row {row}")
    if finished_with(out, dump_toml(config.to_dict())):
        return out
    if out.exists():
        shutil.rmtree(out)  # unfinished, or made with other settings
    if (alpha, seed) not in federations:
        federations[(alpha, seed)] = load_federation(config, root)
    t0 = time.time()
    run_experiment(config, data_root=root, run_dir=new_run_dir(out, row),
                   federation=federations[(alpha, seed)])
    print(f"[fedmic-bench] {row} alpha {alpha} p {fraction} seed {seed}: {time.time() - t0:.0f} s",
          flush=True)
    return out


def summarise_run(run_dir: Path, models: tuple[str, ...]) -> dict:
    """Last-round test metrics per model (client mean), upload per client per round, and the
    accuracy curve against cumulative MB uploaded."""
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("split") == "test"]
    last = max(r["round"] for r in rows)
    out: dict = {"round": last, "models": {}}
    for model in models:
        at = [r for r in rows if r["round"] == last and r.get("model", "global") == model]
        # AUC is undefined (NaN) on a client whose test set lacks a class (strong skew): the
        # client mean is over the clients where it is defined, and that count is kept
        out["models"][model] = {m: float(np.nanmean([r[m] for r in at])) for m in METRICS}
        out["models"][model]["clients"] = len(at)
        out["models"][model]["auc_clients"] = int(np.isfinite([r["auc"] for r in at]).sum())
    egress = [r for r in read_jsonl(run_dir / "egress.jsonl")
              if r.get("phase") == "fit" and r["direction"] == "up"]
    uploads = {(r["round"], r["client"]) for r in egress}
    total_up = sum(r["bytes"] for r in egress)
    out["kb_up_per_client_round"] = total_up / max(len(uploads), 1) / KB
    out["up_kinds"] = sorted({r["kind"] for r in egress})
    cum, by_round = 0.0, {}
    for r in egress:
        by_round[r["round"]] = by_round.get(r["round"], 0) + r["bytes"]
    out["curves"] = {}
    for model in models:
        curve = []
        for rnd in sorted({r["round"] for r in rows}):
            cum = sum(v for k, v in by_round.items() if k <= rnd) / MB
            acc = [r["accuracy"] for r in rows
                   if r["round"] == rnd and r.get("model", "global") == model]
            curve.append((rnd, cum, float(np.mean(acc))))
        out["curves"][model] = curve
    if (run_dir / "fedmic.jsonl").exists():  # where FedMIC's bytes go, last round
        last_log = read_jsonl(run_dir / "fedmic.jsonl")[-1]
        with np.load(run_dir / "final" / "global.npz") as z:
            shapes = {k: z[k].shape for k in z.files}
        out["ranks"] = {k: [r, list(shapes[k])] for k, r in last_log["down_ranks"].items()
                        if len(shapes[k]) >= 2}
        out["energy_last"] = last_log["energy"]
    out["wall_seconds"] = float(json.loads((run_dir / "run.json").read_text())
                                .get("wall_seconds_last_session", float("nan")))
    return out


def _ms(values: list[float], scale: float = 100.0) -> str:
    v = np.asarray(values, dtype=float) * scale
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"


def build_table(runs: dict) -> list[dict]:
    table = []
    for (alpha, fraction) in sorted({(k[1], k[2]) for k in runs}):
        for row, (label, _, models, _) in ROWS.items():
            seeds = sorted(k[3] for k in runs if k[:3] == (row, alpha, fraction))
            if not seeds:
                continue
            for model in models:
                per = [runs[(row, alpha, fraction, s)] for s in seeds]
                table.append({"row": row, "label": label, "model": model, "alpha": alpha,
                              "fraction": fraction, "seeds": seeds,
                              **{m: [p["models"][model][m] for p in per] for m in METRICS},
                              "sites": min(p["models"][model]["clients"] for p in per),
                              "kb_up": float(np.mean([p["kb_up_per_client_round"] for p in per])),
                              "up_kinds": per[0]["up_kinds"],
                              "wall_s": float(np.mean([p["wall_seconds"] for p in per]))})
    return table


def plot(runs: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    keys = sorted({(k[1], k[2]) for k in runs})
    fig = Figure(figsize=(5.0 * len(keys), 4.0))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, (alpha, fraction) in zip(axes, keys, strict=True):
        for row, (label, _, models, _) in ROWS.items():
            seeds = sorted(k[3] for k in runs if k[:3] == (row, alpha, fraction))
            if not seeds or row in ("local", "centralized"):
                continue
            for model in models:
                curves = np.array([runs[(row, alpha, fraction, s)]["curves"][model]
                                   for s in seeds])
                mb, acc = curves[..., 1].mean(0), curves[..., 2].mean(0) * 100
                ax.plot(mb, acc, marker="o", ms=3, ls="--" if model == "global" else "-",
                        label=f"{label} [{model}]")
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel("cumulative MB uploaded (all clients)")
        ax.set_ylabel("mean test accuracy (%)")
        ax.set_title(f"alpha = {alpha}, participation {fraction}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def write_markdown(args, table: list[dict], runs: dict, wall: float, planned: list[tuple]) -> str:
    lines = ["# FedMIC on crchisto-dirichlet (real CRCHisto nucleus patches, 4 classes)", "",
             f"Budget (CPU, 2 shared cores): {args.clients} clients, {args.rounds} rounds x "
             f"{args.steps} local steps, batch {args.batch}, Adam lr {args.lr}; student = every "
             f"method's model: SmallCNN width {args.width}, depth 3, GroupNorm; FedMIC teacher: "
             f"SmallCNN width {args.teacher_width}, depth 3; T_min {args.t_min}, T_max {args.t_max}, "
             f"tau {args.tau}, r = {args.rep_dim}. Seeds {args.seeds}. Test split at the last "
             "round, mean over clients, then mean ± sample std over seeds (%). KB up: one "
             "participating client, one training round, from egress.jsonl (arrays + scalars). "
             "Centralised: the raw training patches a site sends once (round 1). Macro AUC is "
             "one-vs-rest, undefined on a client whose test set lacks a class (common at "
             "alpha = 0.1); its mean is over the clients where it is defined. 'sites': clients "
             "scored (fewest over seeds); at participation < 1 a site that was never sampled "
             "has no teacher yet, so FedMIC's personal row covers only the sites that trained.",
             ""]
    for (alpha, fraction) in sorted({(t["alpha"], t["fraction"]) for t in table}):
        lines += [f"## alpha = {alpha}, participation {fraction}", "",
                  "| method | model | accuracy | balanced acc. | macro AUC | KB up / client / round "
                  "| upload kind | sites | seeds |", "|---|---|---|---|---|---|---|---|---|"]
        for t in table:
            if (t["alpha"], t["fraction"]) != (alpha, fraction):
                continue
            kinds = ", ".join(k for k in t["up_kinds"] if k != "scalars") or "—"
            lines.append(f"| {t['label']} | {t['model']} | {_ms(t['accuracy'])} | "
                         f"{_ms(t['balanced_accuracy'])} | {_ms(t['auc'])} | {t['kb_up']:.1f} | "
                         f"{kinds} | {t['sites']} | {len(t['seeds'])} |")
        lines.append("")
    missing = [k for k in planned if k not in runs]
    lines += ["![accuracy against cumulative MB uploaded](fedmic.png)", "",
              "## The issue's targets, as measured", ""]
    for alpha in sorted({t["alpha"] for t in table}):
        for fraction in sorted({t["fraction"] for t in table if t["alpha"] == alpha}):
            pick = {(t["row"], t["model"]): t for t in table
                    if t["alpha"] == alpha and t["fraction"] == fraction}
            mic, avg = pick.get(("fedmic", "personal")), pick.get(("fedavg", "global"))
            if mic and avg:
                seeds = sorted(set(mic["seeds"]) & set(avg["seeds"]))
                d = [runs[("fedmic", alpha, fraction, s)]["models"]["personal"]["accuracy"]
                     - runs[("fedavg", alpha, fraction, s)]["models"]["global"]["accuracy"]
                     for s in seeds]
                ratio = avg["kb_up"] / mic["kb_up"]
                loc = [runs[("fedmic", alpha, fraction, s)]["models"]["personal"]["accuracy"]
                       - runs[("local", alpha, 1.0, s)]["models"]["personal"]["accuracy"]
                       for s in seeds if ("local", alpha, 1.0, s) in runs]
                if loc:
                    lines.append(f"- alpha {alpha}, participation {fraction}: FedMIC personal − "
                                 f"local-only accuracy = {_ms(loc)} points (paired by seed: "
                                 f"{', '.join(f'{100 * x:+.2f}' for x in loc)}): the teacher "
                                 "against a model trained on the same site alone.")
                lines.append(f"- alpha {alpha}, participation {fraction}: FedMIC personal − FedAvg "
                             f"accuracy = {_ms(d)} points (paired by seed: "
                             f"{', '.join(f'{100 * x:+.2f}' for x in d)}); FedAvg uploads "
                             f"{ratio:.2f}x the bytes of FedMIC per client per round "
                             f"({avg['kb_up']:.1f} vs {mic['kb_up']:.1f} KB).")
    example = next((k for k in sorted(runs, key=lambda k: (-k[2], k)) if k[0] == "fedmic"
                    and "ranks" in runs[k]), None)
    if example:
        r = runs[example]
        cells = []
        for key, (rank, shape) in r["ranks"].items():
            m, n = shape[0], int(np.prod(shape[1:]))
            cells.append(f"`{key}` {m} x {n}: " + (f"rank {rank} of {min(m, n)}" if rank else
                                                   "dense (factors would be larger)"))
        lines += ["", f"Where FedMIC's bytes go ({example[0]}, alpha {example[1]}, participation "
                  f"{example[2]}, seed {example[3]}; the server's re-compressed mean update of the "
                  f"last round, energy {r['energy_last']:.3f}): " + "; ".join(cells) + "."]
    lines += ["", "## Missing rows", ""]
    if missing:
        lines.append(f"{len(missing)} planned runs are not in this table (budget; rerun the "
                     "command below to add them, finished runs are reused): "
                     + ", ".join(f"{r} a{a} p{p} s{s}" for r, a, p, s in missing) + ".")
    else:
        lines.append("None of the planned runs is missing.")
    not_run = [ROWS[r][0] for r in ROWS if r not in args.rows]
    if not_run:
        lines.append(f"Not run at this budget (not planned in this invocation): "
                     f"{', '.join(not_run)}.")
    lines += ["", f"Rows planned: {', '.join(args.rows)}; alphas {args.alphas}; participation "
              f"{args.fractions}. local-only and centralised run at participation 1.0 only.",
              "", f"Sum of the wall times of the runs in this table: "
              f"{sum(r['wall_seconds'] for r in runs.values()) / 60:.1f} min (2 shared CPU cores, "
              f"nice 5); this invocation: {wall / 60:.1f} min (reused runs cost nothing). "
              f"torch {torch.__version__}, {platform.processor() or platform.machine()}.", "",
              "Command (add `--report-only` to re-tabulate finished runs without starting any): `"
              + " ".join(["python", "benchmarks/fedmic.py",
                          *[a for a in sys.argv[1:] if a != "--report-only"]]) + "`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.1, 0.3, 0.5])
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--teacher-width", type=int, default=32)
    parser.add_argument("--t-min", type=float, default=0.95)
    parser.add_argument("--t-max", type=float, default=0.98)
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--rep-dim", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--budget-min", type=float, default=0.0,
                        help="stop starting new runs after this many minutes (0 = no limit)")
    parser.add_argument("--tag", default="",
                        help="write results/fedmic-<tag>.* instead of fedmic.* (another budget)")
    parser.add_argument("--report-only", action="store_true",
                        help="start no run: tabulate the finished ones in --work")
    parser.add_argument("--work", default="/tmp/histofed-bench-fedmic",
                        help="run directories (reused)")
    args = parser.parse_args()
    root = data_root_from(args.data_root)
    if root is None:
        sys.exit("pass --data-root (the folder holding crchisto/) or set HISTOFED_DATA")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    planned = [(row, a, p, s) for s in args.seeds for a in args.alphas for p in args.fractions
               for row in args.rows if p == 1.0 or ROWS[row][3]]  # seed-major
    t0, federations, runs = time.time(), {}, {}
    for key in planned:
        info = Path(args.work) / f"{key[0]}-a{key[1]}-p{key[2]}-seed{key[3]}" / "run.json"
        done = info.exists() and "finished" in json.loads(info.read_text())
        over = args.budget_min and time.time() - t0 > 60 * args.budget_min
        if (over or args.report_only) and not done:
            continue  # over budget: only reuse finished runs
        run_dir = run_one(args, key, root, federations)
        runs[key] = summarise_run(run_dir, ROWS[key[0]][2])
    table = build_table(runs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"fedmic-{args.tag}" if args.tag else "fedmic"
    plot(runs, RESULTS / f"{stem}.png")
    text = write_markdown(args, table, runs, time.time() - t0, planned)
    text = text.replace("](fedmic.png)", f"]({stem}.png)")
    write_text(RESULTS / f"{stem}.md", text)
    write_text(RESULTS / f"{stem}.json", json.dumps(
        {"args": vars(args), "runs": {"|".join(map(str, k)): v for k, v in runs.items()},
         "table": table}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
