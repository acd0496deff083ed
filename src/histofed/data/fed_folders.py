"""``folders``: a hospital's own image/mask folders as a federation, one site per folder.

Each site folder has the layout of every histofed source (see :mod:`histofed.data.formats`)::

    <site>/images/<id>.png|.tif|.tiff|.jpg    RGB image
    <site>/masks/<id>.png|.tif|.tiff          same H x W; 0 = background, > 0 = nucleus

Name the sites one by one, or give a parent folder whose sub-folders are the sites:

    [federation]                               [federation]
    name = "folders"                           name = "folders"
    sites = {site-a = "/data/a",               root = "/data/hospitals"   # sub-folders = sites
             site-b = "/data/b"}

Relative paths are taken under --data-root / $HISTOFED_DATA when given, else the current
folder. Each site's images are split into train/val/test exactly as in nuclei-multisource
(seeded by (seed, site name)), and read with the same readers and errors.

Example:
    >>> fed = build_federation("folders", data_root=None, seed=0,
    ...                        sites={"site-a": "/data/a"})     # doctest: +SKIP
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from histofed.data.fed_nuclei import _SPLIT_DEFAULTS, _client, _options
from histofed.data.federation import (
    Federation,
    register_federation,
    site_name_problem,
    under_data_root,
)
from histofed.data.formats import LAYOUT_HELP, DataFormatError, is_source_dir, read_source

EXAMPLE = ('[federation]\nname = "folders"\nsites = {site-a = "/data/a", site-b = "/data/b"}\n'
           '# or: root = "/data/hospitals"  (one sub-folder per site)')


def _check_name(name: object, where: str) -> str:
    problem = site_name_problem(name)
    if problem is None and "." in str(name):  # a TOML bare key: "a.b" would become a table
        problem = f"{name!r} cannot name a site here: use '-' or '_' instead of '.'"
    if problem:
        raise ValueError(f"federation 'folders': {where}: {problem}")
    return str(name)


def site_folders(sites: Any, root: Any, data_root: Path | None) -> dict[str, Path]:
    """{site name: folder} from the ``sites`` table or the sub-folders of ``root``.

    Raises:
        ValueError: neither or both given, a bad site name, or not a table of paths.
        DataFormatError: a folder that is missing or does not have the source layout.
    """
    if (sites is None) == (root is None):
        raise ValueError("federation 'folders' needs either sites = {name = folder, ...} or "
                         f"root = folder whose sub-folders are the sites, e.g.\n{EXAMPLE}")
    if sites is not None:
        if not isinstance(sites, dict) or not sites:
            raise ValueError(f"federation 'folders': sites = {sites!r} must be a table "
                             f"{{site-name = folder}}, e.g.\n{EXAMPLE}")
        found = {_check_name(k, f"sites key {k!r}"): under_data_root(str(v), data_root)
                 for k, v in sites.items()}
        for name, folder in found.items():
            if not folder.is_dir():
                raise DataFormatError(f"federation 'folders': site {name!r}: folder {folder} "
                                      "does not exist; check the path in [federation].sites")
            if not is_source_dir(folder):
                raise DataFormatError(f"federation 'folders': site {name!r}: {folder} has no "
                                      f"images/ folder; {LAYOUT_HELP}")
        return found
    parent = under_data_root(str(root), data_root)
    if not parent.is_dir():
        raise DataFormatError(f"federation 'folders': root = {parent} does not exist; give the "
                              "folder that holds one sub-folder per site")
    subdirs = [p for p in sorted(parent.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    found = {_check_name(p.name, f"sub-folder {p}"): p for p in subdirs if is_source_dir(p)}
    skipped = [p.name for p in subdirs if not is_source_dir(p)]
    if not found:
        raise DataFormatError(
            f"federation 'folders': no site under {parent} (a site is a sub-folder with "
            f"images/ and masks/); found {[p.name for p in subdirs] or 'no sub-folders'}. "
            f"{LAYOUT_HELP}")
    if skipped:
        warnings.warn(f"federation 'folders': sub-folders of {parent} without images/ are not "
                      f"sites and are ignored: {skipped}", stacklevel=3)
    return found


@register_federation(
    "folders",
    task="segmentation",
    needs_data_root=False,
    description="your own image/mask folders, one site each: sites = {site-a = \"/data/a\", ...}"
    " or root = a folder whose sub-folders are the sites",
)
def build_folders(*, data_root: Path | None, seed: int, **options: Any) -> Federation:
    """Build one segmentation client per site folder (module docstring).

    Options: sites (table name -> folder) or root (folder of site folders), plus
    test_fraction=0.34, val_fraction=0.0, crop_size=128, crops_per_image=8.
    """
    t0 = time.perf_counter()
    opts = _options("folders", options, {"sites": None, "root": None, **_SPLIT_DEFAULTS})
    folders = site_folders(opts["sites"], opts["root"], data_root)
    clients = []
    for name, folder in folders.items():
        src = read_source(folder)
        clients.append(_client(name, src.images, src.masks, src.ids, seed=seed, opts=opts,
                               info={"source": "folders", "root": str(folder)}))
    return Federation(
        name="folders",
        task="segmentation",
        clients=clients,
        num_classes=1,
        description=f"your image/mask folders: {len(clients)} site(s)",
        info={"seed": seed, "options": opts, "sites": {n: str(p) for n, p in folders.items()},
              "build_seconds": round(time.perf_counter() - t0, 3)},
    )
