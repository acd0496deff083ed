"""Synthetic H&E-like data with exact labels, for tests, demos and the no-data fallback.

Everything is drawn from an explicit ``np.random.Generator``; the same generator state gives
the same arrays. Images are rendered with the Beer-Lambert law from two stain concentration
maps (hematoxylin for nuclei, eosin for the background), so a :class:`Stain` changes the
colours the way a different lab/scanner would (domain shift) without touching the labels.

Example:
    >>> rng = np.random.default_rng(0)
    >>> image, instances, classes = synthetic_tile(rng, size=64, n_nuclei=(3, 5))
    >>> image.shape, image.dtype, instances.dtype, classes.dtype
    ((64, 64, 3), dtype('uint8'), dtype('uint16'), dtype('uint8'))
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy.ndimage import uniform_filter

from histofed.atomic import atomic_path

# Tile nucleus classes (value in the ``classes`` map; 0 = background).
NUCLEUS_CLASSES: dict[int, str] = {1: "lymphocyte-like", 2: "epithelial-like", 3: "spindle-like"}

# (semi-axis a range, b/a ratio range, hematoxylin concentration range) per tile class.
_Range = tuple[float, float]
_TILE_CLASS_SHAPES: dict[int, tuple[_Range, _Range, _Range]] = {
    1: ((3.0, 4.5), (0.85, 1.0), (1.5, 1.9)),  # small, round, very dark
    2: ((7.0, 10.0), (0.7, 0.9), (0.75, 1.0)),  # large, round-ish, pale with dark rim
    3: ((7.0, 11.0), (0.25, 0.4), (1.1, 1.4)),  # elongated spindle, medium
}


@dataclass(frozen=True)
class Stain:
    """Colour model of one lab: stain optical-density vectors, strengths and light.

    Attributes:
        hematoxylin: OD per RGB channel of unit hematoxylin (Ruifrok & Johnston 2001).
        eosin: OD per RGB channel of unit eosin.
        h_scale: multiplies every hematoxylin concentration (staining strength).
        e_scale: multiplies every eosin concentration.
        background: RGB intensity of the light through an empty slide (I0).
        tint: final per-channel multiplier (scanner colour balance).
    """

    hematoxylin: tuple[float, float, float] = (0.650, 0.704, 0.286)
    eosin: tuple[float, float, float] = (0.072, 0.990, 0.105)
    h_scale: float = 1.0
    e_scale: float = 1.0
    background: tuple[float, float, float] = (242.0, 240.0, 245.0)
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)


def random_stain(rng: np.random.Generator, strength: float = 0.2) -> Stain:
    """A plausible lab-to-lab variation of the default stain.

    Args:
        rng: random generator.
        strength: 0 gives the default stain; 0.2 is a clearly visible but realistic shift.

    Returns:
        A :class:`Stain` with perturbed OD vectors, scales and tint.
    """
    base = Stain()

    def jitter(vec: tuple[float, float, float]) -> tuple[float, float, float]:
        v = np.asarray(vec) * np.exp(rng.normal(0.0, strength, 3))
        return tuple(float(x) for x in v)

    return replace(
        base,
        hematoxylin=jitter(base.hematoxylin),
        eosin=jitter(base.eosin),
        h_scale=float(np.exp(rng.normal(0.0, strength))),
        e_scale=float(np.exp(rng.normal(0.0, strength))),
        tint=tuple(float(x) for x in np.clip(1.0 + rng.normal(0.0, strength / 4, 3), 0.8, 1.1)),
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise, H x W float32, roughly N(0, 1).

    Hand-written separable bilinear upsampling of a (cells+1)^2 grid (two small matrix
    products): ~50x faster than skimage.transform.resize for this size.
    """
    grid = rng.standard_normal((cells + 1, cells + 1))

    def weights(n: int) -> np.ndarray:  # n x (cells+1) interpolation matrix
        pos = np.linspace(0.0, cells, n)
        lo = np.minimum(pos.astype(int), cells - 1)
        frac = pos - lo
        w = np.zeros((n, cells + 1))
        w[np.arange(n), lo] = 1.0 - frac
        w[np.arange(n), lo + 1] = frac
        return w

    return (weights(shape[0]) @ grid @ weights(shape[1]).T).astype(np.float32)


def _render(h_conc: np.ndarray, e_conc: np.ndarray, stain: Stain | None) -> np.ndarray:
    """Beer-Lambert rendering: H x W concentrations -> H x W x 3 uint8 RGB.

    Loops over the 3 channels on purpose: numpy broadcasting over a trailing axis of
    length 3 is ~5x slower than three contiguous 2-D passes.
    """
    s = stain or Stain()
    h = h_conc * np.float32(s.h_scale)
    e = e_conc * np.float32(s.e_scale)
    out = np.empty(h_conc.shape + (3,), np.uint8)
    for c in range(3):
        light = np.float32(s.background[c] * s.tint[c])
        od = h * np.float32(s.hematoxylin[c]) + e * np.float32(s.eosin[c])
        out[..., c] = np.minimum(light * np.exp(-od) + np.float32(0.5), np.float32(255))
    return out


