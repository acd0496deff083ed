"""Run report: ``report.html`` with PNG plots and a Markdown ``summary.md``, from a run directory.

Reads only what the engine writes there: ``config.toml``, ``metrics.jsonl``, ``egress.jsonl``
and, when present, ``privacy.jsonl`` and ``run.json``. Conventions:

- A metric line without ``"model"`` is the global model. A later line for the same
  (round, client, split, model) wins, since a resumed run re-evaluates that round.
- The mean over clients is the engine's ``"__mean__"`` line where there is one, otherwise the
  unweighted mean over the clients that reported that round (NaN values, such as the AUC of a
  single-class client, are left out). Standard deviations are over clients, ``ddof=0``.
- "Final" means the last round with a test evaluation. 1 MB = 10^6 bytes.

Example:
    >>> html, md = write_report(Path("runs/fedavg-2024"))  # doctest: +SKIP
    >>> print(compare_runs([Path("runs/a"), Path("runs/b")], Path("runs/compare.md")))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from histofed.jsonl import iter_jsonl
from histofed.report_plots import (
    Block,
    egress_plot,
    lines_plot,
    render_html,
    render_markdown,
    write_text,
)

MEAN_CLIENT = "__mean__"
MAIN_METRICS = ("dice", "jaccard", "pixel_acc", "aji", "pq", "f1",
                "accuracy", "balanced_accuracy", "auc")
MB = 1e6
PRIVACY_NOTE = (
    "Epsilon is the accountant's upper bound on privacy loss under its assumptions. An empirical "
    "attack failing (for example a gradient-inversion audit that recovers no image) is not a "
    "guarantee: it only shows that this attack did not succeed."
)


@dataclass
class Run:
    """Everything read from one run directory."""

    path: Path
    info: dict[str, Any]
    config: str | None
    metrics: list[dict[str, Any]]  # evaluation/training lines (have "split")
    events: list[dict[str, Any]]  # lines with "event"
    egress: list[dict[str, Any]] | None  # None when egress.jsonl is absent
    privacy: list[dict[str, Any]] | None
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return str(self.info.get("algorithm") or self.path.name)


def _read_jsonl(path: Path, required: tuple[str, ...], notes: list[str]) -> list[dict] | None:
    """Parse one JSON object per line (rundir.iter_jsonl: a torn last line is skipped)."""
    if not path.exists():
        return None
    out = []
    for i, obj in iter_jsonl(path, notes):
        missing = [k for k in required if k not in obj] if isinstance(obj, dict) else required
        if path.name == "metrics.jsonl" and not missing and not ("split" in obj or "event" in obj):
            missing = ["split or event"]
        if missing:
            raise ValueError(f"{path}:{i}: expected a JSON object with keys {list(required)}, "
                             f"missing {list(missing)}; fix or delete that line")
        out.append(obj)
    return out


def load_run(run_dir: Path) -> Run:
    """Read a run directory. Raises FileNotFoundError if it is not a directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist; pass the run's folder")
    notes: list[str] = []
    info_path, config_path = run_dir / "run.json", run_dir / "config.toml"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
    except ValueError as err:
        raise ValueError(f"{info_path}: not valid JSON ({err}); fix or delete it") from err
    lines = _read_jsonl(run_dir / "metrics.jsonl", ("round", "client"), notes) or []
    rejected = _read_jsonl(run_dir / "rejected.jsonl", ("round", "client", "reason"), notes) or []
    lines += [{"round": r["round"], "client": r["client"], "event": "update_rejected",
               "message": r["reason"]} for r in rejected]  # the server's checks (docs/robustness.md)
    return Run(
        path=run_dir,
        info=info,
        config=config_path.read_text(encoding="utf-8") if config_path.exists() else None,
        metrics=[r for r in lines if "event" not in r],
        events=sorted((r for r in lines if "event" in r), key=lambda r: r.get("round", 0)),
        egress=_read_jsonl(run_dir / "egress.jsonl", ("round", "client", "direction", "bytes"), notes),
        privacy=_read_jsonl(run_dir / "privacy.jsonl", ("round", "epsilon"), notes),
        notes=notes,
    )


