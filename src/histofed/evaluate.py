"""`histofed evaluate`: a run's final models on any image/mask folder (new hospitals, new organs),
with pixel scores (Dice) and nucleus instance scores (AJI, PQ), and a picture grid per folder.

Also home of :func:`load_run_model`, the one place a run's model is rebuilt from config.toml and
final/*.npz (``histofed predict`` uses it too)."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np

from histofed.algorithms.weights import load_weights
from histofed.config import load_config
from histofed.engine.rundir import atomic_write_text, load_payload
from histofed.instances import (
    InstanceOptions,
    image_instance_scores,
    label_instances,
    mean_scores,
    reference_instances,
    reference_kind,
)
from histofed.metrics import segmentation_metrics
from histofed.models import build_model
from histofed.overlays import render_grid
from histofed.tasks import make_task


def run_task(run_dir: Path, config) -> str:
    """The task of a run: run.json's "task", else the registered federation's."""
    info = Path(run_dir) / "run.json"
    if info.exists():
        task = json.loads(info.read_text(encoding="utf-8")).get("task")
        if task:
            return str(task)
    import histofed.data.registry  # noqa: F401  (registers the built-in federations)
    from histofed.data.federation import FEDERATIONS

    return FEDERATIONS.get(config.federation.name).task


def load_run_model(run_dir: Path, which: str = "global", *, task: str = "segmentation"):
    """A finished run's config, task and model with final weights loaded.

    Args:
        run_dir: the run directory (config.toml, run.json, final/*.npz).
        which: "global" or "personal:<client>" (see :func:`final_models`).
        task: the task the caller needs: "segmentation" (predict, evaluate) or "mil" (slide
            heatmaps). A MIL model is rebuilt from its roster entry in run.json (per-client
            architectures and the data-given ``in_dim`` included).

    Returns:
        ``(config, task, model)`` with the model in eval mode.

    Raises:
        FileNotFoundError: no config.toml or no final weights.
        ValueError: the run trained another task, or ``which`` is not one of its models.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").exists():
        raise FileNotFoundError(f"{run_dir} has no config.toml: pass a run directory made by "
                                "`histofed run`")
    config = load_config(run_dir / "config.toml")
    kind = run_task(run_dir, config)
    if kind != task:
        needs = {"segmentation": "nucleus masks, AJI/PQ and predictions need a segmentation run, "
                                 "e.g. one made with configs/fedavg-nuclei.toml",
                 "mil": "attention heatmaps need a MIL run on slide bags, e.g. one made with "
                        "configs/fedwsidd-ucsb.toml or federation slides-bags"}
        raise ValueError(f"run {run_dir} trained a {kind} model (federation "
                         f"{config.federation.name!r}); {needs.get(task, task + ' is needed')}")
    models = final_models(run_dir)
    if which not in models:
        raise ValueError(f"run {run_dir} has no {which!r} model; it has: {', '.join(models)}")
    if task == "segmentation":
        crop = int(config.federation.options.get("crop_size", 128))
        task_obj = make_task("segmentation", config.train, 1, crop)
        model = build_model(config.model, num_classes=1)
    else:
        entry = _roster_entry(run_dir, which)
        task_obj = make_task(task, config.train, int(entry["num_classes"]), 0)
        model = build_model(dict(entry["model"]), num_classes=int(entry["num_classes"]))
    load_weights(model, load_payload(models[which]).arrays)
    return config, task_obj, model.eval()


def _roster_entry(run_dir: Path, which: str) -> dict:
    """run.json's roster entry of ``personal:<client>``, or of the first client for "global"
    (a global model exists only when every site shares its architecture)."""
    info_path = run_dir / "run.json"
    roster = json.loads(info_path.read_text()).get("roster") if info_path.exists() else None
    if not roster:
        raise FileNotFoundError(f"{info_path} has no roster (a run from an older histofed?): "
                                "the model's architecture and input size are unknown")
    if which == "global":
        return roster[0]
    name = which.split(":", 1)[1]
    for entry in roster:
        if entry["name"] == name:
            return entry
    raise ValueError(f"{info_path}: no client {name!r} in the roster "
                     f"({', '.join(e['name'] for e in roster)})")


def final_models(run_dir: Path) -> dict[str, Path]:
    """{"global": stem, "personal:<client>": stem} for the weights a run saved in final/."""
    final = run_dir / "final"
    models = {}
    if (final / "global.npz").exists():
        models["global"] = final / "global"
    for p in sorted((final / "personal").glob("*.npz")) if (final / "personal").exists() else []:
        models[f"personal:{p.stem}"] = p.with_suffix("")
    if not models:
        raise FileNotFoundError(f"{run_dir}/final holds no weights: is the run finished? "
                                f"(continue it with `histofed run --resume {run_dir}`)")
    return models




def evaluate_run(
    run_dir: Path,
    data_dirs: list[Path],
    out: Path | None = None,
    *,
    clients: bool = False,
    data_root: Path | None = None,
    options: InstanceOptions = InstanceOptions(),
    grid_images: int = 4,
    progress: bool = True,
) -> str:
    """Evaluate every final model of a segmentation run on each image/mask folder.

    Scores per folder: loss, Dice, Jaccard, pixel accuracy and the nucleus instance scores AJI,
    PQ, SQ, F1 (:mod:`histofed.instances`), plus which reference instances were used (the
    masks' own ids, or connected components of binary masks) and the nuclei counted.

    Writes ``out.md`` and ``out.csv`` (default ``RUN/evaluate``) and, per model and folder, a
    grid PNG in ``out-grids/`` (image | reference | prediction | error map for the first
    ``grid_images`` images). The grids show the folder's pixels: keep them where the data may
    be (this command runs where the data is, never on a federation server).

    Args:
        run_dir: a finished segmentation run.
        data_dirs: folders with images/ and masks/ (see :mod:`histofed.data.formats`).
        out: stem of the table files.
        clients: also evaluate on the test split of each of the run's own clients (the
            federation rebuilt from config.toml; a simulation's data is on this machine), one
            row and one grid per client.
        data_root: the real data for ``clients`` (default: $HISTOFED_DATA, then the run's
            recorded data_root).
        options: how predicted pixels become nuclei.
        grid_images: images per grid (0 = no grids).
        progress: show a tqdm bar.

    Returns:
        The Markdown table.

    Raises:
        DataFormatError: a folder is missing files or has unreadable/mismatched ones.
        ValueError: the run is not a segmentation run.
    """
    from tqdm.auto import tqdm

    from histofed.data.formats import read_source
    from histofed.predict import Predictor

    run_dir = Path(run_dir)
    sources = [read_source(Path(d)) for d in data_dirs]  # bad data fails before any work
    if clients:
        sources = client_test_sets(run_dir, data_root) + sources
    if not sources:
        raise ValueError("nothing to evaluate: pass --data DIR (repeatable) and/or --clients")
    out = Path(out) if out else run_dir / "evaluate"
    grids = out.with_name(out.name + "-grids")
    rows = []
    for which in final_models(run_dir):
        predictor = Predictor(run_dir, which)
        for src in sources:
            probs, per_image = [], []
            for img, mask in tqdm(list(zip(src.images, src.masks)), unit="image",
                                  desc=f"{which} on {src.name}", disable=not progress):
                prob = predictor.probabilities(img)  # H x W
                binary = prob >= predictor.config.eval.threshold
                probs.append(_bce(prob, mask > 0))
                per_image.append((binary, image_instance_scores(binary, mask, options)))
            binaries = [b for b, _ in per_image]
            inst = mean_scores([s for _, s in per_image])
            seg = segmentation_metrics(binaries, [m > 0 for m in src.masks])
            rows.append({"model": which, "data": src.name, "images": len(src.images),
                         "reference": reference_kind(inst["ref_instance_ids"]),
                         "loss": round(float(np.mean(probs)), 4),
                         **{k: round(v, 4) for k, v in seg.items()},
                         **{k: round(inst[k], 4) for k in ("aji", "pq", "sq", "f1")},
                         "nuclei_ref": int(inst["nuclei_ref"]),
                         "nuclei_pred": int(inst["nuclei_pred"])})
            if grid_images > 0:
                _grid(grids / f"{_safe(which)}__{_safe(src.name)}.png", src, per_image,
                      options, grid_images, title=f"{src.name}: {which} model (AJI "
                      f"{inst['aji']:.3f}, PQ {inst['pq']:.3f}; reference: {rows[-1]['reference']})")
    keys = list(rows[0])
    md = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    md += "".join("| " + " | ".join(str(r[k]) for k in keys) + " |\n" for r in rows)
    md += ("\nAJI: Kumar et al. 2017. PQ = DQ x SQ: Kirillov et al. 2019, pairs at IoU > 0.5 "
           "(HoVer-Net). f1 = object F1 at IoU 0.5 (= DQ). Means over images. Predicted nuclei: "
           f"{options.split}, min area {options.min_area} px.\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out.with_suffix(".csv"), buf.getvalue())
    atomic_write_text(out.with_suffix(".md"), md)
    return md


def client_test_sets(run_dir: Path, data_root: Path | None = None) -> list:
    """The test split of each client of a run's federation, as :class:`Source` objects.

    Raises:
        ValueError / FileNotFoundError: the federation needs data that is not found.
    """
    from histofed.data.formats import Source
    from histofed.engine import data_root_from, load_federation

    config = load_config(Path(run_dir) / "config.toml")
    info_path = Path(run_dir) / "run.json"
    recorded = json.loads(info_path.read_text()).get("data_root") if info_path.exists() else None
    federation = load_federation(config, data_root_from(data_root) or
                                 (Path(recorded) if recorded else None))
    out = []
    for client in federation.clients:
        test = client.test
        if test is None or not hasattr(test, "instances"):
            continue
        ids = client.info.get("test_ids") or [f"{client.name}-{i}" for i in range(len(test))]
        out.append(Source(name=client.name, root=Path(run_dir), ids=list(ids),
                          images=list(test.images), masks=list(test.instances)))
    return out


def _bce(prob: np.ndarray, target: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities (clipped as in SegmentationTask.evaluate)."""
    p = np.clip(prob.astype(np.float64), 1e-6, 1 - 1e-6)
    return float(-np.mean(np.where(target, np.log(p), np.log1p(-p))))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _grid(path: Path, src, per_image: list, options: InstanceOptions, n: int, title: str) -> None:
    rows = []
    for i in range(min(n, len(src.images))):
        binary, s = per_image[i]
        rows.append({"image": src.images[i], "ref": reference_instances(src.masks[i])[0],
                     "pred": label_instances(binary, options),
                     "caption": f"{src.ids[i]}: AJI {s['aji']:.3f}, PQ {s['pq']:.3f}, "
                                f"nuclei {int(s['nuclei_pred'])}/{int(s['nuclei_ref'])}"})
    render_grid(path, rows, title)