def _ellipse(
    shape: tuple[int, int], cy: float, cx: float, a: float, b: float, theta: float
) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
    """Pixels of a filled rotated ellipse, clipped to ``shape``.

    Returns:
        (row slice, col slice, inside h x w bool, normalised radius h x w float32), or None
        when the ellipse misses the image.
    """
    r = int(np.ceil(max(a, b))) + 1
    y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 1, shape[0])
    x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 1, shape[1])
    if y0 >= y1 or x0 >= x1:
        return None
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)  # h x 1
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)  # 1 x w
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    u, v = (dx * (c / a) + dy * (s / a)), (dy * (c / b) - dx * (s / b))
    rad = np.sqrt(u * u + v * v)
    inside = rad <= 1.0
    if not inside.any():
        return None
    return slice(y0, y1), slice(x0, x1), inside, rad


def _background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Eosin concentration of textured stroma with a few pale gaps, H x W float32."""
    coarse = _smooth_noise(rng, size, 3)
    fibres = uniform_filter(rng.standard_normal(size, dtype=np.float32), size=(3, 7))
    e = 0.45 + 0.12 * coarse + 0.15 * fibres + 0.03 * rng.standard_normal(size, dtype=np.float32)
    e[coarse < -1.2] *= 0.3  # lumen / white space
    return np.maximum(e, np.float32(0.02))


def synthetic_tile(
    rng: np.random.Generator,
    size: int = 256,
    n_nuclei: tuple[int, int] = (20, 60),
    stain: Stain | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One H&E-like tile with exact instance and class masks.

    Nuclei are non-overlapping filled ellipses of three learnable classes
    (see ``NUCLEUS_CLASSES``): small dark round, large pale round with a dark rim, and
    elongated spindles. Placement uses rejection sampling, so a crowded tile may hold fewer
    nuclei than asked for.

    Args:
        rng: random generator (the only source of randomness).
        size: tile side in pixels.
        n_nuclei: inclusive (low, high) range of nuclei to try to place.
        stain: colour model (domain shift); None = default :class:`Stain`.

    Returns:
        image: size x size x 3 uint8 RGB.
        instances: size x size uint16, 0 = background, 1..N consecutive nucleus ids.
        classes: size x size uint8, 0 = background, 1..3 nucleus class.
    """
    shape = (size, size)
    e_conc = _background(rng, shape)
    h_conc = np.zeros(shape, np.float32)
    instances = np.zeros(shape, np.uint16)
    classes = np.zeros(shape, np.uint8)
    texture = rng.standard_normal(shape, dtype=np.float32)
    target = int(rng.integers(n_nuclei[0], n_nuclei[1] + 1))
    # Draw every candidate's parameters at once (per-call rng overhead dominates otherwise).
    tries = 10 * target
    ks = rng.integers(1, len(_TILE_CLASS_SHAPES) + 1, tries)
    u = rng.random((tries, 6))  # a, b/a, conc, cy, cx, theta in [0, 1)
    lo = np.array([[*_TILE_CLASS_SHAPES[k][0], *_TILE_CLASS_SHAPES[k][1], *_TILE_CLASS_SHAPES[k][2]]
                   for k in ks]).reshape(tries, 3, 2)
    a_s, ratio_s, h_s = (lo[:, i, 0] + u[:, i] * (lo[:, i, 1] - lo[:, i, 0]) for i in range(3))
    placed = 0
    for t in range(tries):
        if placed == target:
            break
        k, a = int(ks[t]), a_s[t]
        hit = _ellipse(shape, u[t, 3] * size, u[t, 4] * size, a, a * ratio_s[t], u[t, 5] * np.pi)
        if hit is None:
            continue
        ys, xs, inside, rad = hit
        inst = instances[ys, xs]  # views into the full maps
        if inst[inside].any():
            continue  # overlap: reject, so every mask pixel belongs to exactly one drawn nucleus
        placed += 1
        conc = np.float32(h_s[t]) * (1.0 + 0.18 * texture[ys, xs][inside])
        if k == 2:
            conc += 0.5 * (rad[inside] > 0.75)  # nuclear membrane
        h_conc[ys, xs][inside] = conc
        e_conc[ys, xs][inside] *= 0.3
        inst[inside] = placed
        classes[ys, xs][inside] = k
    return _render(h_conc, e_conc, stain), instances, classes


