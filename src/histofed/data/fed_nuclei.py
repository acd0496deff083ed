"""Nucleus-segmentation federations: real multi-source data and a synthetic fallback.

``nuclei-multisource``: one client per source/organ of the real data under
``<data_root>/nuclei`` (MoNuSeg split by organ, CPM-15, CryoNuSeg cropped to its annotated box).
``synthetic-nuclei``: clients with their own stain colours (domain shift) and exact masks;
needs no data, builds in about a second.

Both split each client's *images* into train/val/test with a generator seeded by
``(seed, client name)``, so a client's split does not change when other clients are added or
removed.

Example:
    >>> from histofed.data import build_federation
    >>> fed = build_federation("synthetic-nuclei", data_root=None, seed=0, num_clients=2)
    >>> fed.client_names
    ['synthetic-0', 'synthetic-1']
"""

from __future__ import annotations

import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from histofed.data.datasets import DEFAULT_CROPS_PER_IMAGE, SegmentationCrops, SegmentationTiles
from histofed.data.federation import ClientData, Federation, merge_options, register_federation
from histofed.data.formats import (
    IMAGE_SUFFIXES,
    DataFormatError,
    Source,
    read_meta_csv,
    read_source,
)

SOURCES = ("monuseg", "cpm15", "cryonuseg")
MONUSEG_GROUPS: dict[str, tuple[str, ...]] = {
    "monuseg-breast": ("breast",),
    "monuseg-kidney": ("kidney",),
    "monuseg-liver": ("liver",),
    "monuseg-prostate": ("prostate",),
    "monuseg-other": ("bladder", "colon", "stomach"),
}
CLIENTS = (*MONUSEG_GROUPS, "cpm15", "cryonuseg")
CRYONUSEG_NOTE = (
    "partial annotation upstream: images and masks cropped to annotated_bbox_xyxy from meta.csv "
    "(some nuclei inside the box may still be unlabelled)"
)

_SPLIT_DEFAULTS: dict[str, Any] = {
    "test_fraction": 0.34,
    "val_fraction": 0.0,
    "crop_size": 128,
    "crops_per_image": DEFAULT_CROPS_PER_IMAGE,
}


