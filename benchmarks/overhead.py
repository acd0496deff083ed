"""Engine overhead: the same FedAvg experiment three ways in one process run.

1. a plain PyTorch loop (clients trained one after another in one thread, no engine),
2. histofed's in-process engine (``workers`` single-thread client processes),
3. Flower's simulation engine (Ray actors, one CPU each) running the same algorithm objects.

All three use the same data pipeline and per-(round, client) seeds, so their final weights must
agree; the table reports the largest difference. Per-round time is the mean over rounds 2..N
(training only); start-up is the time from the call to the end of round 1 minus one steady round.
Writes benchmarks/results/overhead.md (and .json).

    python benchmarks/overhead.py --data-root ../shared/data        # real nuclei, 6 clients
    python benchmarks/overhead.py --rounds 3 --steps 10              # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from histofed.algorithms.aggregate import weighted_mean
from histofed.algorithms.weights import get_weights, load_weights
from histofed.config import config_from_dict
from histofed.engine import data_root_from, load_federation, run_experiment
from histofed.engine.rundir import new_run_dir, read_jsonl
from histofed.engine.runtime import job_seed
from histofed.models import build_model, init_seed, shared_model_spec
from histofed.tasks import make_task

RESULTS = Path(__file__).resolve().parent / "results"


def make_config(args, federation: str) -> dict:
    fed = {"name": federation, "crop_size": 128}
    if federation == "nuclei-multisource":
        fed["include_cryonuseg"] = False  # 6 clients, as in the reference measurement
    else:
        fed.update(num_clients=6, images_per_client=6, size=256)
    return {
        "run": {"name": "overhead", "seed": 0, "rounds": args.rounds, "workers": args.workers,
                "eval_every": 10_000, "keep_checkpoints": 1},
        "federation": fed,
        "model": {"name": "unet", "channels": [16, 32, 64, 128]},
        "algorithm": {"name": "fedavg"},
        "train": {"local_steps": args.steps, "batch_size": 8, "lr": 0.002},
        "eval": {"splits": ["test"]},
    }


def plain_loop(config, federation) -> tuple[dict, list[float], float]:
    """FedAvg written as a bare loop: for each round, for each client, train, then average."""
    torch.set_num_threads(1)
    t_call = time.perf_counter()
    task = make_task(federation.task, config.train, federation.num_classes, 128)
    spec = shared_model_spec(config.model)
    build = lambda seed: build_model(spec, num_classes=1, seed=seed)  # noqa: E731
    global_w = get_weights(build(init_seed(config.run.seed, "global")))
    rounds = []
    for rnd in range(1, config.run.rounds + 1):
        t0 = time.perf_counter()
        updates, sizes = [], []
        for cid, client in enumerate(federation.clients):
            seed = job_seed(config.run.seed, rnd, cid, "fit")
            model = build(init_seed(config.run.seed, cid))
            load_weights(model, global_w)
            opt = torch.optim.Adam(model.parameters(), lr=config.train.lr,
                                   betas=tuple(config.train.betas))
            batches = task.batches(client.train, seed)
            model.train()
            for _ in range(config.train.local_steps):
                x, y = next(batches)
                loss = task.loss(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            updates.append(get_weights(model))
            sizes.append(client.num_train)
        global_w = weighted_mean(updates, sizes)
        rounds.append(time.perf_counter() - t0)
    return global_w, rounds, time.perf_counter() - t_call


def engine_run(config, federation, data_root, engine: str) -> tuple[dict, list[float], float]:
    from histofed.engine.loop import config_with

    config = config_with(config, engine=engine)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = new_run_dir(Path(tmp) / engine, engine)
        t_call = time.time()
        state = run_experiment(config, data_root=data_root, run_dir=run_dir,
                               federation=federation if engine == "inprocess" else None)
        timing = read_jsonl(run_dir / "timing.jsonl")
        rounds = [t["fit_seconds"] for t in timing]
        first_end = timing[0]["time"] - timing[0]["eval_seconds"] - timing[0]["checkpoint_seconds"]
        return state.arrays, rounds, first_end - t_call


def summarise(name, weights, rounds, first_round_end, reference) -> dict:
    steady = float(np.mean(rounds[1:])) if len(rounds) > 1 else rounds[0]
    diff = max(float(np.max(np.abs(weights[k] - reference[k]))) for k in reference) if reference else 0.0
    return {"engine": name, "s_per_round": steady, "startup_s": max(0.0, first_round_end - steady),
            "max_abs_weight_diff_vs_plain": diff, "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--skip-flower", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    root = data_root_from(args.data_root)
    fed_name = "nuclei-multisource" if root and (root / "nuclei").is_dir() else "synthetic-nuclei"
    config = config_from_dict(make_config(args, fed_name))
    federation = load_federation(config, root)
    n = len(federation.clients)
    print(f"{fed_name}: {n} clients, {args.rounds} rounds x {args.steps} steps", file=sys.stderr)

    ref_w, ref_rounds, ref_total = plain_loop(config, federation)
    rows = [summarise("plain PyTorch loop (1 thread, sequential)", ref_w, ref_rounds,
                      ref_total - sum(ref_rounds[1:]), None)]
    w, r, first = engine_run(config, federation, root, "inprocess")
    rows.append(summarise("histofed in-process engine", w, r, first, ref_w))
    if not args.skip_flower:
        try:
            w, r, first = engine_run(config, federation, root, "flower")
            rows.append(summarise("Flower simulation (same algorithm)", w, r, first, ref_w))
        except Exception as err:  # noqa: BLE001 - report, do not hide
            rows.append({"engine": "Flower simulation", "error": repr(err)})
    cores = len(os.sched_getaffinity(0))
    ideal = rows[0]["s_per_round"] / min(cores, n)
    lines = [
        "# Engine overhead (FedAvg)",
        "",
        f"{fed_name}, {n} clients, UNet 16-128, {args.rounds} rounds x {args.steps} steps, batch 8, "
        f"crop 128; {cores} cores; {platform.processor() or platform.machine()}; torch {torch.__version__}.",
        f"Ideal = plain loop / min(cores, clients) = {ideal:.2f} s/round.",
        "",
        "| engine | s/round | vs ideal | start-up (s) | max weight diff vs plain |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['engine']} | failed: {row['error']} | | | |")
            continue
        lines.append(f"| {row['engine']} | {row['s_per_round']:.2f} | {row['s_per_round'] / ideal:.2f}x | "
                     f"{row['startup_s']:.1f} | {row['max_abs_weight_diff_vs_plain']:.2e} |")
    lines += ["", f"Command: `python benchmarks/overhead.py {' '.join(sys.argv[1:])}`",
              f"Measured {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "overhead.md").write_text("\n".join(lines))
    (RESULTS / "overhead.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
