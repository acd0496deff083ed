"""FedMIC on real nucleus patches (CRCHisto, 4 classes) with Dirichlet label skew: baselines,
FedMIC and its two ablations, at full and partial participation, mean +- std over seeds.

Every row is a full federated run of histofed's engine on ``crchisto-dirichlet`` (5 clients,
32 x 32 patches). Scores are the test split at the LAST round (no model selection on test),
averaged over clients, then mean +- sample std (ddof = 1) over seeds: accuracy, balanced
accuracy, macro one-vs-rest AUC. "KB up / client / round" is what one participating client
uploaded in one training round, summed from egress.jsonl (arrays and scalars: what crossed the
engine). Writes benchmarks/results/fedmic.md, fedmic.json and fedmic.png (accuracy against
cumulative MB uploaded by all clients), and a per-tensor account of one FedMIC client upload
(the rank each client sent, logged by FedMIC in fedmic.jsonl).

Rows "..._unseen" hold one site out of training (``[federation].unseen``, HELD_OUT) and score
on all of its tiles the global model (FedMIC: the student) and every training site's personal
model (FedMIC: its teacher, built from ``personal_spec``; local only: the site's own model).

    nice -n 5 python benchmarks/fedmic.py --data-root ../shared/data        # the default grid
    python benchmarks/fedmic.py --data-root ../shared/data --alphas 0.1 --fractions 1.0 \\
        --rows fedavg fedmic --seeds 0

Finished runs are reused (``--work``, by default /work/main/runs/bench-fedmic, keeps the run
directories; a run is redone only if its config changed), so an interrupted benchmark
continues where it stopped, and ``--report-only`` tabulates whatever has finished, saying how
many seeds each row has. Runs go alpha by alpha in the order given, participation by
participation, and seed by seed (all rows of a seed before the next seed).

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

HELD_OUT = "client-4"  # the site the "+ unseen" rows keep out of training (scored only)
UNSEEN = {"unseen": [HELD_OUT]}

# name -> (table label, [algorithm] table, models to report, takes part in partial participation
#          [, extra [federation] keys]). Models: "global", "personal" (test split of the training
# sites), "unseen:global" (the student / global model on the held-out site), "unseen:personal"
# (each training site's personal model on the held-out site; mean over those sites)
ROWS: dict[str, tuple] = {
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
    # a site that never trained ([federation].unseen): 4 sites train, HELD_OUT is only scored
    "fedavg_unseen": (f"FedAvg, {HELD_OUT} held out", {"name": "bench-fedavg"},
                      ("global", "unseen:global"), False, UNSEEN),
    "local_unseen": (f"local only, {HELD_OUT} held out", {"name": "local"},
                     ("personal", "unseen:personal"), False, UNSEEN),
    "fedmic_unseen": (f"FedMIC, {HELD_OUT} held out", {"name": "fedmic"},
                      ("global", "personal", "unseen:global", "unseen:personal"), False, UNSEEN),
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
        "federation": {"name": "crchisto-dirichlet", "alpha": alpha, "num_clients": args.clients,
                       **(ROWS[row][4] if len(ROWS[row]) > 4 else {})},
        "model": {"name": "cnn", "width": args.width, "depth": 3},
        "algorithm": algorithm,
        "train": {"local_steps": args.steps, "batch_size": args.batch, "lr": args.lr,
                  "optimizer": "adam"},
        "eval": {"splits": ["test"]},
    }


def run_dir_of(args, key: tuple) -> Path:
    row, alpha, fraction, seed = key
    return Path(args.work) / f"{row}-a{alpha}-p{fraction}-seed{seed}"


# config keys added or changed after some runs were made that do nothing in this benchmark's
# classification runs: [train].loss and [eval].instances are read by segmentation only;
# [eval].after_fit = false is how every earlier run behaved. A finished run that differs from
# the current config in these keys alone is reused (finished_with demands identical text).
INERT = {("train", "loss"): None, ("eval", "instances"): None, ("eval", "after_fit"): False}


def _without_inert(config: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for (table, key), value in INERT.items():
        if table in out and (value is None or out[table].get(key, value) == value):
            out[table].pop(key, None)
    return out


def is_finished(args, key: tuple) -> bool:
    """The run of ``key`` finished with this invocation's settings (up to INERT keys)."""
    import tomllib

    config = config_from_dict(make_config(args, *key), source=f"benchmark row {key[0]}")
    text, out = dump_toml(config.to_dict()), run_dir_of(args, key)
    if finished_with(out, text):
        return True
    saved = out / "config.toml"
    if not (finished_with(out, saved.read_text()) if saved.exists() else False):
        return False  # not finished at all
    return _without_inert(tomllib.loads(saved.read_text())) == _without_inert(tomllib.loads(text))