def series(records: list[dict], *, split: str, key: str, model: str = "global") -> dict:
    """client -> {round: value} for one split, metric and model; clients in first-seen order."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        if r.get("split") == split and r.get("model", "global") == model and key in r:
            value = float("nan") if r[key] is None else float(r[key])
            out.setdefault(str(r["client"]), {})[int(r["round"])] = value
    return out


def _nanstat(values: list[float], fn) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(fn(kept)) if kept else float("nan")


def split_mean(per_client: dict) -> tuple[dict, dict[int, float]]:
    """Separate real clients from the mean; the engine's ``__mean__`` wins where present."""
    clients = {c: s for c, s in per_client.items() if c != MEAN_CLIENT}
    engine = per_client.get(MEAN_CLIENT, {})
    rounds = sorted({r for s in per_client.values() for r in s})
    mean = {r: engine[r] if r in engine else
            _nanstat([s[r] for s in clients.values() if r in s], np.mean) for r in rounds}
    return clients, mean


def _models(records: list[dict], split: str) -> list[str]:
    found = {r.get("model", "global") for r in records if r.get("split") == split}
    return sorted(found, key=lambda m: (m != "global", m))


def _test_metrics(records: list[dict]) -> list[str]:
    return [m for m in MAIN_METRICS if any(r.get("split") == "test" and m in r for r in records)]


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else ("nan" if math.isnan(value) else f"{value:.{digits}f}")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _final_table(run: Run) -> list[Block]:
    """Per-client test metrics at the last evaluated round, with mean and std rows."""
    keys, models = _test_metrics(run.metrics), _models(run.metrics, "test")
    if not keys:
        return [("p", "No test metrics recorded yet (metrics.jsonl has no test evaluation).")]
    cols, names, captions = [], [], []
    for model in models:
        last = max(int(r["round"]) for r in run.metrics
                   if r.get("split") == "test" and r.get("model", "global") == model)
        captions.append(f"{model} models: round {last}")
        for key in keys:
            clients, mean = split_mean(series(run.metrics, split="test", key=key, model=model))
            at = {c: s[last] for c, s in clients.items() if last in s}
            cols.append((at, mean.get(last), _nanstat(list(at.values()), np.std)))
            names += [c for c in clients if c not in names]
    header = ["client"] + [k if len(models) == 1 else f"{k} ({m})" for m in models for k in keys]
    rows = [[c] + [_fmt(at.get(c)) for at, _, _ in cols] for c in names]
    rows.append(["mean"] + [_fmt(m) for _, m, _ in cols])
    rows.append(["std over clients"] + [_fmt(s) for _, _, s in cols])
    return [("p", "Test split at the last evaluated round (" + "; ".join(captions) + ")."),
            ("table", header, rows)]


def _curves(run: Run, plots: Path) -> list[Block]:
    blocks: list[Block] = []
    jobs = [("test", key, m) for m in _models(run.metrics, "test") for key in _test_metrics(run.metrics)]
    jobs += [("train", "loss", m) for m in _models(run.metrics, "train")
             if any(r.get("split") == "train" and "loss" in r for r in run.metrics)]
    for split, key, model in jobs:
        clients, mean = split_mean(series(run.metrics, split=split, key=key, model=model))
        if not mean:
            continue
        png = plots / f"{split}_{_safe(key)}_{_safe(model)}.png"
        title = f"{key}, {split} split" + ("" if split == "train" and model == "global"
                                           else f", {model} model")
        lines_plot(png, clients, mean=mean, title=title, ylabel=key)
        blocks.append(("img", f"plots/{png.name}", title))
    return blocks or [("p", "No per-round metrics to plot yet.")]


def _communication(run: Run, plots: Path) -> list[Block]:
    if run.egress is None:
        return [("p", "egress.jsonl not found: this run recorded no communication.")]
    if not run.egress:
        return [("p", "No bytes recorded yet.")]
    by_dir: dict[str, dict[str, dict[int, float]]] = {}
    totals: dict[str, dict[str, int]] = {}
    for r in run.egress:
        kind = by_dir.setdefault(r["direction"], {}).setdefault(str(r.get("kind", "unknown")), {})
        kind[int(r["round"])] = kind.get(int(r["round"]), 0) + int(r["bytes"])
        t = totals.setdefault(str(r["client"]), {})
        t[r["direction"]] = t.get(r["direction"], 0) + int(r["bytes"])
    egress_plot(plots / "egress.png", by_dir)
    rows = [[c, _fmt(t.get("up", 0) / MB, 3), _fmt(t.get("down", 0) / MB, 3)] for c, t in totals.items()]
    rows.append(["total"] + [_fmt(sum(t.get(d, 0) for t in totals.values()) / MB, 3)
                                  for d in ("up", "down")])
    return [("img", "plots/egress.png", "bytes per round, up and down, by kind"),
            ("p", "Total per client (1 MB = 10^6 bytes):"),
            ("table", ["client", "MB up", "MB down"], rows)]


