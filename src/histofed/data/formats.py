"""Readers for image/mask folders and Aperio ImageScope XML; atomic PNG writers.

Numpy in, numpy out. Every reader raises :class:`DataFormatError` (a ``ValueError``) whose
message names the file and says how to fix it.

Folder layout of one *source* (one lab / dataset)::

    <source>/images/<id>.png|.tif|.tiff|.jpg|.jpeg   RGB image
    <source>/masks/<id>.png|.tif|.tiff                 same H x W; 0 = background, >0 = nucleus
    <source>/meta.csv                                  optional, one row per id (column ``id``)

Example:
    >>> src = read_source("/path/to/nuclei/cpm15")        # doctest: +SKIP
    >>> src.images[0].shape, src.masks[0].dtype           # doctest: +SKIP
    ((488, 643, 3), dtype('uint16'))
"""

from __future__ import annotations

import csv
import os
import re
import struct
import warnings
import zlib
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from histofed.atomic import atomic_path

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
MASK_SUFFIXES = (".png", ".tif", ".tiff")
LAYOUT_HELP = (
    "expected layout: <source>/images/<id>.png|tif|tiff|jpg and <source>/masks/<id>.png "
    "(same H x W, 0 = background, >0 = nucleus), optional <source>/meta.csv with an 'id' column"
)


class DataFormatError(ValueError):
    """A data file is missing, unreadable or inconsistent; the message names the file and fix."""


# --------------------------------------------------------------------------- decoding


MAX_PIXELS_ENV = "HISTOFED_MAX_IMAGE_PIXELS"


def max_image_pixels() -> int | None:
    """The largest image (in pixels) the readers decode when $HISTOFED_MAX_IMAGE_PIXELS is set
    (``0`` = no limit); None when unset, and then Pillow's decompression-bomb check applies
    (2 x ``Image.MAX_IMAGE_PIXELS``, about 179 Mpixels).

    Raises:
        DataFormatError: the variable is not a whole number.
    """
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return None  # Pillow's own check applies (DecompressionBombError)
    try:
        value = int(float(raw))
    except ValueError:
        raise DataFormatError(f"{MAX_PIXELS_ENV}={raw!r}: give a number of pixels, e.g. "
                              f"{MAX_PIXELS_ENV}=400000000, or 0 for no limit") from None
    Image.MAX_IMAGE_PIXELS = None  # the user's limit replaces Pillow's (checked in _decode)
    return value if value > 0 else None


def _too_large(path: Path, what: str, pixels: int | str, limit: int) -> DataFormatError:
    return DataFormatError(
        f"{what} {path} has {pixels} pixels, more than the limit of {limit} that protects "
        "against decompression bombs (a small file that expands to gigabytes). If you trust "
        f"the file, allow it with {MAX_PIXELS_ENV}=<pixels> (0 = no limit); a whole slide "
        "belongs in `histofed data tile`, which reads it tile by tile"
    )


def _last_row_is_zero(im: Image.Image) -> bool:
    """A PNG cut short decodes with zero (black) rows at the bottom; a real tile almost never
    ends in an all-zero row, so only then is the file re-read (:func:`_png_ends_early`)."""
    return im.height > 0 and not np.asarray(im.crop((0, im.height - 1, im.width, im.height))).any()