def run_one(args, key: tuple, root: Path, federations: dict) -> Path:
    """Run (or reuse) one (row, alpha, fraction, seed); returns its run directory."""
    row, alpha, fraction, seed = key
    out = run_dir_of(args, key)
    config = config_from_dict(make_config(args, row, alpha, fraction, seed),
                              source=f"benchmark row {row}")
    if is_finished(args, key):
        return out
    if out.exists():
        shutil.rmtree(out)  # unfinished, or made with other settings
    fed_key = (alpha, seed, len(ROWS[row]) > 4)  # a held-out site changes the federation
    if fed_key not in federations:
        federations[fed_key] = load_federation(config, root)
    t0 = time.time()
    run_experiment(config, data_root=root, run_dir=new_run_dir(out, row),
                   federation=federations[fed_key])
    print(f"[fedmic-bench] {row} alpha {alpha} p {fraction} seed {seed}: {time.time() - t0:.0f} s",
          flush=True)
    return out


def summarise_run(run_dir: Path, models: tuple[str, ...]) -> dict:
    """Last-round test metrics per model (client mean), upload per client per round, and the
    accuracy curve against cumulative MB uploaded."""
    lines = read_jsonl(run_dir / "metrics.jsonl")
    rows = [r for r in lines if r.get("split") == "test"]
    last = max(r["round"] for r in rows)
    out: dict = {"round": last, "models": {}}
    for model in models:
        at = _scored(lines, model, last)
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
    for model in (m for m in models if not m.startswith("unseen:")):
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
        out["upload"] = upload_breakdown(run_dir, shapes)
    out["wall_seconds"] = float(json.loads((run_dir / "run.json").read_text())
                                .get("wall_seconds_last_session", float("nan")))
    return out


def _scored(lines: list[dict], model: str, rnd: int) -> list[dict]:
    """Metric rows of ``model`` at round ``rnd``: "global" / "personal" on the training sites'
    test split; "unseen:global" = the global model on the held-out site(s); "unseen:personal"
    = every training site's personal model ("personal:<site>") on the held-out site(s)."""
    if model.startswith("unseen:"):
        want = model.partition(":")[2]
        return [r for r in lines if r.get("split") == "unseen" and r["round"] == rnd
                and (r.get("model") == want or r.get("model", "").startswith(want + ":"))]
    return [r for r in lines if r.get("split") == "test" and r["round"] == rnd
            and r.get("model", "global") == model]


def upload_breakdown(run_dir: Path, shapes: dict) -> dict | None:
    """Where one client's upload goes, per tensor, from fedmic.jsonl's ``up_ranks`` (the rank
    each client sent; 0 = dense) and the egress log's scalar bytes: mean over rounds and
    clients. None for runs logged before ``up_ranks`` existed."""
    log = read_jsonl(run_dir / "fedmic.jsonl")
    if not log or "up_ranks" not in log[0]:
        return None
    tensors = {}
    for key, shape in shapes.items():
        m, n = shape[0], int(np.prod(shape[1:])) if len(shape) > 1 else 1
        ranks = [per[key] for r in log for per in r["up_ranks"].values()]
        sent = [4 * (k * (m + n + 1) if k else m * n) for k in ranks]  # float32
        tensors[key] = {"shape": [m, n], "dense_bytes": 4 * m * n,
                        "rank_mean": float(np.mean(ranks)), "rank_min": int(min(ranks)),
                        "rank_max": int(max(ranks)), "bytes_mean": float(np.mean(sent))}
    egress = [r for r in read_jsonl(run_dir / "egress.jsonl")
              if r.get("phase") == "fit" and r["direction"] == "up"]
    uploads = {(r["round"], r["client"]) for r in egress}
    scalars = sum(r["bytes"] for r in egress if r["kind"] == "scalars") / max(len(uploads), 1)
    return {"tensors": tensors, "scalar_bytes": scalars,
            "energy": [r["energy"] for r in log], "rounds": [r["round"] for r in log]}


def _ms(values: list[float], scale: float = 100.0) -> str:
    v = np.asarray(values, dtype=float) * scale
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"