def _options(federation: str, given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Merge options into defaults (merge_options), then check the split values."""
    opts = merge_options(federation, given, defaults)
    tf, vf = float(opts["test_fraction"]), float(opts["val_fraction"])
    if not 0.0 < tf < 1.0 or not 0.0 <= vf < 1.0 or tf + vf >= 1.0:
        raise ValueError(
            f"federation {federation!r}: need 0 < test_fraction < 1, 0 <= val_fraction < 1 and "
            f"test_fraction + val_fraction < 1; got {tf} and {vf}"
        )
    if int(opts["crop_size"]) < 8 or int(opts["crops_per_image"]) < 1:
        raise ValueError(
            f"federation {federation!r}: crop_size must be >= 8 and crops_per_image >= 1, got "
            f"{opts['crop_size']} and {opts['crops_per_image']}"
        )
    return opts


def split_images(
    n: int, *, client: str, seed: int, test_fraction: float, val_fraction: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split ``n`` image indices into (train, val, test), fixed by (seed, client).

    ``n_test = max(1, round(test_fraction * n))``; ``n_val = max(1, round(val_fraction * n))``
    when ``val_fraction > 0`` else 0; the rest train. Two images give 1 train + 1 test.

    Raises:
        ValueError: fewer than one training image would remain (names the client).
    """
    n_test = max(1, int(round(test_fraction * n)))
    n_val = max(1, int(round(val_fraction * n))) if val_fraction > 0 else 0
    if n - n_test - n_val < 1:
        raise ValueError(
            f"client {client!r} has {n} image(s): too few for {n_test} test + {n_val} val + "
            ">= 1 train. Lower val_fraction/test_fraction or drop this client via 'sources'"
        )
    rng = np.random.default_rng([seed, zlib.crc32(client.encode())])
    order = rng.permutation(n)
    test, val, train = np.split(order, [n_test, n_test + n_val])
    return np.sort(train), np.sort(val), np.sort(test)


def _client(
    name: str,
    images: list[np.ndarray],
    masks: list[np.ndarray],
    ids: list[str],
    *,
    seed: int,
    opts: dict[str, Any],
    info: dict[str, Any],
) -> ClientData:
    """Split one client's images and wrap them in the segmentation datasets."""
    tr, va, te = split_images(
        len(images), client=name, seed=seed,
        test_fraction=float(opts["test_fraction"]), val_fraction=float(opts["val_fraction"]),
    )

    def pick(idx: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return [images[i] for i in idx], [masks[i] for i in idx]

    train = SegmentationCrops(
        *pick(tr), crop_size=int(opts["crop_size"]),
        length=len(tr) * int(opts["crops_per_image"]), seed=seed,
    )
    val = SegmentationTiles(*pick(va)) if len(va) else None
    test = SegmentationTiles(*pick(te))
    fg = sum(int((m > 0).sum()) for m in masks) / max(sum(m.size for m in masks), 1)
    info = {
        **info,
        "n_train": len(tr), "n_val": len(va), "n_test": len(te),
        "num_train": len(train),
        "foreground_fraction": round(fg, 4),
        "train_ids": [ids[i] for i in tr], "val_ids": [ids[i] for i in va],
        "test_ids": [ids[i] for i in te],
    }
    return ClientData(name=name, train=train, val=val, test=test, info=info)


def find_nuclei_dir(data_root: Path | None) -> Path:
    """``<data_root>/nuclei`` or ``data_root`` itself when it already holds the sources."""
    hint = (
        "expected <data_root>/nuclei/{monuseg,cpm15,cryonuseg}/images/<id>.png + masks/<id>.png "
        "(+ meta.csv). Pass --data-root PATH (the folder holding nuclei/, e.g. ../shared/data) or "
        "set HISTOFED_DATA, or use the 'synthetic-nuclei' federation"
    )
    if data_root is None:
        raise FileNotFoundError(f"federation 'nuclei-multisource' needs a data root; {hint}")
    root = Path(data_root)
    for cand in (root / "nuclei", root):
        if any((cand / s / "images").is_dir() for s in SOURCES):
            return cand
    raise FileNotFoundError(f"no nuclei sources found under {root}; {hint}")


def _resolve_selection(sources: list[str] | None, include_cryonuseg: bool) -> list[str]:
    """Client names to build, from source and/or client names."""
    if sources is None:
        chosen = list(CLIENTS)
    else:
        if isinstance(sources, str):
            sources = [sources]
        chosen = []
        for s in sources:
            if s == "monuseg":
                chosen += list(MONUSEG_GROUPS)
            elif s in CLIENTS:
                chosen.append(s)
            else:
                raise ValueError(
                    f"federation 'nuclei-multisource': unknown source {s!r}; valid: "
                    f"{', '.join(SOURCES)} or a client name ({', '.join(CLIENTS)})"
                )
    if not include_cryonuseg:
        chosen = [c for c in chosen if c != "cryonuseg"]
    chosen = [c for c in CLIENTS if c in chosen]  # canonical order, no duplicates
    if not chosen:
        raise ValueError("federation 'nuclei-multisource': the selection leaves no clients")
    return chosen


def _crop_to_bbox(src: Source) -> tuple[list[np.ndarray], list[np.ndarray], list[list[int]]]:
    images, masks, boxes = [], [], []
    for image_id, img, mask, row in zip(src.ids, src.images, src.masks, src.meta):
        try:
            x0, y0, x1, y1 = (int(v) for v in row["annotated_bbox_xyxy"].split())
        except (KeyError, ValueError):
            raise DataFormatError(
                f"{src.root / 'meta.csv'}: row {image_id!r} needs 'annotated_bbox_xyxy' as "
                "'x0 y0 x1 y1' (pixels, end-exclusive) because CryoNuSeg is partially annotated"
            ) from None
        images.append(img[y0:y1, x0:x1].copy())
        masks.append(mask[y0:y1, x0:x1].copy())
        boxes.append([x0, y0, x1, y1])
    return images, masks, boxes


def _monuseg_group(organ: str) -> str:
    """Client name of a MoNuSeg organ; organs not named in MONUSEG_GROUPS go to 'other'."""
    for name, organs in MONUSEG_GROUPS.items():
        if organ in organs:
            return name
    return "monuseg-other"


def _read_monuseg(root: Path, clients: list[str]) -> Source:
    """Read only the MoNuSeg images whose organ (from meta.csv) belongs to ``clients``."""
    meta = read_meta_csv(root / "meta.csv")
    ids = sorted(p.stem for p in (root / "images").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    no_organ = [i for i in ids if not meta.get(i, {}).get("organ")]
    if no_organ:
        raise DataFormatError(
            f"{root / 'meta.csv'} must give an 'organ' for every image to split MoNuSeg by "
            f"organ; missing for {no_organ[:3]}{' ...' if len(no_organ) > 3 else ''}"
        )
    return read_source(root, ids=[i for i in ids if _monuseg_group(meta[i]["organ"]) in clients])


@register_federation(
    "nuclei-multisource",
    task="segmentation",
    description="real H&E nucleus segmentation: MoNuSeg by organ (5 clients), CPM-15, "
    "CryoNuSeg (cropped to its annotated box); one client per source/organ",
)
def build_nuclei_multisource(*, data_root: Path | None, seed: int, **options: Any) -> Federation:
    """Build the 7-client real-data federation (see module docstring and docs/data.md).

    Options: test_fraction=0.34, val_fraction=0.0, crop_size=128, crops_per_image=8,
    sources=None (list of source or client names), include_cryonuseg=True.
    """
    t0 = time.perf_counter()
    opts = _options(
        "nuclei-multisource", options,
        {**_SPLIT_DEFAULTS, "sources": None, "include_cryonuseg": True},
    )
    nuclei = find_nuclei_dir(data_root)
    chosen = _resolve_selection(opts["sources"], bool(opts["include_cryonuseg"]))
    clients: list[ClientData] = []
    monuseg_clients = [c for c in chosen if c in MONUSEG_GROUPS]
    if monuseg_clients:
        src = _read_monuseg(nuclei / "monuseg", monuseg_clients)
        organs = [row["organ"] for row in src.meta]
        for name in monuseg_clients:
            idx = [i for i, o in enumerate(organs) if _monuseg_group(o) == name]
            if not idx:
                continue
            clients.append(_client(
                name, [src.images[i] for i in idx], [src.masks[i] for i in idx],
                [src.ids[i] for i in idx], seed=seed, opts=opts,
                info={"source": "monuseg", "organs": sorted({organs[i] for i in idx})},
            ))
    if "cpm15" in chosen:
        src = read_source(nuclei / "cpm15")
        clients.append(_client(
            "cpm15", src.images, src.masks, src.ids, seed=seed, opts=opts,
            info={"source": "cpm15", "organs": ["unspecified (TCGA)"],
                  "magnification": sorted({r.get("magnification", "?") for r in src.meta})},
        ))
    if "cryonuseg" in chosen:
        src = read_source(nuclei / "cryonuseg")
        images, masks, boxes = _crop_to_bbox(src)
        clients.append(_client(
            "cryonuseg", images, masks, src.ids, seed=seed, opts=opts,
            info={"source": "cryonuseg",
                  "organs": sorted({r.get("organ", "?") for r in src.meta}),
                  "annotation": CRYONUSEG_NOTE, "crop_xyxy": boxes},
        ))
    return Federation(
        name="nuclei-multisource",
        task="segmentation",
        clients=clients,
        num_classes=1,
        description="MoNuSeg (by organ), CPM-15 and CryoNuSeg; binary nucleus masks",
        info={"data_root": str(nuclei), "seed": seed, "options": opts,
              "build_seconds": round(time.perf_counter() - t0, 3)},
    )


@register_federation(
    "synthetic-nuclei",
    task="segmentation",
    description="synthetic H&E-like tiles with exact nucleus masks; each client has its own "
    "stain colours (domain shift). No data needed",
    needs_data_root=False,
)
def build_synthetic_nuclei(*, data_root: Path | None, seed: int, **options: Any) -> Federation:
    """Build the synthetic fallback federation (``data_root`` is ignored).

    Options: num_clients=4, images_per_client=6, size=256, plus test_fraction=0.34,
    val_fraction=0.0, crop_size=128, crops_per_image=8. Client 0 uses the default
    :class:`~histofed.data.synthetic.Stain`; client k > 0 a stain drawn from a generator
    seeded by k alone, so a client keeps its colours across seeds while its images change.
    """
    from histofed.data.synthetic import dense_n_nuclei, random_stain, synthetic_tile

    t0 = time.perf_counter()
    opts = _options(
        "synthetic-nuclei", options,
        {"num_clients": 4, "images_per_client": 6, "size": 256, **_SPLIT_DEFAULTS},
    )
    n_clients, n_images, size = (int(opts[k]) for k in ("num_clients", "images_per_client", "size"))
    if n_clients < 1 or n_images < 2 or size < int(opts["crop_size"]) // 2:
        raise ValueError(
            "federation 'synthetic-nuclei': need num_clients >= 1, images_per_client >= 2 and "
            f"size >= crop_size / 2; got {n_clients}, {n_images}, {size}"
        )
    n_nuclei = dense_n_nuclei(size)  # ~13 % foreground, like real tiles
    clients = []
    for k in range(n_clients):
        stain = None if k == 0 else random_stain(np.random.default_rng([7919, k]))
        rng = np.random.default_rng([seed, k])
        tiles = [synthetic_tile(rng, size=size, n_nuclei=n_nuclei, stain=stain)
                 for _ in range(n_images)]
        name = f"synthetic-{k}"
        clients.append(_client(
            name, [t[0] for t in tiles], [t[1] for t in tiles],
            [f"{name}_{i:03d}" for i in range(n_images)], seed=seed, opts=opts,
            info={"source": "synthetic", "organs": ["synthetic"],
                  "stain": "default" if stain is None else repr(stain)},
        ))
    return Federation(
        name="synthetic-nuclei",
        task="segmentation",
        clients=clients,
        num_classes=1,
        description="synthetic H&E-like nucleus segmentation with per-client stain shift",
        info={"seed": seed, "options": opts, "build_seconds": round(time.perf_counter() - t0, 3)},
    )
