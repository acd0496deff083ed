"""How far one machine goes: FedAvg with 10, 50 and 100 clients on the synthetic federation,
on histofed's in-process engine and on Flower's simulation engine.

Each (engine, clients) point runs in its own child process (so one point's memory cannot
inflate the next); this script samples the child's whole process tree (workers, Ray's actors
and daemons) every 0.2 s and keeps the peak of the summed resident memory (RSS). Time per
round is the mean training time of rounds 2..N from the run's timing.jsonl (round 1 carries
start-up); start-up is the wall time from launch to the end of round 1 minus one steady round.
The reference in the same run is the smallest point of each engine: "s / client-round"
shows whether cost grows linearly with the number of clients.

Writes benchmarks/results/scale.md and scale.json. Finished points are kept in the JSON and
reused (``--redo`` runs them again), so an interrupted benchmark continues.

    python benchmarks/scale.py                        # 10, 50, 100 clients, both engines
    python benchmarks/scale.py --clients 10 50 --engines inprocess
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30


def point_config(clients: int, rounds: int, engine: str, workers: int) -> dict:
    """A small, fixed per-client workload, so that the cost of more clients is what grows."""
    return {
        "run": {"name": f"scale-{engine}-{clients}", "seed": 0, "rounds": rounds,
                "workers": workers, "engine": engine, "eval_every": rounds, "keep_checkpoints": 1},
        "federation": {"name": "synthetic-nuclei", "num_clients": clients, "images_per_client": 2,
                       "size": 64, "crop_size": 32, "crops_per_image": 4},
        "model": {"name": "unet", "channels": [8, 16, 32], "num_res_units": 0},
        "algorithm": {"name": "fedavg"},
        "train": {"local_steps": 5, "batch_size": 4, "lr": 0.002},
        "eval": {"splits": ["test"]},
    }


def run_point(config: dict, run_dir: Path) -> None:
    """The child process: one run; prints a JSON line with its timings."""
    from histofed.config import config_from_dict
    from histofed.engine import run_experiment
    from histofed.engine.rundir import new_run_dir, read_jsonl

    t0 = time.time()
    out = new_run_dir(run_dir, config["run"]["name"])
    run_experiment(config_from_dict(config, source="scale"), data_root=None, run_dir=out)
    timing = read_jsonl(out / "timing.jsonl")
    fit = [t["fit_seconds"] for t in timing]
    steady = float(np.mean(fit[1:])) if len(fit) > 1 else fit[0]
    first_end = timing[0]["time"] - timing[0]["eval_seconds"] - timing[0]["checkpoint_seconds"]
    print(json.dumps({"s_per_round": steady, "startup_s": max(0.0, first_end - t0 - steady),
                      "eval_s": float(sum(t["eval_seconds"] for t in timing)), "fit": fit}))


# Linux only: reading /proc here is a few lines; psutil would be a new dependency for one
# benchmark. Hand-written for that reason.
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return kids


def tree_rss(pid: int) -> int:
    """Summed resident memory (bytes) of ``pid`` and all its descendants."""
    kids, todo, total = _children(), [pid], 0
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def measure(engine: str, clients: int, args) -> dict:
    config = point_config(clients, args.rounds, engine, args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--child", json.dumps(config), "--child-dir", tmp]
        t0 = time.time()
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
        peak = 0
        while child.poll() is None:
            peak = max(peak, tree_rss(child.pid))
            time.sleep(0.2)
        out, err = child.communicate()
    if child.returncode != 0:
        return {"engine": engine, "clients": clients, "error": err.strip().splitlines()[-1:]}
    result = json.loads(out.strip().splitlines()[-1])
    return {"engine": engine, "clients": clients, "wall_s": time.time() - t0,
            "peak_rss_gib": peak / GIB, **result}


def write_report(points: list[dict], args) -> None:
    label = {"inprocess": "histofed in-process", "flower": "Flower simulation"}
    ref: dict[str, dict] = {}  # each engine's smallest finished point
    for p in points:
        if "error" not in p and (p["engine"] not in ref or p["clients"] < ref[p["engine"]]["clients"]):
            ref[p["engine"]] = p
    lines = [
        "# Scale on one machine (FedAvg, synthetic federation)",
        "",
        f"Per client: 2 tiles of 64 px, 5 local steps of batch 4 on 32 px crops, UNet [8, 16, 32];"
        f" {args.rounds} rounds, evaluation once at the end; `workers = {args.workers}`"
        f" (in-process worker processes / Ray actors). Machine: {os.cpu_count()} cores,"
        f" {_mem_gib():.0f} GiB, {platform.machine()}; other jobs may have shared it (the ratios"
        " within one engine are the robust part).",
        "",
        "| engine | clients | s / round | s / client-round | vs fewest clients | start-up (s) |"
        " final eval (s) | peak RSS (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        if "error" in p:
            lines.append(f"| {label[p['engine']]} | {p['clients']} | failed: {p['error']} |"
                         " | | | | |")
            continue
        per = p["s_per_round"] / p["clients"]
        base = ref.get(p["engine"])
        vs = per / (base["s_per_round"] / base["clients"]) if base else float("nan")
        lines.append(f"| {label[p['engine']]} | {p['clients']} | {p['s_per_round']:.2f} |"
                     f" {per:.3f} | {vs:.2f}x | {p['startup_s']:.1f} | {p['eval_s']:.1f} |"
                     f" {p['peak_rss_gib']:.2f} |")
    lines += ["", "\"vs fewest clients\": time per client-round relative to the same engine's"
              " smallest point (1.00x = cost grows linearly with the clients). Each point's"
              " measurement time is in scale.json (`measured`).",
              "", f"Command: `python benchmarks/scale.py {' '.join(sys.argv[1:])}`".rstrip(),
              f"Measured {time.strftime('%Y-%m-%d %H:%M')}."]
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")


def _mem_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--engines", nargs="+", default=["inprocess", "flower"],
                        choices=["inprocess", "flower"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--redo", action="store_true",
                        help="run the asked-for points again (others are kept)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_point(json.loads(args.child), Path(args.child_dir))
    store = RESULTS / "scale.json"
    done = {(p["engine"], p["clients"]): p for p in
            (json.loads(store.read_text())["points"] if store.exists() else [])
            if "error" not in p and p.get("rounds") == args.rounds}
    if args.redo:  # only the points asked for; the others stay in the JSON
        done = {k: v for k, v in done.items()
                if not (k[0] in args.engines and k[1] in args.clients)}
    for engine in args.engines:
        for clients in args.clients:
            if (engine, clients) not in done:
                print(f"{engine}, {clients} clients ...", file=sys.stderr, flush=True)
                done[(engine, clients)] = {**measure(engine, clients, args), "rounds": args.rounds,
                                           "measured": time.strftime("%Y-%m-%d %H:%M"),
                                           "load": os.getloadavg()[0]}
                store.write_text(json.dumps({"points": list(done.values())}, indent=1))
    points = sorted(done.values(), key=lambda p: (p["engine"] != "inprocess", p["clients"]))
    write_report(points, args)
    print((RESULTS / "scale.md").read_text())


if __name__ == "__main__":
    main()