def _privacy(run: Run, plots: Path) -> list[Block]:
    if not run.privacy:
        return [("p", PRIVACY_NOTE), ("p", "No privacy accounting recorded yet.")]
    curves: dict[str, dict[int, float]] = {}
    for r in run.privacy or []:
        who = f"{r['client']}: " if "client" in r else ""
        label = f"{who}{r.get('accountant', 'accountant')} (delta={r.get('delta', '?')})"
        curves.setdefault(label, {})[int(r["round"])] = float(r["epsilon"])
    lines_plot(plots / "privacy_epsilon.png", curves, title="Privacy budget spent (epsilon)",
               ylabel="epsilon", lw=2.0)
    rows = [[label, str(max(c)), _fmt(c[max(c)], 3)] for label, c in curves.items()]
    blocks: list[Block] = [("p", PRIVACY_NOTE)]
    last = run.privacy[-1]
    settings = [[key, str(last[key])] for key in _PRIVACY_SETTINGS if key in last]
    if settings:  # the mechanism and its parameters, as the last round logged them
        blocks.append(("table", ["setting", "value"], settings))
    return blocks + [("img", "plots/privacy_epsilon.png", "epsilon vs round"),
                     ("table", ["accountant", "last round", "epsilon"], rows)]


_PRIVACY_SETTINGS = ("mechanism", "level", "noise", "clip", "sigma", "q", "expected_clients",
                     "participants", "delta", "accountant", "epsilon_exact")


def _run_info(run: Run) -> list[Block]:
    blocks: list[Block] = [("p", note) for note in run.notes]
    if not run.info:
        return blocks + [("p", "run.json not found.")]
    rows = []
    for key, value in run.info.items():
        if key in ("started", "finished") and isinstance(value, int | float):
            value = datetime.fromtimestamp(value, timezone.utc).isoformat(timespec="seconds")
        elif key.startswith("wall_seconds") and isinstance(value, int | float):
            value = f"{value:.1f} s"
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        rows.append([key, str(value)])
    return [("table", ["field", "value"], rows)] + blocks


def _evaluation(run: Run) -> list[Block]:
    """The table ``histofed evaluate`` wrote (evaluate.csv) and its picture grids."""
    import csv

    with open(run.path / "evaluate.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    blocks: list[Block] = [
        ("p", "Scores of the run's final models on image/mask folders. AJI (Kumar 2017); PQ = "
              "DQ x SQ with pairs at IoU > 0.5 (Kirillov 2019, HoVer-Net); f1 = object F1 at IoU "
              "0.5. 'reference' says whether nuclei came from the masks' ids or from connected "
              "components of binary masks (touching nuclei merged)."),
        ("table", rows[0], rows[1:]) if rows else ("p", "evaluate.csv is empty.")]
    grids = sorted((run.path / "evaluate-grids").glob("*.png"))
    blocks += [("img", f"evaluate-grids/{g.name}",
                f"{g.stem.replace('__', ' on ')}: image | reference | prediction | errors "
                "(FP red, FN blue)") for g in grids]
    return blocks