def _patch_class_shape(k: int, num_classes: int, size: int) -> tuple[float, float, float]:
    """(semi-axis a, b/a ratio, hematoxylin conc.) of class k in a size x size patch.

    Size grows with k; elongation and darkness alternate, so neighbouring classes differ in
    two cues and any two classes differ in at least one.
    """
    t = k / max(num_classes - 1, 1)
    a = (4.0 + 8.0 * t) * size / 32.0
    return a, (1.0 if k % 2 == 0 else 0.5), (1.6 if k % 2 == 0 else 0.9)


def synthetic_patches(
    rng: np.random.Generator,
    n: int,
    num_classes: int = 4,
    size: int = 32,
    class_probs: np.ndarray | list[float] | None = None,
    *,
    stain: Stain | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Small patches whose label is the kind of nucleus in the centre.

    Class k has a central nucleus whose size grows with k and whose elongation and darkness
    alternate with k (see ``_patch_class_shape``); 0-3 faint small distractor nuclei sit away
    from the centre. A small CNN learns this in a few epochs.

    Args:
        rng: random generator.
        n: number of patches.
        num_classes: 2..10.
        size: patch side in pixels (>= 16).
        class_probs: class frequencies (length num_classes, sums to 1); None = uniform.
        stain: colour model (domain shift between clients); None = default.

    Returns:
        images: N x size x size x 3 uint8.
        labels: N int64 in [0, num_classes).

    Raises:
        ValueError: bad num_classes, size or class_probs.
    """
    if not 2 <= num_classes <= 10:
        raise ValueError(f"num_classes must be in 2..10, got {num_classes}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    if class_probs is not None:
        class_probs = np.asarray(class_probs, dtype=np.float64)
        if class_probs.shape != (num_classes,) or (class_probs < 0).any():
            raise ValueError(
                f"class_probs must be {num_classes} non-negative numbers, got {class_probs}"
            )
        class_probs = class_probs / class_probs.sum()
    labels = rng.choice(num_classes, size=n, p=class_probs).astype(np.int64)
    images = np.empty((n, size, size, 3), np.uint8)
    shape = (size, size)
    for i, k in enumerate(labels):
        e_conc = _background(rng, shape)
        h_conc = np.zeros(shape, np.float32)
        for _ in range(int(rng.integers(0, 4))):  # distractors near the border
            ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.38, 0.5) * size
            hit = _ellipse(shape, size / 2 + dist * np.sin(ang), size / 2 + dist * np.cos(ang),
                           2.5, 2.0, rng.uniform(0, np.pi))
            if hit is not None:
                ys, xs, inside, _ = hit
                h_conc[ys, xs][inside] = rng.uniform(0.5, 0.8)
        a, ratio, h = _patch_class_shape(int(k), num_classes, size)
        a *= rng.uniform(0.9, 1.1)
        cy, cx = size / 2 + rng.uniform(-2, 2, 2) * size / 32
        ys, xs, inside, _ = _ellipse(shape, cy, cx, a, a * ratio, rng.uniform(0, np.pi))
        conc = h * rng.uniform(0.9, 1.1) * (1.0 + 0.15 * rng.standard_normal(inside.shape))
        h_conc[ys, xs] = np.where(inside, conc, h_conc[ys, xs])
        e_conc[ys, xs] = np.where(inside, e_conc[ys, xs] * 0.3, e_conc[ys, xs])
        images[i] = _render(h_conc, e_conc, stain)
    return images, labels


def _bag_labels(rng: np.random.Generator, n_bags: int, pos_fraction: float,
                n_instances: tuple[int, int]) -> np.ndarray:
    """Shuffled bag labels, round(pos_fraction * n_bags) of them positive (checks the ranges)."""
    if not 0.0 <= pos_fraction <= 1.0:
        raise ValueError(f"pos_fraction must be in [0, 1], got {pos_fraction}")
    if n_instances[0] < 1 or n_instances[1] < n_instances[0]:
        raise ValueError(f"n_instances must be (low >= 1, high >= low), got {n_instances}")
    n_pos = int(round(pos_fraction * n_bags))
    return rng.permutation(np.r_[np.ones(n_pos, int), np.zeros(n_bags - n_pos, int)])


def synthetic_bags(
    rng: np.random.Generator,
    n_bags: int,
    dim: int = 64,
    n_instances: tuple[int, int] = (20, 60),
    pos_fraction: float = 0.5,
    *,
    shift: float = 1.5,
    witness_fraction: tuple[float, float] = (0.1, 0.3),
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Multiple-instance bags of tile features: a bag is positive iff it has witness tiles.

    Negative instances are N(0, I). Witness instances (only in positive bags, 10-30 % of the
    bag, at least one) are N(mu, I) with ``mu = shift`` on the first ``min(8, dim)`` features and
    0 elsewhere. ``mu`` is a fixed constant, so bags drawn by separate calls (train vs test,
    different clients) share the same concept. Witnesses form a spatial cluster in ``coords``.

    Args:
        rng: random generator.
        n_bags: number of bags; exactly ``round(pos_fraction * n_bags)`` are positive.
        dim: feature dimension.
        n_instances: inclusive (low, high) bag size.
        pos_fraction: fraction of positive bags.
        shift: distance of the witness mean from 0 per shifted feature (bigger = easier).
        witness_fraction: (low, high) fraction of witnesses in a positive bag.

    Returns:
        List of (features n_i x dim float32, coords n_i x 2 int64 (x, y) tile origins in
        level-0 pixels on a 256-pixel grid, label int in {0, 1}).
    """
    labels = _bag_labels(rng, n_bags, pos_fraction, n_instances)
    mu = np.zeros(dim, np.float32)
    mu[: min(8, dim)] = shift
    bags = []
    for label in labels:
        n = int(rng.integers(n_instances[0], n_instances[1] + 1))
        side = int(np.ceil(np.sqrt(n * 1.5)))
        cells = rng.choice(side * side, size=n, replace=False)
        coords = np.stack([cells % side, cells // side], axis=1).astype(np.int64) * 256
        feats = rng.standard_normal((n, dim), dtype=np.float32)
        if label:
            n_wit = max(1, int(round(rng.uniform(*witness_fraction) * n)))
            seed_cell = coords[int(rng.integers(n))]
            nearest = np.argsort(np.abs(coords - seed_cell).sum(axis=1), kind="stable")[:n_wit]
            feats[nearest] += mu
        bags.append((feats, coords, int(label)))
    return bags


def dense_n_nuclei(size: int) -> tuple[int, int]:
    """Nuclei range giving ~13 % foreground on a size x size tile, like real H&E tiles.

    (``synthetic_tile``'s default (20, 60) gives ~6 % at 256 x 256.)
    """
    area = (size / 256) ** 2
    return max(1, int(60 * area)), max(1, int(120 * area))


def write_synthetic_source(
    root: str | os.PathLike[str],
    name: str,
    n_images: int,
    size: int,
    rng: np.random.Generator,
    stain: Stain | None = None,
    *,
    n_nuclei: tuple[int, int] | None = None,
) -> Path:
    """Write a synthetic source in the standard folder layout.

    Layout (the one :func:`histofed.data.formats.read_source` reads)::

        <root>/<name>/images/<id>.png   RGB uint8
        <root>/<name>/masks/<id>.png    uint16 instance ids (PIL mode I;16)
        <root>/<name>/meta.csv          id,width,height,n_instances

    Files are written atomically (temp file + rename). ``n_nuclei`` defaults to
    :func:`dense_n_nuclei` (size).

    Returns:
        The source folder ``<root>/<name>``.
    """
    from histofed.data.formats import write_image_png, write_mask_png

    src = Path(root) / name
    (src / "images").mkdir(parents=True, exist_ok=True)
    (src / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        image, instances, _ = synthetic_tile(
            rng, size=size, n_nuclei=n_nuclei or dense_n_nuclei(size), stain=stain
        )
        image_id = f"{name}_{i:03d}"
        write_image_png(src / "images" / f"{image_id}.png", image)
        write_mask_png(src / "masks" / f"{image_id}.png", instances)
        rows.append({"id": image_id, "width": size, "height": size,
                     "n_instances": int(instances.max())})
    with atomic_path(src / "meta.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "width", "height", "n_instances"])
        writer.writeheader()
        writer.writerows(rows)
    return src


def synthetic_image_bags(
    rng: np.random.Generator,
    n_bags: int,
    *,
    n_instances: tuple[int, int] = (6, 10),
    size: int = 16,
    pos_fraction: float = 0.5,
    witness_fraction: tuple[float, float] = (0.2, 0.4),
) -> list[tuple[np.ndarray, int]]:
    """Bags of image patches (the image twin of :func:`synthetic_bags`): a bag is positive iff
    it holds witness patches.

    Patches come from :func:`synthetic_patches` with two classes: negative bags hold class-0
    patches only (small nucleus), positive bags also 20-40 % (at least one) class-1 patches
    (larger nucleus).

    Returns:
        List of (patches n_i x size x size x 3 uint8, label in {0, 1}).
    """
    labels = _bag_labels(rng, n_bags, pos_fraction, n_instances)
    bags = []
    for label in labels:
        n = int(rng.integers(n_instances[0], n_instances[1] + 1))
        k = max(1, int(round(rng.uniform(*witness_fraction) * n))) if label else 0
        neg, _ = synthetic_patches(rng, n - k, num_classes=2, size=size, class_probs=[1, 0])
        parts = [neg]
        if k:
            parts.append(synthetic_patches(rng, k, num_classes=2, size=size,
                                           class_probs=[0, 1])[0])
        patches = np.concatenate(parts)[rng.permutation(n)]  # n x size x size x 3
        bags.append((patches, int(label)))
    return bags
