"""The run directory: everything a user needs to trust, compare and resume a run.

    runs/<date>-<time>-<name>/
      config.toml        resolved config (every default written out)
      run.json           name, algorithm, federation, engine, seed, timings
      metrics.jsonl      per round, per client, per split: loss, Dice/... or accuracy/...
      egress.jsonl       per round, per client: bytes up/down and their kind
      timing.jsonl       per round: seconds spent training, evaluating, checkpointing
      checkpoints/round-NNNN/   server.npz + server.json, clients/<name>.npz + .json, meta.json,
                                SHA256SUMS (written last; a resume checks it, see checkpoint_problem)
      final/             global.npz (and personal/<client>.npz where a method keeps them)
      report.html, summary.md, plots/
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from histofed.algorithms.base import Payload
from histofed.atomic import atomic_write_text
from histofed.jsonl import iter_jsonl


class RunDirError(RuntimeError):
    pass


CHECKSUMS = "SHA256SUMS"  # "<sha256>  <relative path>" per file; written last in a checkpoint
# What a run leaves before its first checkpoint (a new run may reuse such a directory).
_HEADER_FILES = {"config.toml", "run.json", "checkpoints", "tensorboard", "flower.json",
                 "node-state"}


def safe_stem(name: str) -> str:
    """``name`` itself when it is safe as one file name (a client/site name), else RunDirError.

    Federations refuse unsafe names when they are built; this is the last guard before a name
    becomes a path (``checkpoints/.../clients/<name>.npz``, ``final/personal/<name>.npz``).
    """
    from histofed.data.federation import site_name_problem

    problem = site_name_problem(name)
    if problem:
        raise RunDirError(f"client {problem}")
    return name


def new_run_dir(out: Path | None, name: str, root: Path = Path("runs")) -> Path:
    """Create a fresh run directory; never reuses or overwrites one that holds results.

    A directory left by a run that stopped before its first checkpoint (config.toml, run.json,
    logs of round 1 at most) and whose process is gone holds nothing to lose: it is emptied and
    reused, with a note. (It can also be continued with ``histofed run --resume``.)
    """
    if out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = root / f"{stamp}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}"
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(
            f"--out {out} is a file, not a folder; a run directory is a folder. Pick another "
            "--out (e.g. runs/my-run) or move the file away")
    if out.exists() and any(out.iterdir()):
        if not never_finished_a_round(out) or _owner_alive(out):
            raise RunDirError(
                f"{out} already exists and is not empty; a run never overwrites another. "
                f"Pick another --out, or continue it with `histofed run --resume {out}`")
        print(f"note: {out} holds a run that stopped before its first checkpoint; starting "
              "afresh in it", file=sys.stderr, flush=True)
        for p in list(out.iterdir()):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def never_finished_a_round(out: Path) -> bool:
    """True for a run directory holding only what a run writes before its first checkpoint."""
    entries = list(out.iterdir()) if out.is_dir() else []
    if not any(p.name in ("config.toml", "run.json") for p in entries):
        return False  # not a histofed run: never touch it
    if any(not (p.name.endswith(".jsonl") or p.name in _HEADER_FILES) for p in entries):
        return False
    return not any((out / "checkpoints").glob("round-*"))


def _owner_alive(out: Path) -> bool:
    """Whether the process that started the run in ``out`` still runs (run.json: pid, host).

    Unknown (no pid recorded, another machine, unreadable) counts as alive: never clear a
    directory another run may be writing to.
    """
    try:
        info = json.loads((out / "run.json").read_text())
        pid, host = int(info["pid"]), info["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return True
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, allow_nan=True) + "\n")
        f.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines log ([] if absent); see :func:`iter_jsonl`."""
    return [row for _, row in iter_jsonl(path)] if path.exists() else []


def truncate_jsonl(path: Path, last_round: int) -> None:
    """Drop lines of rounds after ``last_round`` (work a crash left after the checkpoint)."""
    if path.exists():
        keep = [r for r in read_jsonl(path) if r.get("round", 0) <= last_round]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


# ---- payload files ------------------------------------------------------------------------
def payload_file(path_stem: Path, suffix: str) -> Path:
    """``<stem><suffix>``; a stem may hold dots (site "st.a"), so never ``with_suffix``."""
    path_stem = Path(path_stem)
    return path_stem.with_name(path_stem.name + suffix)


