"""The run directory: everything a user needs to trust, compare and resume a run.

    runs/<date>-<time>-<name>/
      config.toml        resolved config (every default written out)
      run.json           name, algorithm, federation, engine, seed, timings
      metrics.jsonl      per round, per client, per split: loss, Dice/... or accuracy/...
      egress.jsonl       per round, per client: bytes up/down and their kind
      timing.jsonl       per round: seconds spent training, evaluating, checkpointing
      checkpoints/round-NNNN/   server.npz + server.json, clients/<name>.npz + .json
      final/             global.npz (and personal/<client>.npz where a method keeps them)
      report.html, summary.md, plots/
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from histofed.algorithms.base import Payload
from histofed.atomic import atomic_write_text


class RunDirError(RuntimeError):
    pass


def new_run_dir(out: Path | None, name: str, root: Path = Path("runs")) -> Path:
    """Create a fresh run directory; never reuses or overwrites an existing one."""
    if out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = root / f"{stamp}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}"
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RunDirError(
            f"{out} already exists and is not empty; a run never overwrites another. "
            f"Pick another --out, or continue it with `histofed run --resume {out}`"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out




def append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, allow_nan=True) + "\n")
        f.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_jsonl(path: Path, last_round: int) -> None:
    """Drop lines of rounds after ``last_round`` (work a crash left after the checkpoint)."""
    if path.exists():
        keep = [r for r in read_jsonl(path) if r.get("round", 0) <= last_round]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


# ---- payload files ------------------------------------------------------------------------
def save_payload(path_stem: Path, payload: Payload) -> None:
    """``<stem>.npz`` (arrays) + ``<stem>.json`` (scalars, kind)."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path_stem.with_suffix(".npz"), **payload.arrays)
    path_stem.with_suffix(".json").write_text(
        json.dumps({"kind": payload.kind, "scalars": payload.scalars}))


def load_payload(path_stem: Path) -> Payload:
    with np.load(path_stem.with_suffix(".npz")) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(path_stem.with_suffix(".json").read_text())
    return Payload(arrays, meta["scalars"], meta["kind"])


# ---- checkpoints ----------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, rnd: int, server: Payload, clients: dict[str, Payload],
                    keep: int) -> Path:
    """Write checkpoint ``round-NNNN`` atomically (temp dir, then rename); prune old ones."""
    root = run_dir / "checkpoints"
    root.mkdir(exist_ok=True)
    final = root / f"round-{rnd:04d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    save_payload(tmp / "server", server)
    for name, state in clients.items():
        save_payload(tmp / "clients" / name, state)
    (tmp / "meta.json").write_text(json.dumps({"round": rnd}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.glob("round-*") if (p / "meta.json").exists())


def load_checkpoint(ckpt: Path) -> tuple[int, Payload, dict[str, Payload]]:
    rnd = json.loads((ckpt / "meta.json").read_text())["round"]
    clients = {p.stem: load_payload(p.with_suffix(""))
               for p in sorted((ckpt / "clients").glob("*.npz"))} if (ckpt / "clients").exists() else {}
    return rnd, load_payload(ckpt / "server"), clients