def _png_ends_early(path: Path) -> bool:
    """True when a PNG's compressed data holds fewer rows than its header promises.

    Pillow decodes such a file without error and leaves the missing rows black (it treats the
    end of the zlib stream as the end of the image), so the rows are counted here with zlib.
    """
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 33:
        return False
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 1)
    idat, pos = [], 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + length])
        pos += 12 + length
    try:
        raw = zlib.decompressobj().decompress(b"".join(idat))
    except zlib.error:
        return True

    def row_bytes(w: int) -> int:
        return 1 + (w * depth * channels + 7) // 8  # filter byte + packed samples

    if interlace:  # Adam7: 7 reduced images
        passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
                  (1, 0, 2, 2), (0, 1, 1, 2)]
        expected = 0
        for x0, y0, dx, dy in passes:
            w, h = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
            expected += row_bytes(w) * h if w > 0 and h > 0 else 0
    else:
        expected = row_bytes(width) * height
    return len(raw) < expected


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _decode(path: Path, what: str) -> np.ndarray:
    """Decode an image file to a numpy array (any dtype/channels); tifffile for odd TIFFs.

    Refuses images above :func:`max_image_pixels` and PNGs whose data ends early (both are
    decoded without error by Pillow otherwise: the first can exhaust memory, the second reads
    as an image with a black lower part).
    """
    if not path.is_file():
        raise DataFormatError(f"{what} {path} does not exist; check the path and file name")
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if limit and im.width * im.height > limit:
                    raise _too_large(path, what, f"{im.width} x {im.height} = "
                                     f"{im.width * im.height}", limit)
                if im.format == "TIFF" and im.mode in ("RGB", "RGBA", "RGBX") and max(
                        _as_tuple(im.tag_v2.get(258, 8))) > 8:
                    # Pillow keeps only the high byte of 16-bit RGB: tifffile reads all bits
                    raise OSError("16-bit RGB TIFF")
                im.load()
                if im.format == "PNG" and _last_row_is_zero(im) and _png_ends_early(path):
                    raise OSError("the compressed data ends before the last row (the file was "
                                  "cut short when it was written or copied)")
                if im.mode == "P" and what == "mask":
                    return np.asarray(im)  # palette indices are the labels
                if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                    im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA"
                                    else "RGB")
                elif im.mode == "1":
                    im = im.convert("L")
                return np.asarray(im)
    except DataFormatError:
        raise
    except Image.DecompressionBombError as err:  # Pillow's check ($HISTOFED_MAX_IMAGE_PIXELS unset)
        found = re.search(r"\((\d+) pixels\)", str(err))
        raise _too_large(path, what, found.group(1) if found else "too many",
                         limit or 2 * (Image.MAX_IMAGE_PIXELS or 0)) from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL's "cannot identify", truncation
        reason = str(err)
    if path.suffix.lower() in (".tif", ".tiff"):  # e.g. 16-bit RGB, tiled or odd compression
        try:
            import tifffile

            if limit is None and Image.MAX_IMAGE_PIXELS:  # no user limit: Pillow's
                limit = 2 * Image.MAX_IMAGE_PIXELS
            with tifffile.TiffFile(path) as tif:
                shape = tif.series[0].shape
                pixels = int(np.prod([n for n in shape if n > 4]))  # H x W (not the channels)
                if limit and pixels > limit:
                    raise _too_large(path, what, f"{' x '.join(map(str, shape))} = {pixels}",
                                     limit)
                return np.asarray(tif.asarray())
        except DataFormatError:
            raise
        except Exception as err:  # noqa: BLE001 - any tifffile failure means unreadable
            reason = f"{reason}; tifffile: {err}"
    raise DataFormatError(
        f"cannot read {what} {path}: {reason}. Fix: check the file is a complete PNG/TIFF/JPEG "
        "(re-export or re-download it) or remove it from the folder"
    )


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an RGB image.

    Conversions: RGBA/LA -> RGB (alpha dropped if fully opaque, else composited on white with
    a warning); grayscale -> 3 equal channels; 16-bit -> ``round(x / 257)`` so 65535 -> 255,
    unless the values fit 8, 10, 12 or 14 bits (e.g. a 12-bit camera: 4095 -> 255, with a
    warning, since such data read as 16-bit would be near-black);
    float in [0, 1] -> ``round(255 x)``. Pillow decodes 16-bit *RGB PNGs* to their high byte
    itself (``x >> 8``, within 1 of ``x / 257``); 16-bit RGB TIFFs go through tifffile.

    Args:
        path: PNG, TIFF or JPEG file.

    Returns:
        H x W x 3 uint8 RGB.

    Raises:
        DataFormatError: missing, corrupt or unsupported file (the message says which and why).
    """
    path = Path(path)
    arr = _decode(path, "image")
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar TIFF (C x H x W)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise DataFormatError(
            f"image {path} has shape {arr.shape}; expected H x W (grayscale) or H x W x 3/4 "
            "(RGB/RGBA). Fix: save it as an RGB PNG"
        )
    arr = _to_uint8(arr, path)
    if arr.shape[-1] in (2, 4):  # LA / RGBA
        alpha = arr[..., -1:]
        arr = arr[..., :-1]
        if (alpha != 255).any():
            warnings.warn(
                f"image {path} has transparent pixels; composited on white", stacklevel=2
            )
            a = alpha.astype(np.float32) / 255.0
            arr = np.round(arr * a + 255.0 * (1.0 - a)).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr)


def _to_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16 or (arr.dtype.kind in "iu" and arr.max(initial=0) <= 65535):
        if arr.min(initial=0) < 0:
            raise DataFormatError(f"image {path} has negative pixel values; save it as RGB uint8")
        top = int(arr.max(initial=0))
        bits = next(b for b in (8, 10, 12, 14, 16) if top < 2**b)
        if bits < 16:  # e.g. a 12-bit camera in a 16-bit TIFF: x / 257 would be near-black
            warnings.warn(
                f"image {path} is stored as 16-bit but its values only reach {top}: read as "
                f"{bits}-bit data (0..{2**bits - 1} -> 0..255). If it really is that dark, "
                "save it as 8-bit", stacklevel=3)
        return np.round(arr.astype(np.float32) * (255.0 / (2**bits - 1))).astype(np.uint8)
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype.kind == "f" and np.nanmin(arr) >= 0 and np.nanmax(arr) <= 1:
        return np.round(np.nan_to_num(arr) * 255.0).astype(np.uint8)
    raise DataFormatError(
        f"image {path} has dtype {arr.dtype} with values {arr.min()}..{arr.max()}, which has "
        "no standard mapping to 8-bit RGB. Fix: save it as 8-bit (or 16-bit) RGB"
    )


def read_mask(
    path: str | os.PathLike[str],
    expected_shape: tuple[int, ...] | None = None,
    *,
    image_path: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """Read a nucleus mask; foreground is ``mask > 0``.

    Args:
        path: PNG/TIFF mask. 8-bit masks are binary (0/255 or 0/1) or small label maps;
            16-bit masks hold instance ids 0..N. Values are returned unchanged.
        expected_shape: H x W (or H x W x C) of the image it belongs to; checked if given.
        image_path: the image file, only used to make size errors name both files.

    Returns:
        H x W uint8 (binary / labels < 256) or uint16 (instance ids).

    Raises:
        DataFormatError: unreadable file, colour mask, negative/fractional ids, or size mismatch.
    """
    path = Path(path)
    arr = _decode(path, "mask")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        if (arr[..., 1:3] == arr[..., :1]).all():
            arr = arr[..., 0]  # gray stored as RGB
        else:
            raise DataFormatError(
                f"mask {path} is a colour image; expected one channel (0 = background, "
                "1..N = nucleus ids). Fix: convert colours to integer ids before saving"
            )
    if arr.ndim != 2:
        raise DataFormatError(f"mask {path} has shape {arr.shape}; expected H x W (one channel)")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    elif arr.dtype not in (np.uint8, np.uint16):
        if arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
            raise DataFormatError(f"mask {path} has fractional values; expected integer ids")
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
            raise DataFormatError(
                f"mask {path} has values {arr.min()}..{arr.max()}; expected ids in 0..65535"
            )
        arr = arr.astype(np.uint16)
    if expected_shape is not None and arr.shape != tuple(expected_shape[:2]):
        partner = f"its image {image_path}" if image_path else "its image"
        raise DataFormatError(
            f"mask {path} is {arr.shape[1]}x{arr.shape[0]} (W x H) but {partner} is "
            f"{expected_shape[1]}x{expected_shape[0]}; masks must match their image pixel for "
            "pixel. Fix: pair the image with the mask of the right size, or re-export the mask"
        )
    return arr


# --------------------------------------------------------------------------- sources


@dataclass
class Source:
    """One folder of images with masks (one lab / dataset).

    Attributes:
        name: folder name.
        root: the folder.
        ids: sorted image ids (file names without suffix).
        images: per id, H x W x 3 uint8.
        masks: per id, H x W uint8 or uint16 (foreground = > 0).
        meta: per id, the row of meta.csv as a dict of strings ({} if no row / no file).
    """

    name: str
    root: Path
    ids: list[str]
    images: list[np.ndarray]
    masks: list[np.ndarray]
    meta: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def is_source_dir(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` looks like an image/mask source (has an images/ subfolder)."""
    return (Path(path) / "images").is_dir()