def save_payload(path_stem: Path, payload: Payload) -> None:
    """``<stem>.npz`` (arrays) + ``<stem>.json`` (scalars, kind)."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    np.savez(payload_file(path_stem, ".npz"), **payload.arrays)
    payload_file(path_stem, ".json").write_text(
        json.dumps({"kind": payload.kind, "scalars": payload.scalars}))


def load_payload(path_stem: Path) -> Payload:
    """Read ``<stem>.npz`` + ``<stem>.json``.

    Raises:
        FileNotFoundError: either file is missing.
        RunDirError: either file is empty, truncated or not what histofed wrote (names it).
    """
    path = payload_file(path_stem, ".npz")
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        path = payload_file(path_stem, ".json")
        meta = json.loads(path.read_text())
        return Payload(arrays, meta["scalars"], meta["kind"])
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - BadZipFile, EOFError ("Aborted."), JSON, keys
        size = path.stat().st_size if path.exists() else 0
        raise RunDirError(
            f"{path} is truncated or damaged ({size} bytes; {type(err).__name__}: {err}). "
            "Restore it from a copy; a run can resume from its previous checkpoint") from None


# ---- checkpoints ----------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def clean_stale_temp(run_dir: Path) -> None:
    """Remove ``checkpoints/.tmp-*`` folders a killed run left half-written."""
    for tmp in (run_dir / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(run_dir: Path, rnd: int, server: Payload, clients: dict[str, Payload],
                    keep: int) -> Path:
    """Write checkpoint ``round-NNNN`` atomically (temp dir, checksums last, then rename);
    prune old ones."""
    root = run_dir / "checkpoints"
    root.mkdir(exist_ok=True)
    clean_stale_temp(run_dir)
    final = root / f"round-{rnd:04d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    save_payload(tmp / "server", server)
    for name, state in clients.items():
        save_payload(tmp / "clients" / safe_stem(name), state)
    (tmp / "meta.json").write_text(json.dumps({"round": rnd}))
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    for f in files:  # on disk before the rename, so a power cut cannot leave empty files
        with open(tmp / f, "rb") as fh:
            os.fsync(fh.fileno())
    (tmp / CHECKSUMS).write_text("".join(f"{_sha256(tmp / f)}  {f}\n" for f in files))
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


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why checkpoint ``ckpt`` cannot be resumed from (naming the bad file), or None if intact.

    Checks the SHA-256 of every file listed in SHA256SUMS, then loads everything (a checkpoint
    written before checksums existed is only loaded).
    """
    sums = ckpt / CHECKSUMS
    if sums.exists():
        for line in sums.read_text().splitlines():
            digest, _, rel = line.partition("  ")
            if not (ckpt / rel).is_file():
                return f"{ckpt / rel} is missing"
            if _sha256(ckpt / rel) != digest:
                size = (ckpt / rel).stat().st_size
                return (f"{ckpt / rel} is truncated or damaged ({size} bytes; its checksum differs "
                        f"from {CHECKSUMS})")
        listed = {line.partition("  ")[2] for line in sums.read_text().splitlines()}
        present = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
        if present - {CHECKSUMS} <= listed:
            return None  # every file is byte for byte what was written
    try:
        json.loads((ckpt / "meta.json").read_text())["round"]
    except Exception as err:  # noqa: BLE001 - missing, empty or without "round"
        return f"{ckpt / 'meta.json'} is unreadable ({type(err).__name__}: {err})"
    for npz in sorted(ckpt.rglob("*.npz")):
        try:
            load_payload(npz.with_suffix(""))  # reads every array (zip CRCs) and its .json
        except (RunDirError, FileNotFoundError) as err:
            return str(err).split(". Restore it")[0]
    return None


def set_aside(ckpt: Path) -> Path:
    """Move a damaged checkpoint out of the way (kept for inspection, never resumed from)."""
    dest = ckpt.with_name(f"damaged-{ckpt.name}")
    n = 1
    while dest.exists():
        n += 1
        dest = ckpt.with_name(f"damaged-{ckpt.name}-{n}")
    os.replace(ckpt, dest)
    return dest


def load_checkpoint(ckpt: Path) -> tuple[int, Payload, dict[str, Payload]]:
    rnd = json.loads((ckpt / "meta.json").read_text())["round"]
    clients = {p.name[:-4]: load_payload(p.with_name(p.name[:-4]))
               for p in sorted((ckpt / "clients").glob("*.npz"))} if (ckpt / "clients").exists() else {}
    return rnd, load_payload(ckpt / "server"), clients


def finished_with(run_dir: Path, config_toml: str) -> bool:
    """True when ``run_dir`` is a finished run whose config.toml means the same experiment as
    ``config_toml`` (benchmarks reuse such runs and redo any other). Both are parsed with
    today's defaults, so a table added to the config schema later (e.g. ``[server]`` with its
    defaults) does not throw away finished runs; a saved config that no longer parses does."""
    import tomllib

    from histofed.config import ConfigError, config_from_dict

    info, saved = Path(run_dir) / "run.json", Path(run_dir) / "config.toml"
    if not (info.exists() and "finished" in json.loads(info.read_text()) and saved.exists()):
        return False
    try:
        return (config_from_dict(tomllib.loads(saved.read_text())).to_dict()
                == config_from_dict(tomllib.loads(config_toml)).to_dict())
    except (ConfigError, tomllib.TOMLDecodeError):
        return False
