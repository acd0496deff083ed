"""Download public pathology datasets from upstream and convert them into histofed's layout.

``fetch("monuseg", "data")`` downloads the archive into ``data/downloads/monuseg/`` and writes
``data/nuclei/monuseg/{images,masks}/<id>.png`` + ``meta.csv``, the layout ``shared/data`` and
:mod:`histofed.data.formats` use, so ``--data-root data`` works like ``--data-root ../shared/data``.

Downloads use only the standard library: HTTP Range requests resume a partial ``.part`` file,
SHA-256 is checked when the registry pins one (and printed when it does not, so you can pin it),
the finished file is renamed into place atomically, and a file already present with the right
checksum is not fetched again. Each dataset lists mirrors, tried in order. Upstream URLs move:
when every mirror fails, download the file in a browser and pass it with ``archive=``.

Example:
    >>> sorted(DATASETS)
    ['cmu-small-region', 'crchisto', 'monuseg']
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histofed import __version__
from histofed.registry import Registry

Log = Callable[[str], None]


class DownloadError(RuntimeError):
    """A download failed; the message names the URL, the reason and what to do."""


class ChecksumError(DownloadError):
    """A downloaded file's SHA-256 differs from the pinned one (the file was deleted)."""


@dataclass(frozen=True)
class Download:
    """One downloadable file. ``archive`` is "zip" or None (a single file used as is)."""

    url: str
    filename: str
    sha256: str | None = None
    size: int | None = None  # bytes, when known; only used for the progress bar
    archive: str | None = "zip"
    note: str = ""


@dataclass(frozen=True)
class Dataset:
    """A public dataset: where it comes from and how it becomes the standard layout.

    ``downloads`` are alternatives (mirrors) tried in order. ``convert(file, out)`` turns the
    downloaded file into the layout under the empty folder ``out`` and returns summary counts.
    """

    name: str
    subdir: str
    title: str
    homepage: str
    licence: str
    citation: str
    downloads: tuple[Download, ...]
    convert: Callable[[Path, Path], dict[str, Any]]


DATASETS: Registry[Dataset] = Registry("dataset")


def register_dataset(dataset: Dataset) -> Dataset:
    DATASETS.add(dataset.name, dataset)
    return dataset


