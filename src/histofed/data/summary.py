"""Who holds what: a per-client text table and a PNG plot for any federation.

Classification: class counts per client; MIL: bag counts per label; segmentation: images and
foreground/background pixel fractions (from the datasets' ``images``/``masks`` attributes).

Example:
    >>> from histofed.data.federation import build_federation
    >>> fed = build_federation("synthetic-bags", data_root=None, seed=0)
    >>> print(federation_table(fed).splitlines()[0])  # doctest: +ELLIPSIS
    synthetic-bags (mil, 2 classes): ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from histofed.atomic import atomic_path
from histofed.data.federation import ClientData, Federation


def _count(ds: Any) -> int:
    """Images for segmentation datasets (their ``len`` may count random crops), else items."""
    if ds is None:
        return 0
    images = getattr(ds, "images", None)
    return len(images) if isinstance(images, list) else len(ds)


def _hist(ds: Any, k: int, fallback: list[int] | None = None) -> np.ndarray | None:
    """Class histogram (K int) from the dataset's ``labels``, else the builder's info."""
    labels = getattr(ds, "labels", None) if ds is not None else None
    if labels is not None:
        return np.bincount(np.asarray(labels, np.int64), minlength=k)[:k]
    return np.asarray(fallback, np.int64) if fallback is not None else None


def _pixels(ds: Any) -> tuple[int, int]:
    """(foreground, total) pixels over a segmentation dataset's ``masks`` (list of H x W)."""
    masks = getattr(ds, "masks", None) if ds is not None else None
    if not masks:
        return 0, 0
    return (
        int(sum(int(np.count_nonzero(m)) for m in masks)),
        int(sum(int(np.asarray(m).size) for m in masks)),
    )


def _class_names(fed: Federation) -> list[str]:
    k = max(fed.num_classes, 2) if fed.task != "segmentation" else 2
    names = list(fed.info.get("class_names", []))
    return names + [f"class-{i}" for i in range(len(names), k)]


def _align(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, rows[:-1]), rule, fmt(rows[-1])])


def _split_counts(c: ClientData) -> list[int]:
    return [_count(c.train), _count(c.val), _count(c.test)]


def _cells(counts: list[int] | np.ndarray, has_val: bool) -> list[str]:
    """train, val, test counts as strings; '-' where a client has no validation set."""
    return [str(counts[0]), str(counts[1]) if has_val else "-", str(counts[2])]


def federation_table(fed: Federation) -> str:
    """A readable, aligned per-client table with a total row, as one string."""
    kind = "binary" if fed.num_classes == 1 else f"{fed.num_classes} classes"
    head = f"{fed.name} ({fed.task}, {kind}): {fed.description}".rstrip(": ")
    header = ["client", "train", "val", "test"]
    rows: list[list[str]] = []
    has_val = any(c.val is not None for c in fed.clients)
    totals = np.zeros(3, np.int64)
    if fed.task == "segmentation":
        header += ["train Mpx", "fg train", "fg test"]
        fg_tot = np.zeros(4, np.int64)  # fg/total train, fg/total test
        for c in fed.clients:
            n = _split_counts(c)
            totals += n
            (ftr, ptr), (fte, pte) = _pixels(c.train), _pixels(c.test)
            fg_tot += [ftr, ptr, fte, pte]
            rows.append(
                [
                    c.name,
                    *_cells(n, c.val is not None),
                    f"{ptr / 1e6:.2f}",
                    _frac(ftr, ptr),
                    _frac(fte, pte),
                ]
            )
        rows.append(
            [
                "total",
                *_cells(totals, has_val),
                f"{fg_tot[1] / 1e6:.2f}",
                _frac(fg_tot[0], fg_tot[1]),
                _frac(fg_tot[2], fg_tot[3]),
            ]
        )
        note = "fg = foreground (nucleus) pixel fraction over whole images"
    else:
        names = _class_names(fed)
        header += names
        class_tot = np.zeros((2, len(names)), np.int64)
        for c in fed.clients:
            n = _split_counts(c)
            totals += n
            htr = _hist(c.train, len(names), c.info.get("label_hist_train"))
            hte = _hist(c.test, len(names), c.info.get("label_hist_test"))
            cells = ["?"] * len(names)
            if htr is not None:
                class_tot[0] += htr
                hte = hte if hte is not None else np.zeros(len(names), np.int64)
                class_tot[1] += hte
                cells = [f"{a} ({b})" for a, b in zip(htr, hte, strict=True)]
            rows.append([c.name, *_cells(n, c.val is not None), *cells])
        rows.append(
            [
                "total",
                *_cells(totals, has_val),
                *[f"{a} ({b})" for a, b in zip(*class_tot, strict=True)],
            ]
        )
        unit = "bags" if fed.task == "mil" else "samples"
        note = f"per class: train (test) {unit}"
    return f"{head}\n{_align(header, rows)}\n{note}"