def build_table(runs: dict) -> list[dict]:
    table = []
    for (alpha, fraction) in sorted({(k[1], k[2]) for k in runs}):
        for row, (label, _, models, *_) in ROWS.items():
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
        for row, (label, _, models, *_) in ROWS.items():
            seeds = sorted(k[3] for k in runs if k[:3] == (row, alpha, fraction))
            if not seeds or row in ("local", "centralized") or row.endswith("_unseen"):
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


MODEL_LABEL = {"global": "global", "personal": "personal",
               "unseen:global": f"global on {HELD_OUT} (never trained)",
               "unseen:personal": f"each site's personal on {HELD_OUT} (mean)"}
READING = "## Reading"  # a hand-written section after this heading survives regeneration


def _seeds_cell(seeds: list[int], wanted: int) -> str:
    return f"{len(seeds)}" if len(seeds) >= wanted else f"{len(seeds)} of {wanted} (partial)"


def breakdown_lines(runs: dict, table: list[dict]) -> list[str]:
    """Per-tensor account of one FedMIC client upload (the run with the most rounds logged)."""
    picks = [k for k in sorted(runs, key=lambda k: (-k[2], k)) if k[0] == "fedmic"
             and runs[k].get("upload")]
    if not picks:
        return []
    key = picks[0]
    up = runs[key]["upload"]
    avg = next((t["kb_up"] for t in table if t["row"] == "fedavg" and t["alpha"] == key[1]
                and t["fraction"] == key[2]), None)
    lines = ["", "## Where a FedMIC upload's bytes go", "",
             f"Run {key[0]}, alpha {key[1]}, participation {key[2]}, seed {key[3]}: every "
             "client upload of every round (fedmic.jsonl `up_ranks`: the rank each client sent "
             "per tensor), float32 factors U (m x k), s (k), V (n x k) = 4 k (m + n + 1) bytes; "
             "a tensor whose factors would not be smaller goes dense (4 m n bytes). Energy kept "
             "T(t) per round: " + ", ".join(f"{e:.3f}" for e in up["energy"])
             + " (T_min + t/R (T_max − T_min), t = 1..R).", "",
             "| tensor | matrix m x n | dense KB | rank sent: mean (min–max) of min(m, n); "
             "0 = sent dense | KB sent (mean) | saving | largest rank that saves 5x |",
             "|---|---|---|---|---|---|---|"]
    total, dense_total, flat, flat_dense, over, mats = 0.0, 0.0, 0.0, 0.0, 0, 0
    for name, t in up["tensors"].items():
        m, n = t["shape"]
        if n == 1:  # 1-D: always dense
            flat += t["bytes_mean"]
            flat_dense += t["dense_bytes"]
            continue
        total += t["bytes_mean"]
        dense_total += t["dense_bytes"]
        k5 = int(m * n // (5 * (m + n + 1)))  # 5 k (m + n + 1) <= m n
        mats, over = mats + 1, over + (t["rank_mean"] > k5)
        lines.append(f"| `{name}` | {m} x {n} | {t['dense_bytes'] / KB:.2f} | "
                     f"{t['rank_mean']:.1f} ({t['rank_min']}–{t['rank_max']}) of {min(m, n)} | "
                     f"{t['bytes_mean'] / KB:.2f} | {t['dense_bytes'] / t['bytes_mean']:.2f}x | "
                     f"{k5 or 'none'} |")
    all_up = total + flat + up["scalar_bytes"]
    lines.append(f"| 1-D tensors (norm scales, biases), dense | — | {flat_dense / KB:.2f} | — | "
                 f"{flat / KB:.2f} | 1.00x | — |")
    lines.append(f"| scalars (round, sample count, shapes as JSON) | — | — | — | "
                 f"{up['scalar_bytes'] / KB:.2f} | — | — |")
    lines.append(f"| **total** | | {(dense_total + flat_dense) / KB:.2f} | | "
                 f"**{all_up / KB:.2f}** | **{(dense_total + flat_dense) / all_up:.2f}x** | |")
    if avg:
        need = avg * KB / 5
        fp16 = total / 2 + flat + up["scalar_bytes"]
        lines += ["", f"FedAvg uploads {avg:.1f} KB per client per round here, so 5x fewer "
                  f"needs <= {need / KB:.1f} KB; FedMIC sends {all_up / KB:.1f} KB "
                  f"({avg * KB / all_up:.2f}x). Keeping {min(up['energy']):.3f}–"
                  f"{max(up['energy']):.3f} of each update's squared singular values needs, "
                  f"in {over} of {mats} matrices, a larger mean rank than the last column "
                  "allows (factors cost k (m + n + 1) numbers against m n, so on these small "
                  "matrices only a very low rank saves 5x), so "
                  f"the factors save {dense_total / max(total, 1):.2f}x on the matrices; 1-D tensors "
                  f"and scalars ({(flat + up['scalar_bytes']) / KB:.2f} KB) travel as they are. "
                  "Arithmetic, not run: float16 factors would make it "
                  f"{fp16 / KB:.1f} KB ({avg * KB / fp16:.2f}x); FedKD's released code "
                  "(github.com/wuch15/FedKD, run.py / parameters.py) keeps float32 factors "
                  "(numpy SVD of float32 updates) with t_min 0.95, t_max 0.98, the defaults "
                  "used here: float16 would not be FedKD's choice and the thresholds already "
                  "are, so no option is added for it."]
    return lines


def write_markdown(args, table: list[dict], runs: dict, wall: float, planned: list[tuple],
                   previous: str = "") -> str:
    wanted = len(args.seeds)
    done = sum(k in runs for k in planned)
    lines = ["# FedMIC on crchisto-dirichlet (real CRCHisto nucleus patches, 4 classes)", "",
             f"**Status: {done} of {len(planned)} planned runs finished"
             + (" (complete).**" if done == len(planned) else
                f"; PARTIAL: a row with fewer than {wanted} seeds says so in its 'seeds' "
                "column, and the missing runs are listed at the end.**"),
             "",
             f"Budget (CPU, 2 shared cores): {args.clients} clients, {args.rounds} rounds x "
             f"{args.steps} local steps, batch {args.batch}, Adam lr {args.lr}; student = every "
             f"method's model: SmallCNN width {args.width}, depth 3, GroupNorm; FedMIC teacher: "
             f"SmallCNN width {args.teacher_width}, depth 3; T_min {args.t_min}, T_max {args.t_max}, "
             f"tau {args.tau}, r = {args.rep_dim}. Seeds {args.seeds}. Test split at the last "
             "round, mean over clients, then mean ± sample std over seeds (%; one seed: the "
             "value alone). KB up: one "
             "participating client, one training round, from egress.jsonl (arrays + scalars). "
             "Centralised: the raw training patches a site sends once (round 1). Macro AUC is "
             "one-vs-rest, undefined on a client whose test set lacks a class (common at "
             "alpha = 0.1); its mean is over the clients where it is defined. 'sites': clients "
             "scored (fewest over seeds); at participation < 1 a site that was never sampled "
             "has no teacher yet, so FedMIC's personal row covers only the sites that trained. "
             f"Rows '... {HELD_OUT} held out' train on the other {args.clients - 1} sites "
             f"([federation].unseen = [\"{HELD_OUT}\"]) and score on every tile "
             f"{HELD_OUT} holds: the global model (FedMIC: the student), and each training "
             "site's personal model (FedMIC: its teacher; local only: its own model), "
             "'sites' then counting (site, held-out site) pairs.", ""]
    keys = sorted({(t["alpha"], t["fraction"]) for t in table}, key=lambda k: (k[0], -k[1]))
    for (alpha, fraction) in keys:
        lines += [f"## alpha = {alpha}, participation {fraction}", "",
                  "| method | model | accuracy | balanced acc. | macro AUC | KB up / client / round "
                  "| upload kind | sites | seeds |", "|---|---|---|---|---|---|---|---|---|"]
        for t in table:
            if (t["alpha"], t["fraction"]) != (alpha, fraction):
                continue
            kinds = ", ".join(k for k in t["up_kinds"] if k != "scalars") or "—"
            lines.append(f"| {t['label']} | {MODEL_LABEL.get(t['model'], t['model'])} | "
                         f"{_ms(t['accuracy'])} | {_ms(t['balanced_accuracy'])} | {_ms(t['auc'])} "
                         f"| {t['kb_up']:.1f} | {kinds} | {t['sites']} | "
                         f"{_seeds_cell(t['seeds'], wanted)} |")
        lines.append("")
    missing = [k for k in planned if k not in runs]
    lines += ["![accuracy against cumulative MB uploaded](fedmic.png)", "",
              "## The issue's targets, as measured (from the rows above)", ""]
    for (alpha, fraction) in keys:
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
            lines.append(f"- alpha {alpha}, participation {fraction} ({len(seeds)} paired "
                         f"seeds): FedMIC personal − FedAvg accuracy = {_ms(d)} points (by seed: "
                         f"{', '.join(f'{100 * x:+.2f}' for x in d)}); FedAvg uploads "
                         f"{ratio:.2f}x the bytes of FedMIC per client per round "
                         f"({avg['kb_up']:.1f} vs {mic['kb_up']:.1f} KB; target >= 5x: "
                         f"{'met' if ratio >= 5 else 'missed'}).")
            if loc:
                lines.append(f"  FedMIC personal − local-only accuracy = {_ms(loc)} points "
                             f"(by seed: {', '.join(f'{100 * x:+.2f}' for x in loc)}): the "
                             "teacher against a model trained on the same site alone.")
        unseen = {m: pick.get(r) for m, r in (
            ("FedMIC student", ("fedmic_unseen", "unseen:global")),
            ("FedMIC teachers (mean)", ("fedmic_unseen", "unseen:personal")),
            ("FedAvg global", ("fedavg_unseen", "unseen:global")),
            ("local-only models (mean)", ("local_unseen", "unseen:personal")))}
        have = {m: t for m, t in unseen.items() if t}
        if have:
            lines.append(f"- alpha {alpha}, participation {fraction}: on {HELD_OUT}, which "
                         "never trained, accuracy / balanced accuracy: "
                         + "; ".join(f"{m} {_ms(t['accuracy'])} / {_ms(t['balanced_accuracy'])} "
                                     f"({len(t['seeds'])} seeds)" for m, t in have.items())
                         + ".")
    lines += breakdown_lines(runs, table)
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
                     f"{'; '.join(not_run)}.")
    lines += ["", f"Rows planned: {', '.join(args.rows)}; alphas {args.alphas}; participation "
              f"{args.fractions}. local-only, centralised and the held-out rows run at "
              "participation 1.0 only.",
              "", f"Sum of the wall times of the runs in this table: "
              f"{sum(r['wall_seconds'] for r in runs.values()) / 60:.1f} min (2 shared CPU cores, "
              f"nice 5-10); this invocation: {wall / 60:.1f} min (reused runs cost nothing). "
              f"torch {torch.__version__}, {platform.processor() or platform.machine()}.", "",
              "Command (add `--report-only` to re-tabulate finished runs without starting any): `"
              + " ".join(["python", "benchmarks/fedmic.py",
                          *[a for a in sys.argv[1:] if a != "--report-only"]]) + "`"]
    if READING in previous:  # keep the hand-written reading; it names the runs it read
        lines += ["", previous[previous.index(READING):].rstrip()]
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
    # defaults = the budget of benchmarks/results/fedmic.md (2 shared CPU cores)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--eval-every", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--teacher-width", type=int, default=24)
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
    parser.add_argument("--work", default="/work/main/runs/bench-fedmic",
                        help="run directories (reused; persistent, so a later session can "
                             "finish an interrupted grid)")
    args = parser.parse_args()
    root = data_root_from(args.data_root)
    if root is None:
        sys.exit("pass --data-root (the folder holding crchisto/) or set HISTOFED_DATA")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    # in the order given: alpha, then participation, then whole seeds (every row of a seed
    # before the next seed, so a cut-off grid still pairs rows by seed)
    planned = [(row, a, p, s) for a in args.alphas for p in args.fractions for s in args.seeds
               for row in args.rows if p == 1.0 or ROWS[row][3]]
    t0, federations, runs = time.time(), {}, {}
    for key in planned:
        over = args.budget_min and time.time() - t0 > 60 * args.budget_min
        if (over or args.report_only) and not is_finished(args, key):
            continue  # over budget / report only: only reuse runs finished with these settings
        run_dir = run_one(args, key, root, federations)
        runs[key] = summarise_run(run_dir, ROWS[key[0]][2])
    table = build_table(runs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"fedmic-{args.tag}" if args.tag else "fedmic"
    if runs:
        plot(runs, RESULTS / f"{stem}.png")
    previous = (RESULTS / f"{stem}.md").read_text() if (RESULTS / f"{stem}.md").exists() else ""
    text = write_markdown(args, table, runs, time.time() - t0, planned, previous)
    text = text.replace("](fedmic.png)", f"]({stem}.png)")
    write_text(RESULTS / f"{stem}.md", text)
    write_text(RESULTS / f"{stem}.json", json.dumps(
        {"args": vars(args), "runs": {"|".join(map(str, k)): v for k, v in runs.items()},
         "table": table}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