def _sections(run: Run) -> list[tuple[str, list[Block]]]:
    plots = run.path / "plots"
    no_metrics = [("p", "No metrics recorded yet: metrics.jsonl is missing or empty.")]
    events = [[str(e.get("round", "")), str(e.get("client", "")), str(e["event"]),
               str(e.get("message", ""))] for e in run.events]
    sections = [
        ("Run", _run_info(run)),
        ("Final results", _final_table(run) if run.metrics else no_metrics),
        ("Metrics per round", _curves(run, plots) if run.metrics else no_metrics),
        ("Communication", _communication(run, plots)),
    ]
    if run.privacy is not None:
        sections.append(("Privacy", _privacy(run, plots)))
    if (run.path / "evaluate.csv").exists():
        sections.append(("Evaluation on image folders (histofed evaluate)", _evaluation(run)))
    sections.append(("Events", [("table", ["round", "client", "event", "message"], events)]
                     if events else [("p", "None.")]))
    sections.append(("Configuration", [("config", run.config)] if run.config is not None
                     else [("p", "config.toml not found.")]))
    return sections


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``summary.md`` (and ``plots/*.png``) into ``run_dir``.

    Returns:
        The paths of ``report.html`` and ``summary.md``.

    Raises:
        FileNotFoundError: if ``run_dir`` is not a directory.
        ValueError: on a malformed line in one of the jsonl files (names file and line).
    """
    run = load_run(run_dir)
    title = f"histofed run report: {run.info.get('name') or run.path.name}"
    sections = _sections(run)
    return (write_text(run.path / "report.html", render_html(title, sections)),
            write_text(run.path / "summary.md", render_markdown(title, sections)))


def unseen_scores(run: Run, metric: str, rnd: int | None) -> dict[str, float]:
    """On the held-out sites at round ``rnd``: the global model's mean score, and the best
    personal ("personal:<site>") model's mean score (keys "global", "best local")."""
    per_model: dict[str, list[float]] = {}
    for r in run.metrics:
        if r.get("split") == "unseen" and int(r["round"]) == rnd and metric in r:
            per_model.setdefault(str(r.get("model", "global")), []).append(float(r[metric]))
    out = {}
    if "global" in per_model:
        out["global"] = _nanstat(per_model["global"], np.mean)
    personal = [_nanstat(v, np.mean) for m, v in per_model.items() if m.startswith("personal:")]
    if personal:
        out["best local"] = max(personal)
    return out


def _pick_model(run: Run, model: str) -> str:
    if model != "auto":
        return model
    return "personal" if "personal" in _models(run.metrics, "test") else "global"


def compare_runs(run_dirs: list[Path], out: Path, metric: str = "dice", *, model: str = "auto") -> str:
    """Compare runs on one test metric; write Markdown to ``out`` and a PNG beside it.

    Args:
        run_dirs: run directories; each row is labelled with run.json's ``algorithm`` (or the
            directory name), made unique with the directory name when two runs share one.
        out: Markdown file to write; the plot goes to ``out.with_suffix(".png")``.
        metric: test metric key, e.g. "dice" or "balanced_accuracy".
        model: "global", "personal", or "auto" (personal models where a run has them, so that
            FedBN and local-only runs are scored on the models their clients would use).

    Returns:
        The Markdown text written to ``out``.

    Raises:
        ValueError: if no run directory is given or no run has ``metric`` on the test split.
    """
    runs = [load_run(Path(d)) for d in run_dirs]
    if not runs:
        raise ValueError("compare_runs needs at least one run directory")
    found = sorted({k for run in runs for k in _test_metrics(run.metrics)})
    if metric not in found:
        raise ValueError(f"no run has test metric {metric!r}; available: {found or 'none yet'}")
    labels = [r.label for r in runs]
    labels = [f"{lab} ({r.path.name})" if labels.count(lab) > 1 else lab for lab, r in zip(labels, runs)]
    rows, means, table = [], {}, []
    clients_all: list[str] = []
    has_unseen = any(r.get("split") == "unseen" for run in runs for r in run.metrics)
    for run, label in zip(runs, labels):
        used = _pick_model(run, model)
        clients, mean = split_mean(series(run.metrics, split="test", key=metric, model=used))
        last = max(mean, default=None)
        if run.info.get("selected_by") == "best-val" and run.info.get("selected_round") in mean:
            last = int(run.info["selected_round"])  # the models final/ holds (chosen on val)
        at = {c: s[last] for c, s in clients.items() if last in s}
        clients_all += [c for c in clients if c not in clients_all]
        up = None if run.egress is None else sum(
            int(r["bytes"]) for r in run.egress if r["direction"] == "up") / MB
        means[label] = mean
        unseen = unseen_scores(run, metric, last) if has_unseen else {}
        table.append((label, used, last, mean.get(last), _nanstat(list(at.values()), np.std), at,
                      up, unseen))
    for label, used, last, m, sd, at, up, unseen in table:
        rows.append([label, used, "—" if last is None else str(last), _fmt(m), _fmt(sd)]
                    + ([_fmt(unseen.get("global")), _fmt(unseen.get("best local"))]
                       if has_unseen else [])
                    + [_fmt(at.get(c)) for c in clients_all] + [_fmt(up, 2)])
    png = lines_plot(Path(out).with_suffix(".png"), means, lw=2.0, ylabel=f"mean test {metric}",
                     title=f"Mean test {metric} over clients")
    header = ["run", "model", "round", f"{metric} mean", "± std",
              *(["unseen", "best local on unseen"] if has_unseen else []), *clients_all, "MB up"]
    note = ("Mean and std (ddof=0) over clients' test splits at each run's reported round (the "
            "last, or the one chosen on validation with [eval].select = \"best-val\"); MB up = "
            "total bytes sent by clients / 10^6.")
    if has_unseen:
        note += (" unseen = the global model on the held-out hospitals ([federation].unseen, "
                 "every tile they hold; mean over them); best local on unseen = the best single "
                 "site's own model there (local-only, FedBN and other personal models).")
    text = render_markdown(f"Comparison: test {metric}", [("Runs", [
        ("p", note), ("table", header, rows), ("img", png.name, f"mean test {metric} vs round")])])
    write_text(Path(out), text)
    return text
