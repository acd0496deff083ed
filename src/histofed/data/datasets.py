"""Segmentation datasets: random augmented crops for training, whole tiles for evaluation.

Both follow the contract in :mod:`histofed.data.federation`. Masks are stored binary
(``mask > 0`` -> 1), so instance-id masks and 0/255 masks give the same targets.
:class:`SegmentationTiles` also keeps the masks as given (``instances``), so evaluation can
score nuclei by their reference ids (AJI, PQ; :mod:`histofed.instances`).

Example:
    >>> import numpy as np
    >>> images = [np.zeros((100, 120, 3), np.uint8)]
    >>> masks = [np.zeros((100, 120), np.uint16)]
    >>> ds = SegmentationCrops(images, masks, crop_size=64, seed=0)
    >>> x, y = ds[0]
    >>> tuple(x.shape), tuple(y.shape), len(ds)
    ((3, 64, 64), (1, 64, 64), 8)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

DEFAULT_CROPS_PER_IMAGE = 8


def binarize(mask: np.ndarray) -> np.ndarray:
    """H x W (any integer dtype) -> H x W uint8 with 1 where ``mask > 0``."""
    return (np.asarray(mask) > 0).astype(np.uint8)


def _check_pairs(images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> None:
    if len(images) != len(masks):
        raise ValueError(
            f"got {len(images)} images but {len(masks)} masks; pass one mask per image"
        )
    for i, (img, m) in enumerate(zip(images, masks)):
        if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
            raise ValueError(f"image {i}: expected H x W x 3 uint8, got {img.shape} {img.dtype}")
        if m.shape != img.shape[:2]:
            raise ValueError(f"image {i} is {img.shape[:2]} but its mask is {m.shape}")


_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_FROM_YIQ = np.linalg.inv(_TO_YIQ)


def _color_matrix(hue: float, sat: float, val: float) -> np.ndarray:
    """3 x 3 RGB->RGB matrix: hue rotation (radians) + saturation and value scaling.

    Hand-written linear approximation of HSV jitter (torchvision is not a dependency): rotate
    the chroma plane of YIQ by ``hue``, scale chroma by ``sat`` and everything by ``val``.
    """
    c, s = np.cos(hue), np.sin(hue)
    rot = np.array([[1.0, 0.0, 0.0], [0.0, sat * c, -sat * s], [0.0, sat * s, sat * c]])
    return (val * _FROM_YIQ @ rot @ _TO_YIQ).astype(np.float32)


class SegmentationCrops(Dataset):
    """Random square crops with flips, rot90 and light colour jitter (training).

    Item ``i`` comes from image ``i % len(images)``; its crop corner and augmentation are drawn
    up front by :meth:`reseed`, so an item depends only on (seed, i): the same seed gives the
    same items in any order, with any number of DataLoader workers.

    Args:
        images: list of H x W x 3 uint8.
        masks: list of H x W (instance ids or binary); stored as binary uint8 0/1.
        crop_size: side of the square crop; smaller images are reflect-padded up to it.
        length: items per pass; default ``len(images) * 8``.
        augment: flips + rot90 + colour jitter (crops are random either way).
        seed: initial seed (see :meth:`reseed`).

    Attributes:
        images: the input images, unpadded (list H x W x 3 uint8).
        masks: binary masks (list H x W uint8 in {0, 1}).
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        *,
        crop_size: int = 128,
        length: int | None = None,
        augment: bool = True,
        seed: int = 0,
        hue: float = 0.03,
        saturation: float = 0.15,
        value: float = 0.1,
    ) -> None:
        _check_pairs(images, masks)
        if not images:
            raise ValueError("SegmentationCrops needs at least one image")
        if crop_size < 1:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        self.images = list(images)
        self.masks = [binarize(m) for m in masks]
        self.crop_size = int(crop_size)
        self.length = int(length) if length is not None else len(images) * DEFAULT_CROPS_PER_IMAGE
        self.augment = augment
        self.jitter = (hue * 2 * np.pi, saturation, value)
        self._padded = [self._pad(img, m) for img, m in zip(self.images, self.masks)]
        self.reseed(seed)

    def _pad(self, img: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = self.crop_size
        ph, pw = max(c - img.shape[0], 0), max(c - img.shape[1], 0)
        if ph == 0 and pw == 0:
            return img, mask
        pads = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        # reflect needs the pad < size; "symmetric" works for any size >= 1.
        mode = "reflect" if ph < img.shape[0] and pw < img.shape[1] else "symmetric"
        return np.pad(img, pads + ((0, 0),), mode=mode), np.pad(mask, pads, mode=mode)

    def reseed(self, seed: int) -> None:
        """Draw every item's crop corner and augmentation for the next pass from ``seed``."""
        rng = np.random.default_rng(seed)
        n, c = self.length, self.crop_size
        which = np.arange(n) % len(self.images)
        hw = np.array([self._padded[i][0].shape[:2] for i in which]).reshape(n, 2)
        self._corner = (rng.random((n, 2)) * (hw - c + 1)).astype(np.int64)  # y, x
        self._flip = rng.random(n) < 0.5
        self._rot = rng.integers(0, 4, n)
        h, s, v = self.jitter
        self._color = np.stack(
            [rng.uniform(-h, h, n), rng.uniform(1 - s, 1 + s, n), rng.uniform(1 - v, 1 + v, n)], 1
        )
        self._which = which

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} crops")
        img, mask = self._padded[self._which[i]]
        (y, x), c = self._corner[i], self.crop_size
        img, mask = img[y : y + c, x : x + c], mask[y : y + c, x : x + c]  # c x c x 3, c x c
        if self.augment:
            if self._flip[i]:
                img, mask = img[:, ::-1], mask[:, ::-1]
            img, mask = np.rot90(img, self._rot[i]), np.rot90(mask, self._rot[i])
        x_t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0
        if self.augment:
            m = torch.from_numpy(_color_matrix(*self._color[i]))
            x_t = (m @ x_t.reshape(3, -1)).reshape(3, c, c).clamp_(0.0, 1.0)
        y_t = torch.from_numpy(np.ascontiguousarray(mask)).float()[None]
        return x_t, y_t  # 3 x c x c float32 in [0, 1], 1 x c x c float32 in {0, 1}


class SegmentationTiles(Dataset):
    """Whole images for evaluation: item -> (image [3, H, W] in [0, 1], mask [1, H, W] in {0, 1}).

    Sizes vary between items; use batch size 1 (and sliding-window inference).

    Attributes:
        images: list of H x W x 3 uint8.
        masks: binary masks (list H x W uint8 in {0, 1}).
        instances: the masks as given (H x W; instance ids, or binary), not copied; instance
            metrics use their ids when they have more than one (see ``reference_instances``).
    """

    def __init__(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> None:
        _check_pairs(images, masks)
        self.images = list(images)
        self.masks = [binarize(m) for m in masks]
        self.instances = [np.asarray(m) for m in masks]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # torch.tensor copies, so read-only arrays (e.g. memory-mapped) are fine
        x = torch.tensor(self.images[i]).permute(2, 0, 1).float() / 255.0
        y = torch.tensor(self.masks[i]).float()[None]
        return x, y  # 3 x H x W, 1 x H x W
