"""Model selection on validation: ``[eval].select = "best-val"`` keeps the server state (and
client states, where the engine holds them) of the round whose mean validation score was best,
in ``checkpoints/best/``, and the run's ``final/`` models come from it. The test split is
never looked at; ties keep the earlier round.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from histofed.algorithms.base import Payload
from histofed.atomic import atomic_write_text
from histofed.engine import rundir


class BestSnapshot:
    """The best round so far, on disk (survives a crash and is used by ``--resume``)."""

    def __init__(self, run_dir: Path, *, higher_is_better: bool = True) -> None:
        self.dir = Path(run_dir) / "checkpoints" / "best"
        self.tmp, self.old = self.dir.with_name(".tmp-best"), self.dir.with_name(".old-best")
        self.higher = higher_is_better
        self._recover()
        meta = self.dir / "meta.json"
        info = json.loads(meta.read_text()) if meta.is_file() else {}
        self.round: int | None = info.get("round")
        self.score: float | None = info.get("score")

    def offer(self, rnd: int, score: float, server: Payload, clients: dict[str, Payload]) -> bool:
        """Keep this round if its score beats the best so far (NaN never does)."""
        if not math.isfinite(score):
            return False
        if self.score is not None and not (score > self.score if self.higher else score < self.score):
            return False
        shutil.rmtree(self.tmp, ignore_errors=True)
        rundir.save_payload(self.tmp / "server", server)
        for name, state in clients.items():
            rundir.save_payload(self.tmp / "clients" / name, state)
        atomic_write_text(self.tmp / "meta.json", json.dumps({"round": rnd, "score": score}))
        # two renames, never a moment without a complete snapshot on disk: a crash between
        # them leaves .old-best (or the complete .tmp-best), which _recover() puts back
        shutil.rmtree(self.old, ignore_errors=True)
        if self.dir.exists():
            self.dir.rename(self.old)
        self.tmp.rename(self.dir)
        shutil.rmtree(self.old, ignore_errors=True)
        self.round, self.score = rnd, score
        return True

    def _recover(self) -> None:
        """Finish or undo a swap a crash interrupted (see :meth:`offer`)."""
        if not self.dir.exists():
            if (self.tmp / "meta.json").is_file():  # meta.json is written last: tmp is complete
                self.tmp.rename(self.dir)
            elif self.old.exists():
                self.old.rename(self.dir)
        shutil.rmtree(self.tmp, ignore_errors=True)
        shutil.rmtree(self.old, ignore_errors=True)

    def forget_after(self, done: int) -> None:
        """On resume from round ``done``: a snapshot from a later (re-run) round is dropped."""
        if self.round is not None and self.round > done:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.round = self.score = None

    def load(self) -> tuple[int, Payload, dict[str, Payload]]:
        assert self.round is not None
        clients = {p.name[:-4]: rundir.load_payload(p.with_name(p.name[:-4]))
                   for p in sorted((self.dir / "clients").glob("*.npz"))} \
            if (self.dir / "clients").exists() else {}
        return self.round, rundir.load_payload(self.dir / "server"), clients