def _files_by_id(folder: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."):
            if p.stem in found:
                raise DataFormatError(
                    f"two {what} files for id {p.stem!r}: {found[p.stem]} and {p}; keep one"
                )
            found[p.stem] = p
    return found


def read_meta_csv(path: Path) -> dict[str, dict[str, str]]:
    """Rows of a meta.csv keyed by its ``id`` column; {} when the file is absent."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "id" not in reader.fieldnames:
            raise DataFormatError(
                f"{path} has no 'id' column (columns: {reader.fieldnames}); the first column "
                "must be 'id' holding the image file name without suffix"
            )
        return {row["id"]: dict(row) for row in reader}


def read_source(
    root: str | os.PathLike[str], *, ids: list[str] | None = None, workers: int = 4
) -> Source:
    """Read every image and mask of one source folder (layout in the module docstring).

    PNG decoding runs in a thread pool (Pillow releases the GIL while decoding).

    Args:
        root: the source folder.
        ids: read only these ids (default: all images).
        workers: decoding threads.

    Returns:
        A :class:`Source` with ids sorted.

    Raises:
        DataFormatError: missing/empty images folder, an image without mask, unreadable files,
            size mismatches. A mask without an image only warns.
    """
    root = Path(root)
    img_dir, mask_dir = root / "images", root / "masks"
    if not img_dir.is_dir():
        raise DataFormatError(f"{root} has no images/ folder; {LAYOUT_HELP}")
    images = _files_by_id(img_dir, IMAGE_SUFFIXES, "image")
    if not images:
        raise DataFormatError(f"{img_dir} holds no .png/.tif/.tiff/.jpg images; {LAYOUT_HELP}")
    masks = _files_by_id(mask_dir, MASK_SUFFIXES, "mask") if mask_dir.is_dir() else {}
    missing = [i for i in images if i not in masks]
    if missing:
        raise DataFormatError(
            f"{len(missing)} image(s) in {img_dir} have no mask, e.g. {images[missing[0]].name}: "
            f"expected {mask_dir / (missing[0] + '.png')}. Fix: add the masks or move those "
            "images out of the source"
        )
    orphans = sorted(set(masks) - set(images))
    if orphans:
        warnings.warn(
            f"{len(orphans)} mask(s) in {mask_dir} have no image and are ignored, e.g. "
            f"{masks[orphans[0]].name}",
            stacklevel=2,
        )
    wanted = sorted(images) if ids is None else list(ids)
    unknown = [i for i in wanted if i not in images]
    if unknown:
        raise DataFormatError(f"ids {unknown} not found in {img_dir}")

    def load(image_id: str) -> tuple[np.ndarray, np.ndarray]:
        img = read_image(images[image_id])
        mask = read_mask(masks[image_id], img.shape, image_path=images[image_id])
        return img, mask

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pairs = list(pool.map(load, wanted))
    meta = read_meta_csv(root / "meta.csv")
    return Source(
        name=root.name,
        root=root,
        ids=wanted,
        images=[p[0] for p in pairs],
        masks=[p[1] for p in pairs],
        meta=[meta.get(i, {}) for i in wanted],
    )


# --------------------------------------------------------------------------- Aperio XML


def read_aperio_xml(
    path: str | os.PathLike[str], shape: tuple[int, int], *, allow_empty: bool = False
) -> np.ndarray:
    """Rasterise an Aperio ImageScope annotation XML into an instance mask.

    Reads ``Annotations/Annotation/Regions/Region/Vertices/Vertex`` (attributes X = column,
    Y = row, level-0 pixels). Each region becomes one instance (ids 1..N in file order);
    a pixel belongs to a region when its centre lies inside or on the polygon
    (``skimage.draw.polygon``). Later regions overwrite earlier ones where they overlap.
    Regions with fewer than 3 vertices are skipped with a warning.

    Args:
        path: the .xml file.
        shape: (H, W) of the image the XML annotates.
        allow_empty: return an all-zero mask instead of raising when there are no regions.

    Returns:
        H x W uint16 instance mask.

    Raises:
        DataFormatError: unparsable XML, non-numeric vertices, no regions, > 65535 regions.
    """
    from skimage.draw import polygon

    path = Path(path)
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError) as err:
        raise DataFormatError(
            f"cannot parse Aperio XML {path}: {err}. Fix: export the annotations again from "
            "ImageScope (File > Save annotations) or check the file is complete"
        ) from None
    regions = tree.getroot().findall(".//Region")
    if not regions and not allow_empty:
        raise DataFormatError(
            f"Aperio XML {path} contains no <Region> elements (expected "
            "Annotations/Annotation/Regions/Region/Vertices/Vertex); is it an ImageScope "
            "annotation file? Pass allow_empty=True if an empty annotation is intended"
        )
    if len(regions) > 65535:
        raise DataFormatError(f"Aperio XML {path} has {len(regions)} regions; max is 65535")
    mask = np.zeros(shape, np.uint16)
    skipped = 0
    for k, region in enumerate(regions, start=1):
        try:
            xy = np.array(
                [(float(v.attrib["X"]), float(v.attrib["Y"])) for v in region.iter("Vertex")]
            ).reshape(-1, 2)
        except (KeyError, ValueError) as err:
            raise DataFormatError(
                f"Aperio XML {path}: region {region.get('Id', k)} has a vertex without numeric "
                f"X/Y ({err}); fix or delete that region"
            ) from None
        if len(xy) < 3:
            skipped += 1
            continue
        rr, cc = polygon(xy[:, 1], xy[:, 0], shape=shape)
        mask[rr, cc] = k
    if skipped:
        warnings.warn(f"Aperio XML {path}: skipped {skipped} region(s) with < 3 vertices",
                      stacklevel=2)
    return mask


# --------------------------------------------------------------------------- writers


def _atomic_save(path: Path, im: Image.Image) -> None:
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def write_image_png(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write H x W x 3 uint8 RGB as PNG atomically (temp file + rename)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected H x W x 3 uint8, got {image.shape} {image.dtype}")
    _atomic_save(Path(path), Image.fromarray(image))


def write_mask_png(path: str | os.PathLike[str], mask: np.ndarray) -> None:
    """Write an H x W mask as PNG atomically: uint8 stays 8-bit, anything else 16-bit (I;16)."""
    if mask.ndim != 2:
        raise ValueError(f"expected an H x W mask, got shape {mask.shape}")
    if mask.dtype != np.uint8:
        if mask.min(initial=0) < 0 or mask.max(initial=0) > 65535:
            raise ValueError("mask ids must be in 0..65535 to fit a 16-bit PNG")
        mask = mask.astype(np.uint16)
    _atomic_save(Path(path), Image.fromarray(mask))


def source_summary(src: Source) -> dict[str, Any]:
    """Counts for tables: number of images, pixels and foreground fraction."""
    fg = sum(int((m > 0).sum()) for m in src.masks)
    px = sum(m.size for m in src.masks)
    return {"n_images": len(src), "pixels": px, "foreground_fraction": fg / max(px, 1)}
