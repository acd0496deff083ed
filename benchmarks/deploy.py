"""Deployment overhead: the same experiment in-process and on a real Flower deployment.

One script run measures, on this machine and at the same time of day:

1. histofed's in-process engine;
2. a Flower deployment on 127.0.0.1 started by ``histofed.engine.deploy``: SuperLink with TLS
   and SuperNode authentication, one SuperNode per site with its long-lived ClientApp worker
   (``--isolation process``), the run submitted with ``flwr run``;
3. optionally (``--baseline``) the same deployment with Flower's default ``--isolation
   subprocess`` (a fresh ``flwr-clientapp`` process per message);
4. optionally (``--unpatched``) the deployment of 2. with Flower's own fixed waits
   (``HISTOFED_FLOWER_PATCHES=0``, see histofed/flower_patches.py);
5. optionally (``--in-memory``) the deployment of 2. with the SuperLink's state in memory
   (``histofed deploy superlink --in-memory``) instead of its SQLite database.

The experiment is the 3-site synthetic demo of histofed/flower_app (its ``histofed-config``).
Per-round time is the wall time between the ends of consecutive rounds (``timing.jsonl``),
mean over rounds 2..N (round 1 includes first-use costs); overhead = deployment minus
in-process, as a difference and a ratio. Start-up (SuperLink, registrations, SuperNodes) is
reported separately. The final weights of each deployment are compared with in-process.
Writes benchmarks/results/deploy.md (and .json); deploy.md's hand-kept history (from "## What
changed" on) is kept.

    python benchmarks/deploy.py                 # 4 rounds
    python benchmarks/deploy.py --baseline      # also Flower's default isolation (slow)
    python benchmarks/deploy.py --unpatched     # also without histofed's shorter Flower waits
    python benchmarks/deploy.py --in-memory     # also with the SuperLink's state in memory
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

from histofed.config import config_from_dict, dump_toml
from histofed.engine import deploy, deploy_procs, run_experiment
from histofed.engine.deploy_security import make_certs, make_node_key
from histofed.engine.rundir import new_run_dir, read_jsonl

RESULTS = Path(__file__).resolve().parent / "results"
HISTORY = "## What changed"  # deploy.md from this heading on is kept as it is


def demo_config(rounds: int):
    app = tomllib.loads((deploy.APP_DIR / "pyproject.toml").read_text())
    raw = tomllib.loads(app["tool"]["flwr"]["app"]["config"]["histofed-config"])
    raw["run"]["rounds"] = rounds
    return config_from_dict(raw, source="histofed/flower_app histofed-config")


def per_round(run_dir: Path) -> list[float]:
    ends = [t["time"] for t in read_jsonl(run_dir / "timing.jsonl")]
    return list(np.diff(ends))  # rounds 2..N: end of round k minus end of round k-1


def weights(run_dir: Path) -> dict:
    with np.load(run_dir / "final" / "global.npz") as z:
        return {k: z[k] for k in z.files}


def max_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def deployment(config, tmp: Path, isolation: str, patched: bool = True,
               persist: bool = True) -> dict:
    tag = isolation + ("" if patched else "-unpatched") + ("" if persist else "-in-memory")
    state, sites = tmp / f"state-{tag}", [f"synthetic-{i}" for i in range(3)]
    make_certs(tmp / "certs", overwrite=True)
    t0 = time.time()
    os.environ["HISTOFED_FLOWER_PATCHES"] = "1" if patched else "0"  # inherited by every child
    try:
        port = deploy_procs.free_port()
        deploy.start_superlink(state, certs=tmp / "certs", port=port, persist=persist,
                               timeout=600)
        for site in sites:
            _, pub = make_node_key(tmp / f"keys-{tag}", site)
            deploy.register(state, pub, site=site)
        for site in sites:
            deploy.start_supernode(
                state, site=site, superlink=f"127.0.0.1:{port}", ca=tmp / "certs" / "ca.crt",
                key=tmp / f"keys-{tag}" / f"{site}.key", isolation=isolation,
                runtime_port=deploy_procs.free_port(), timeout=600)
        startup = time.time() - t0
        exp = tmp / "exp.toml"
        exp.write_text(dump_toml(config.to_dict()))
        out = tmp / f"run-{tag}"
        t1 = time.time()
        deploy.run(state, exp, out, round_timeout=1800.0)
        return {"run_dir": out, "startup_s": startup, "run_s": time.time() - t1}
    finally:
        deploy_procs.stop_all(state)
        os.environ.pop("HISTOFED_FLOWER_PATCHES", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--baseline", action="store_true",
                        help="also measure Flower's default isolation (a process per message)")
    parser.add_argument("--unpatched", action="store_true",
                        help="also measure the deployment with Flower's own fixed waits")
    parser.add_argument("--in-memory", action="store_true",
                        help="also measure the deployment with the SuperLink's state in memory")
    args = parser.parse_args()
    config = demo_config(args.rounds)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ref = new_run_dir(tmp / "inprocess", "inprocess")
        t0 = time.time()
        run_experiment(config, data_root=None, run_dir=ref)
        ref_rounds = per_round(ref)
        rows.append({"engine": "in-process", "s_per_round": float(np.mean(ref_rounds)),
                     "rounds_s": ref_rounds, "startup_s": 0.0, "run_s": time.time() - t0,
                     "max_weight_diff": 0.0})
        variants = [("process", True, True)] + [("process", False, True)] * args.unpatched \
            + [("process", True, False)] * args.in_memory + [("subprocess", True, True)] * args.baseline
        for isolation, patched, persist in variants:
            got = deployment(config, tmp, isolation, patched, persist)
            rounds = per_round(got["run_dir"])
            name = ("deployment, TLS + node auth, long-lived ClientApp (--isolation process)"
                    if isolation == "process" else
                    "deployment, TLS + node auth, Flower default (process per message)")
            name += ", shorter Flower waits" if patched else ", Flower's own waits"
            name += "" if persist else ", SuperLink state in memory (--in-memory)"
            rows.append({"engine": name, "s_per_round": float(np.mean(rounds)),
                         "rounds_s": rounds, "startup_s": got["startup_s"], "run_s": got["run_s"],
                         "max_weight_diff": max_diff(weights(got["run_dir"]), weights(ref))})
    base = rows[0]["s_per_round"]
    load = os.getloadavg()
    lines = [
        "# Deployment overhead per round (Flower 1.42, localhost)",
        "",
        f"The 3-site synthetic demo of histofed/flower_app (UNet 8-16-32, 5 local steps, batch 4, "
        f"eval every round), {args.rounds} rounds; s/round = mean wall time of rounds 2..{args.rounds}. "
        f"Machine: {len(os.sched_getaffinity(0))} cores shared with other users "
        f"(load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end), so absolute "
        "times vary from run to run; all rows come from one script run.",
        "",
        "| engine | s/round | overhead vs in-process (s) | ratio | start-up (s) | max weight diff |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['engine']} | {row['s_per_round']:.2f} | "
                     f"{row['s_per_round'] - base:+.2f} | {row['s_per_round'] / base:.1f}x | "
                     f"{row['startup_s']:.1f} | {row['max_weight_diff']:.1e} |")
    lines += ["", "Per-round times (s): " + "; ".join(
        f"{r['engine'].split(',')[0] if r['engine'] == 'in-process' else r['engine']}: "
        + ", ".join(f"{x:.1f}" for x in r["rounds_s"]) for r in rows),
        "", f"Command: `python benchmarks/deploy.py {' '.join(sys.argv[1:])}`",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    old = (RESULTS / "deploy.md").read_text() if (RESULTS / "deploy.md").exists() else ""
    if HISTORY in old:  # the hand-kept history of changes and analysis stays below the table
        lines.append(old[old.index(HISTORY):])
    (RESULTS / "deploy.md").write_text("\n".join(lines))
    (RESULTS / "deploy.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