# --------------------------------------------------------------------------- download


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def _open(url: str, offset: int, timeout: float) -> Any:
    headers = {"User-Agent": f"histofed/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    # build_opener per call: honours the current *_proxy environment and follows redirects.
    return urllib.request.build_opener().open(urllib.request.Request(url, headers=headers),
                                              timeout=timeout)


def download(
    url: str,
    path: str | Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    chunk_size: int = 1 << 16,
    log: Log = print,
) -> str:
    """Download ``url`` to ``path``, resuming ``path.part`` if an earlier attempt was cut off.

    Args:
        url: http(s) URL.
        path: destination file; the data streams into ``<path>.part`` and is renamed at the end.
        sha256: expected hex digest, or None to accept any content (the digest is returned).
        size: expected size in bytes for the progress bar when the server sends no length.
        progress: show a tqdm progress bar.
        timeout: seconds to wait for the server (per connection and per read).
        chunk_size: bytes per read.
        log: where to write one-line status messages.

    Returns:
        The file's hex SHA-256.

    Raises:
        DownloadError: HTTP error, unreachable host, or the transfer stopped early (the
            ``.part`` file is kept: call again to resume).
        ChecksumError: the finished file's SHA-256 is not ``sha256`` (the file is deleted).
    """
    from tqdm.auto import tqdm

    path = Path(path)
    part = path.with_name(path.name + ".part")
    if path.exists():
        digest = sha256_file(path)
        if sha256 is None or digest == sha256:
            log(f"{path} already present (sha256 {digest[:12]}...), not downloading again")
            return digest
        log(f"{path} has sha256 {digest[:12]}..., expected {sha256[:12]}...: downloading again")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, offset, timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # the .part is already as long as the file (or longer)
            log(f"server refused to resume {part} (HTTP 416); starting over")
            part.unlink()
            return download(url, path, sha256=sha256, size=size, progress=progress,
                            timeout=timeout, chunk_size=chunk_size, log=log)
        raise DownloadError(
            f"{url}: HTTP {err.code} {err.reason}. The file may have moved: check the dataset's "
            "homepage, or download it in a browser and pass it with --archive FILE"
        ) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(
            f"cannot reach {url}: {reason}. Check the network and proxy settings "
            "(https_proxy), then run the same command again"
        ) from None
    with resp:
        if offset and resp.status == 206:
            start = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            if not start or int(start.group(1)) != offset:
                raise DownloadError(f"{url}: server resumed at the wrong byte "
                                    f"({resp.headers.get('Content-Range')!r}); delete {part}")
            log(f"resuming {path.name} at byte {offset:,}")
        elif offset:  # 200: the server ignores Range, so the whole file comes again
            log(f"{url} does not support resuming; downloading {path.name} from the start")
            offset = 0
        length = resp.headers.get("Content-Length")
        expected = offset + int(length) if length and length.isdigit() else None
        h = hashlib.sha256()
        if offset:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        received = offset
        try:
            with open(part, "ab" if offset else "wb") as f, tqdm(
                total=expected or size, initial=offset, unit="B", unit_scale=True,
                unit_divisor=1024, desc=path.name, disable=not progress, leave=False,
            ) as bar:
                while chunk := resp.read(chunk_size):
                    f.write(chunk)
                    h.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        except (http.client.IncompleteRead, OSError) as err:
            received = part.stat().st_size
            raise DownloadError(
                f"download of {url} stopped after {received:,} bytes ({err.__class__.__name__}); "
                f"the partial file {part} is kept: run the same command again to resume"
            ) from None
    if expected is not None and received < expected:
        raise DownloadError(
            f"download of {url} stopped after {received:,} of {expected:,} bytes; the partial "
            f"file {part} is kept: run the same command again to resume"
        )
    digest = h.hexdigest()
    if sha256 is not None and digest != sha256:
        part.unlink()
        raise ChecksumError(
            f"{url}: SHA-256 of the download is {digest}, expected {sha256}; the file was "
            "deleted. The upstream file changed or the transfer was corrupted: try again, and "
            "if it persists report it (or pass a file you trust with --archive FILE)"
        )
    os.replace(part, path)
    return digest


def _looks_like_html(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html"))


# --------------------------------------------------------------------------- fetch


def fetch(
    dataset: str | Dataset,
    dest: str | Path,
    *,
    archive: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    timeout: float = 60.0,
    log: Log = print,
) -> Path:
    """Download (or take ``archive``) and convert one dataset into ``dest/<subdir>``.

    Idempotent: a converted folder with its ``fetch.json`` is left alone (``force`` redoes
    it), and a download already present with a good checksum is reused.

    Args:
        dataset: a registered name (see ``DATASETS``) or a :class:`Dataset`.
        dest: data root; the dataset lands in ``dest/<dataset.subdir>``, downloads in
            ``dest/downloads/<name>/``.
        archive: a file you downloaded yourself, used instead of downloading.
        force: convert again even when the folder is already there.
        progress: show progress bars.
        timeout: seconds per connection/read.
        log: where to write status lines.

    Returns:
        The converted folder.

    Raises:
        DownloadError: every mirror failed (the message lists why, and the manual route).
        FileExistsError: the target folder exists but was not made by ``fetch``.
    """
    ds = DATASETS.get(dataset) if isinstance(dataset, str) else dataset
    dest = Path(dest)
    out = dest / ds.subdir
    marker = out / "fetch.json"
    if out.exists() and not force:
        if marker.is_file():
            log(f"{ds.name}: {out} is already there (remove it or pass --force to redo)")
            return out
        raise FileExistsError(
            f"{out} exists but was not made by `histofed data fetch` (no fetch.json); "
            "choose another --dest or pass --force to replace it"
        )
    if archive is not None:
        source, path = None, Path(archive)
        if not path.is_file():
            raise FileNotFoundError(f"--archive {path} does not exist")
        digest = sha256_file(path)
    else:
        source, path, digest = _download_any(ds, dest / "downloads" / ds.name, progress,
                                             timeout, log)
    if source is None or source.sha256 is None:
        log(f"{ds.name}: sha256 of {path.name} is {digest} (not pinned in histofed; "
            "compare it with the upstream's if it publishes one)")
    log(f"{ds.name}: converting {path.name} into {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        summary = ds.convert(path, tmp)
        provenance = {"dataset": ds.name, "title": ds.title, "homepage": ds.homepage,
                      "licence": ds.licence, "citation": ds.citation,
                      "source": source.url if source else str(path.resolve()),
                      "file": path.name, "sha256": digest, "histofed": __version__, **summary}
        (tmp / "fetch.json").write_text(json.dumps(provenance, indent=2) + "\n")
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp (and mkstemp, for files) make them private
        for folder, dirs, files in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(folder, d), 0o777 & ~umask)
            for f in files:
                os.chmod(os.path.join(folder, f), 0o666 & ~umask)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"{ds.name}: done: {out} ({', '.join(f'{k} {v}' for k, v in summary.items())})")
    log(f"{ds.name}: licence: {ds.licence}. Cite: {ds.citation}")
    return out


def _download_any(ds: Dataset, folder: Path, progress: bool, timeout: float,
                  log: Log) -> tuple[Download, Path, str]:
    failures = []
    for source in ds.downloads:
        path = folder / source.filename
        try:
            log(f"{ds.name}: {source.url}")
            digest = download(source.url, path, sha256=source.sha256, size=source.size,
                              progress=progress, timeout=timeout, log=log)
        except DownloadError as err:
            failures.append(str(err))
            log(f"{ds.name}: failed: {err}")
            continue
        if source.archive == "zip" and not zipfile.is_zipfile(path):
            html = _looks_like_html(path)
            path.unlink()
            failures.append(f"{source.url} gave " + (
                "an HTML page, not the archive (the host may want a browser or a sign-in)"
                if html else "a file that is not a zip archive"))
            log(f"{ds.name}: failed: {failures[-1]}")
            continue
        return source, path, digest
    raise DownloadError(
        f"could not download {ds.name!r} from any of its {len(ds.downloads)} URL(s):\n  - "
        + "\n  - ".join(failures)
        + f"\nDownload it by hand from {ds.homepage} and run: histofed data fetch {ds.name} "
        f"--archive FILE"
    )


# --------------------------------------------------------------------------- converters


def _members(z: zipfile.ZipFile, pattern: str) -> dict[str, str]:
    """``{match.group(1): member}`` for zip members matching ``pattern`` (macOS junk skipped)."""
    found: dict[str, str] = {}
    for name in z.namelist():
        m = re.search(pattern, name)
        if m and "__MACOSX/" not in name and not name.endswith("/"):
            found.setdefault(m.group(1), name)
    return found


def _extract(z: zipfile.ZipFile, member: str, folder: Path) -> Path:
    """Copy one member to ``folder`` under its base name (never trusting the member's path)."""
    target = folder / Path(member).name
    with z.open(member) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return target


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# The organ of each MoNuSeg 2018 training image, from the challenge's training table
# (breast 6, kidney 6, liver 6, prostate 6, bladder 2, colon 2, stomach 2).
MONUSEG_ORGANS: dict[str, tuple[str, ...]] = {
    "breast": ("A7-A13E", "A7-A13F", "AR-A1AK", "AR-A1AS", "E2-A1B5", "E2-A14V"),
    "kidney": ("B0-5711", "HE-7128", "HE-7129", "HE-7130", "B0-5710", "B0-5698"),
    "liver": ("18-5592", "38-6178", "49-4488", "50-5931", "21-5784", "21-5786"),
    "prostate": ("G9-6336", "G9-6348", "G9-6356", "G9-6363", "CH-5767", "G9-6362"),
    "bladder": ("DK-A2I6", "G2-A2EK"),
    "colon": ("AY-A8YK", "NH-A8F7"),
    "stomach": ("KB-A93J", "RD-A8N9"),
}


def convert_monuseg(archive: Path, out: Path) -> dict[str, Any]:
    """MoNuSeg training zip -> ``images/<id>.png`` (RGB), ``masks/<id>.png``, ``meta.csv``.

    Reads ``.../Tissue Images/<id>.tif`` (or ``Tissue_Images``) and rasterises
    ``.../Annotations/<id>.xml`` into a 16-bit instance mask (ids 1..N in file order, see
    :func:`histofed.data.formats.read_aperio_xml`). Without an XML, a ``Binary_masks/<id>.png``
    (the GitHub mirror's) becomes a binary 0/255 mask. ``meta.csv``: ``id,organ,site,mask``.
    """
    import numpy as np

    from histofed.data.formats import (DataFormatError, read_aperio_xml, read_image,
                                       read_mask, write_image_png, write_mask_png)

    with zipfile.ZipFile(archive) as z:
        images = _members(z, r"Tissue[ _][Ii]mages/([^/]+)\.tiff?$")
        xmls = _members(z, r"Training[^/]*/(?:[^/]+/)*Annotations/([^/]+)\.xml$")
        binary = _members(z, r"Binary_masks/([^/]+)\.png$")
        if not images:
            raise DataFormatError(f"{archive}: no 'Tissue Images/*.tif' inside; is it the "
                                  "MoNuSeg training archive?")
        organ_of = {code: organ for organ, codes in MONUSEG_ORGANS.items() for code in codes}
        rows = []
        with tempfile.TemporaryDirectory(dir=out) as scratch:
            for image_id in sorted(images):
                image = read_image(_extract(z, images[image_id], Path(scratch)))  # H x W x 3
                if image_id in xmls:
                    mask = read_aperio_xml(_extract(z, xmls[image_id], Path(scratch)),
                                           image.shape[:2])  # H x W uint16
                    kind = "instance"
                elif image_id in binary:
                    m = read_mask(_extract(z, binary[image_id], Path(scratch)))
                    mask, kind = np.where(m > 0, 255, 0).astype(np.uint8), "binary"
                else:
                    raise DataFormatError(f"{archive}: image {image_id} has neither "
                                          "Annotations/<id>.xml nor Binary_masks/<id>.png")
                write_image_png(out / "images" / f"{image_id}.png", image)
                write_mask_png(out / "masks" / f"{image_id}.png", mask)
                site = image_id[5:7] if image_id.startswith("TCGA-") else ""
                rows.append([image_id, organ_of.get(image_id[5:12], ""), site, kind])
    _write_csv(out / "meta.csv", ["id", "organ", "site", "mask"], rows)
    return {"images": len(rows)}


CRCHISTO_CLASSES = ("epithelial", "fibroblast", "inflammatory", "others")
# The train/validation/test split of github.com/zhuyiche/sfcn-opi (folders cls_and_det/<split>/),
# the split shared/data/crchisto uses; every other image is "train". The official zip has none.
CRCHISTO_SPLIT = {
    "validation": (4, 7, 8, 16, 25, 43, 60, 61, 86, 87),
    "test": (5, 11, 15, 22, 29, 35, 36, 37, 41, 45, 51, 58, 62, 67, 78, 79, 88, 90, 95, 96),
}


def convert_crchisto(archive: Path, out: Path) -> dict[str, Any]:
    """CRCHistoPhenotypes zip -> ``images/imgN.png``, ``points/imgN.csv``, ``split.csv``,
    ``class_counts.csv`` (the layout of ``shared/data/crchisto``).

    Works on the official zip (``Classification/imgN/``, ``Detection/imgN/``) and on the
    sfcn-opi mirror (``cls_and_det/{train,validation,test}/imgN/``). ``points/imgN.csv`` has
    ``x,y,label`` (x = column, y = row, upstream values unchanged: MATLAB 1-based), the class
    files concatenated in the order of ``CRCHISTO_CLASSES``.
    """
    import io

    import numpy as np
    import scipy.io
    from PIL import Image

    from histofed.data.formats import DataFormatError, write_image_png

    def points(z: zipfile.ZipFile, member: str | None) -> np.ndarray:
        if member is None:
            return np.zeros((0, 2))
        mat = scipy.io.loadmat(io.BytesIO(z.read(member)))
        return np.asarray(mat.get("detection", np.zeros((0, 2))), np.float64).reshape(-1, 2)

    with zipfile.ZipFile(archive) as z:
        names = [n for n in z.namelist() if "__MACOSX/" not in n]
        bmps: dict[int, str] = {}
        for n in names:  # prefer Classification/ over Detection/ (same pixels upstream)
            m = re.search(r"(?:^|/)img(\d+)/img\1\.bmp$", n)
            if m and (int(m.group(1)) not in bmps or "Classification/" in n):
                bmps[int(m.group(1))] = n
        if not bmps:
            raise DataFormatError(f"{archive}: no imgN/imgN.bmp inside; is it the "
                                  "CRCHistoPhenotypes archive?")
        mats = {(int(m.group(1)), m.group(2)): n for n in names
                if (m := re.search(r"img(\d+)_(\w+)\.mat$", n))}
        splits, counts = [], []
        (out / "points").mkdir(parents=True)
        for k in sorted(bmps):
            image_id = f"img{k}"
            with Image.open(io.BytesIO(z.read(bmps[k]))) as im:
                write_image_png(out / "images" / f"{image_id}.png", np.asarray(im.convert("RGB")))
            per_class = [points(z, mats.get((k, c))) for c in CRCHISTO_CLASSES]
            rows = [[float(x), float(y), c] for c, xy in zip(CRCHISTO_CLASSES, per_class)
                    for x, y in xy]
            _write_csv(out / "points" / f"{image_id}.csv", ["x", "y", "label"], rows)
            folder = re.search(r"/(train|validation|test)/", "/" + bmps[k])
            split = folder.group(1) if folder else next(
                (s for s, ids in CRCHISTO_SPLIT.items() if k in ids), "train")
            n_class = [len(xy) for xy in per_class]
            n_det = len(points(z, mats.get((k, "detection"))))
            splits.append([image_id, split])
            counts.append([image_id, split, *n_class, sum(n_class), n_det])
    _write_csv(out / "split.csv", ["id", "split"], splits)
    total = [sum(r[i] for r in counts) for i in range(2, 8)]
    _write_csv(out / "class_counts.csv",
               ["id", "split", *CRCHISTO_CLASSES, "total_labelled", "detection_points_upstream"],
               [*counts, ["ALL", "all", *total]])
    return {"images": len(splits), "labelled_points": total[4]}


def convert_single_slide(file: Path, out: Path) -> dict[str, Any]:
    """A downloaded slide file -> ``out/<name>`` (hard link, or copy), checked with OpenSlide."""
    from histofed.data.slides import open_slide

    target = out / file.name.lower()
    try:
        os.link(file, target)
    except OSError:
        shutil.copy2(file, target)
    with open_slide(target) as slide:
        width, height = slide.dimensions
        levels = slide.level_count
    return {"slides": 1, "width": width, "height": height, "levels": levels}


# --------------------------------------------------------------------------- registry

register_dataset(Dataset(
    name="monuseg",
    subdir="nuclei/monuseg",
    title="MoNuSeg 2018 training set: 30 H&E tiles (1000 x 1000, 40x, 7 organs) with nuclei",
    homepage="https://monuseg.grand-challenge.org/Data/",
    licence="CC BY-NC-SA 4.0 (non-commercial, share-alike)",
    citation="Kumar N. et al., IEEE TMI 36(7):1550-1560, 2017; IEEE TMI 39(5):1380-1391, 2020",
    downloads=(
        # The official Google Drive file ("MoNuSeg 2018 Training Data.zip"). torch_em pins
        # sha256 25d3d318...ce742 for it; we could not check that here, so it stays unpinned.
        Download("https://drive.google.com/uc?export=download&id=1ZgqFJomqQGNnsx7w7QBzQQMVA16lbVCA",
                 "MoNuSeg 2018 Training Data.zip", note="official (Google Drive)"),
        # GitHub mirror with the same images and XML annotations (the source of shared/data).
        Download("https://github.com/ykrmm/monuseg/archive/"
                 "93a696d5b608b963ff7083a059c93d5addbd985a.zip",
                 "monuseg-ykrmm-93a696d.zip", note="GitHub mirror (whole repository)"),
    ),
    convert=convert_monuseg,
))

register_dataset(Dataset(
    name="crchisto",
    subdir="crchisto",
    title="CRCHistoPhenotypes 2016-04-28: 100 colon H&E tiles (500 x 500), 22,444 labelled nuclei",
    homepage="https://warwick.ac.uk/fac/cross_fac/tia/data/crchistolabelednucleihe/",
    licence="research purposes only (upstream Readme)",
    citation="Sirinukunwattana K. et al., IEEE TMI 35(5):1196-1206, 2016",
    downloads=(
        Download("https://warwick.ac.uk/fac/cross_fac/tia/data/crchistolabelednucleihe/"
                 "crchistophenotypes_2016_04_28.zip", "crchistophenotypes_2016_04_28.zip",
                 note="official (Warwick TIA)"),
        Download("https://github.com/zhuyiche/sfcn-opi/archive/"
                 "15a25c8039eeabacef72d43612da2b33c996dd85.zip", "crchisto-sfcn-opi-15a25c8.zip",
                 note="GitHub mirror (whole repository, with the train/validation/test split)"),
    ),
    convert=convert_crchisto,
))

register_dataset(Dataset(
    name="cmu-small-region",
    subdir="wsi/cmu-small-region",
    title="OpenSlide test slide CMU-1-Small-Region.svs: Aperio, 2220 x 2967, 20x, 1.9 MB",
    homepage="https://openslide.cs.cmu.edu/download/openslide-testdata/",
    licence="CC0 1.0 (public domain dedication)",
    citation="OpenSlide test data, Carnegie Mellon University",
    downloads=(
        Download("https://openslide.cs.cmu.edu/download/openslide-testdata/Aperio/"
                 "CMU-1-Small-Region.svs", "CMU-1-Small-Region.svs", archive=None,
                 note="official (OpenSlide test data)"),
    ),
    convert=convert_single_slide,
))