def _frac(fg: int, total: int) -> str:
    return f"{fg / total:.3f}" if total else "-"


def plot_federation(fed: Federation, path: str | Path) -> Path:
    """Save a PNG of the split (written atomically) and return its path.

    Classification/MIL: training counts per client as stacked bars (left) and each client's
    class proportions as a heatmap (right). Segmentation: foreground/background training pixels
    per client (left) and foreground fraction train vs test (right).
    """
    path = Path(path)
    clients = fed.clients
    y = np.arange(len(clients))
    fig = Figure(figsize=(11, 1.2 + 0.45 * max(len(clients), 3)), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[3, 2])
    if fed.task == "segmentation":
        px = np.array([[*_pixels(c.train), *_pixels(c.test)] for c in clients], np.float64)
        ax1.barh(y, px[:, 0] / 1e6, color="#7b3294", label="foreground")
        ax1.barh(
            y, (px[:, 1] - px[:, 0]) / 1e6, left=px[:, 0] / 1e6, color="#f1b6da", label="background"
        )
        ax1.set_xlabel("training pixels (millions)")
        frac = np.divide(
            px[:, [0, 2]], px[:, [1, 3]], out=np.zeros((len(clients), 2)), where=px[:, [1, 3]] > 0
        )  # P x (train, test)
        ax2.barh(y - 0.2, frac[:, 0], height=0.4, color="#7b3294", label="train")
        ax2.barh(y + 0.2, frac[:, 1], height=0.4, color="#c2a5cf", label="test")
        ax2.set_xlabel("foreground fraction")
        fig.legend(
            *ax2.get_legend_handles_labels(),
            loc="outside lower right",
            ncol=2,
            fontsize=8,
            frameon=False,
        )
        ax2.set_yticks(y, [])
        ax2.invert_yaxis()
    else:
        names = _class_names(fed)
        counts = np.array(
            [
                h
                if (h := _hist(c.train, len(names), c.info.get("label_hist_train"))) is not None
                else np.zeros(len(names), np.int64)
                for c in clients
            ],
            np.float64,
        )  # P x K
        left = np.zeros(len(clients))
        colors = [f"C{k % 10}" for k in range(len(names))]
        for k, name in enumerate(names):
            ax1.barh(y, counts[:, k], left=left, color=colors[k], label=name)
            left += counts[:, k]
        ax1.set_xlim(0, max(counts.sum(axis=1).max(), 1) * 1.04)
        ax1.set_xlabel("training bags" if fed.task == "mil" else "training samples")
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        im = ax2.imshow(share, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        for (i, k), v in np.ndenumerate(share):
            ax2.text(
                k,
                i,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if v < 0.6 else "black",
            )
        ax2.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax2.set_yticks(y, [])
        ax2.set_title("class share per client (train)", fontsize=10)
        fig.colorbar(im, ax=ax2, shrink=0.8)
    ax1.set_yticks(y, [c.name for c in clients])
    ax1.invert_yaxis()
    fig.legend(
        *ax1.get_legend_handles_labels(),
        loc="outside lower left",
        ncol=6,
        fontsize=8,
        frameon=False,
    )
    ax1.set_title(f"{fed.name} ({fed.task}): per-client data", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path
