"""Whole slides through OpenSlide: synthetic pyramidal TIFFs (run anywhere) + the two real slides."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from histofed.data import slides
from histofed.data.slides import NoTissueError, SlideError

PINK = (200, 80, 160)  # an eosin-like colour: HSV saturation 153 of 255


def write_pyramid(path, rgb, *, mpp=None, levels=3, tile=128):
    """Tiled TIFF, one page per level (each halving the previous): OpenSlide's generic-tiff."""
    kwargs = {}
    with tifffile.TiffWriter(path) as tw:
        level = rgb
        for i in range(levels):
            if mpp is not None:
                res = 1e4 / (mpp * 2**i)  # pixels per centimetre
                kwargs = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
            tw.write(level, tile=(tile, tile), photometric="rgb", compression="zlib",
                     subfiletype=0 if i == 0 else 1, **kwargs)
            level = np.asarray(Image.fromarray(level).reduce(2))
    return path


@pytest.fixture(scope="module")
def block_slide(tmp_path_factory):
    """1024 x 768 white slide, pink block at columns 256..767, rows 128..639; 0.5 um/px."""
    rgb = np.full((768, 1024, 3), 255, np.uint8)  # H x W x 3
    rgb[128:640, 256:768] = PINK
    path = write_pyramid(tmp_path_factory.mktemp("wsi") / "block.tif", rgb, mpp=0.5)
    return path, rgb


@pytest.fixture(scope="module")
def ihc_slide(tmp_path_factory):
    """Real stained tissue (scikit-image's 512 x 512 IHC image) on a 1024 x 1024 white slide."""
    from skimage import data

    rgb = np.full((1024, 1024, 3), 255, np.uint8)
    rgb[256:768, 256:768] = data.immunohistochemistry()
    path = write_pyramid(tmp_path_factory.mktemp("wsi") / "ihc.tif", rgb, mpp=0.25)
    return path, rgb


def test_open_slide_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.svs"):
        slides.open_slide(tmp_path / "nope.svs")
    png = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(png)
    with pytest.raises(SlideError, match=r"photo\.png.*generic tiled"):
        slides.open_slide(png)


def test_tissue_mask_is_the_block(block_slide):
    path, _ = block_slide
    with slides.open_slide(path) as s:
        mask, ds = slides.tissue_mask(s)
    assert ds == 4.0 and mask.shape == (192, 256)  # lowest level: 256 x 192
    # Saturation is 153 in the block (rows 32..159, cols 64..191 at 1/4 scale) and 0 outside;
    # Otsu (~76) is clipped to 40. After the 5 x 5 mean, the pixel just outside an edge sees
    # 10/25 * 153 = 61 > 40 (tissue), the next one 5/25 * 153 = 31 (not), so the mask is the
    # block grown by one pixel, except at each corner, where the outer corner pixel and its two
    # neighbours along the edges see 4/25, 6/25 and 6/25 of the block (24, 37, 37 < 40).
    expected = np.zeros((192, 256), bool)
    expected[31:161, 63:193] = True
    for r, c, dr, dc in [(31, 63, 1, 1), (31, 192, 1, -1), (160, 63, -1, 1), (160, 192, -1, -1)]:
        expected[r, c] = expected[r + dr, c] = expected[r, c + dc] = False
    np.testing.assert_array_equal(mask, expected)


def test_blank_slide_has_no_tissue(tmp_path):
    rng = np.random.default_rng(0)
    rgb = (250 + rng.integers(0, 6, (512, 512, 3))).astype(np.uint8)  # white with noise
    path = write_pyramid(tmp_path / "blank.tif", rgb, levels=2)
    with pytest.raises(NoTissueError, match="blank.tif"):
        slides.tissue_mask(path)
    with pytest.raises(NoTissueError):
        slides.tile_coords(path, 128)


def test_tile_coords_by_hand(block_slide):
    path, _ = block_slide
    with slides.open_slide(path) as s:
        # 128-px tiles fully inside the block: x in 256..640, y in 128..512 -> 16 tiles.
        c = slides.tile_coords(s, 128)
        xs, ys = np.arange(256, 768, 128), np.arange(128, 640, 128)
        expected = np.array([(x, y) for y in ys for x in xs])
        np.testing.assert_array_equal(c, expected)
        assert c.dtype == np.int64 and c.shape == (16, 2)
        # 256-px tiles: (256|512, 0) and (256|512, 512) hold half the block. Tile (256, 0) covers
        # mask rows 0..63, cols 64..127; tissue there: rows 31..63 x 64 cols minus corner (31, 64).
        mask = slides.tissue_mask(s)
        frac = slides.tissue_fractions(*mask, np.array([[256, 0], [256, 256]]), 256)
        np.testing.assert_allclose(frac, [(33 * 64 - 1) / 4096, 1.0])
        half = [[256, 0], [512, 0], [256, 256], [512, 256], [256, 512], [512, 512]]
        assert slides.tile_coords(s, 256, tissue_threshold=0.5, mask=mask).tolist() == half
        assert slides.tile_coords(s, 256, tissue_threshold=0.52).tolist() == [[256, 256], [512, 256]]
        # threshold 0 keeps the whole grid: 4 x 3 tiles, the last row/column inside the slide.
        assert len(slides.tile_coords(s, 256, tissue_threshold=0)) == 12


def test_magnification_picks_level_and_footprint(block_slide):
    path, rgb = block_slide
    with slides.open_slide(path) as s:
        assert slides.slide_mpp(s) == pytest.approx(0.5)
        spec = slides.tile_spec(s, 128, magnification=10)  # 1.0 um/px on a 0.5 um/px scan
        assert (spec.downsample, spec.level, spec.size0, spec.read_size) == (2.0, 1, 256, 128)
        c = slides.tile_coords(s, 128, magnification=10)
        assert c.tolist() == slides.tile_coords(s, 256).tolist()
        # 1.5 um/px: downsample 3 -> read level 1 (2x) at 192 px, resize to 128.
        spec = slides.tile_spec(s, 128, mpp=1.5)
        assert (spec.level, spec.size0, spec.read_size) == (1, 384, 192)
        tile = next(slides.read_tiles(s, [[384, 256]], 128, mpp=1.5))
        assert tile.shape == (128, 128, 3) and (np.abs(tile.astype(int) - PINK) <= 1).all()
        with pytest.raises(SlideError, match="finer than the scan"):
            slides.tile_spec(s, 128, magnification=40)
        with pytest.raises(ValueError, match="not both"):
            slides.tile_spec(s, 128, magnification=10, mpp=1.0)


def test_read_tiles_returns_exact_pixels(ihc_slide):
    path, rgb = ihc_slide
    with slides.open_slide(path) as s:
        coords = np.array([[256, 256], [640, 512]])
        tiles = list(slides.read_tiles(s, coords, 128))
        for (x, y), tile in zip(coords, tiles):
            np.testing.assert_array_equal(tile, rgb[y:y + 128, x:x + 128])
        # Level 1 pixels are the 2 x 2 box average the TIFF stores (no resize on the way).
        level1 = np.asarray(Image.fromarray(rgb).reduce(2))
        tile = next(slides.read_tiles(s, [[256, 256]], 128, mpp=0.5))
        np.testing.assert_array_equal(tile, level1[128:256, 128:256])
        # Outside the slide OpenSlide returns transparent pixels: they must come back white.
        edge = next(slides.read_tiles(s, [[1024 - 64, 0]], 128))
        assert (edge[:, 64:] == 255).all()


def test_real_stained_tissue_is_found(ihc_slide):
    """The IHC image has brown (DAB) epithelium, pale blue stroma and white lumina."""
    path, _ = ihc_slide
    with slides.open_slide(path) as s:
        mask, ds = slides.tissue_mask(s)
        low = slides._to_rgb(s.read_region((0, 0), 2, s.level_dimensions[2]))  # 256 x 256 x 3
    assert ds == 4.0 and mask.shape == (256, 256)
    sat = np.asarray(Image.fromarray(low).convert("HSV"))[..., 1]
    region = np.zeros_like(mask)
    region[64 - 2:192 + 2, 64 - 2:192 + 2] = True  # the pasted image, +2 px of blur
    assert not mask[~region].any()  # nothing on the white glass
    assert mask[sat > 100].mean() > 0.99  # the stained epithelium
    assert 0.5 < mask[64:192, 64:192].mean() < 0.9  # not the white lumina and palest stroma
    # The small round gland (mask rows ~140..190, cols ~125..160) is about 150 x 190 level-0
    # pixels and isolated by pale stroma: a min_area of one 256 x 256 tile drops it.
    strict, _ = slides.tissue_mask(path, min_area=256 * 256)
    assert not strict[140:192, 120:165].any() and mask[140:192, 120:165].mean() > 0.2


def test_pale_tissue_survives_when_tissue_fills_the_slide(tmp_path):
    """Pure Otsu would split pale (saturation 66) from dark (182) tissue here: the cap keeps both."""
    rgb = np.full((512, 512, 3), 255, np.uint8)
    rgb[:256, 128:] = (230, 170, 200)  # pale pink
    rgb[256:, 128:] = (120, 40, 140)  # dark purple
    mask, ds = slides.tissue_mask(write_pyramid(tmp_path / "full.tif", rgb, levels=2))
    assert ds == 2.0
    assert mask[:, 66:].all() and not mask[:, :62].any()


def test_no_metadata_needs_assume_mpp(tmp_path):
    rgb = np.full((512, 512, 3), 255, np.uint8)
    rgb[:256] = PINK
    path = write_pyramid(tmp_path / "nompp.tif", rgb, levels=2)  # no resolution tags
    with slides.open_slide(path) as s:
        assert slides.slide_mpp(s) is None
        with pytest.raises(SlideError, match=r"nompp\.tif.*--assume-mpp"):
            slides.tile_coords(s, 128, magnification=20)
        spec = slides.tile_spec(s, 128, magnification=20, assume_mpp=0.25)
        assert (spec.downsample, spec.level, spec.size0) == (2.0, 1, 256)
        assert slides.tile_coords(s, 128, magnification=20, assume_mpp=0.25).tolist() == [
            [0, 0], [256, 0]]


class MeanColour(torch.nn.Module):
    """B x 3 x H x W -> B x 3 mean colour: features we can compute by hand."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


def test_extract_features_writes_bag(block_slide, tmp_path):
    path, rgb = block_slide
    enc = MeanColour().train()
    out = slides.extract_features(path, enc, tmp_path / "bags" / "block.h5", tile_size=256,
                                  batch_size=4, tissue_threshold=0.5, progress=False)
    assert enc.training  # flag restored
    with h5py.File(out) as f:
        feats, coords = f["features"][()], f["coords"][()]
        assert f.attrs["size0"] == 256
    assert feats.dtype == np.float32 and coords.dtype == np.int64
    assert coords.tolist() == [[256, 0], [512, 0], [256, 256], [512, 256], [256, 512], [512, 512]]
    for (x, y), f in zip(coords, feats):
        np.testing.assert_allclose(f, rgb[y:y + 256, x:x + 256].mean(axis=(0, 1)) / 255, atol=1e-5)
    with pytest.raises(ValueError, match="B x D"):
        slides.extract_features(path, torch.nn.Identity(), tmp_path / "x.h5", tile_size=256,
                                progress=False)
    assert not (tmp_path / "x.h5").exists()


def test_packaged_sample_slide():
    try:
        path = slides.packaged_sample_slide()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    with slides.open_slide(path) as s:
        assert s.dimensions == (2220, 2967)


@pytest.mark.parametrize("name,n_levels,mpp", [
    ("cmu-1-small-region.svs", 1, 0.499),
    ("tcga-cr-7395-01a-01-ts1.svs", 2, None),
])
def test_real_slides(shared_data, name, n_levels, mpp):
    path = shared_data / "wsi" / name
    with slides.open_slide(path) as s:
        assert s.level_count == n_levels
        assert slides.slide_mpp(s) == (pytest.approx(mpp) if mpp else None)
        mask, ds = slides.tissue_mask(s)
        # About a third (CMU, a narrow strip of skin) and two thirds (TCGA, a large section).
        assert 0.25 < mask.mean() < 0.45 if mpp else 0.5 < mask.mean() < 0.75
        # Level-0 tiles always work; 20x works only with metadata (or --assume-mpp).
        coords = slides.tile_coords(s, 256, mask=(mask, ds))
        assert len(coords) > 20
        if mpp is None:
            with pytest.raises(SlideError, match="--assume-mpp"):
                slides.tile_coords(s, 256, magnification=20, mask=(mask, ds))
            coords = slides.tile_coords(s, 256, magnification=10, assume_mpp=0.25, mask=(mask, ds))
            spec = slides.tile_spec(s, 256, magnification=10, assume_mpp=0.25)
            assert spec.level == 1 and spec.read_size == 512  # level 1 (2.0005x) resized to 256
        else:
            assert slides.tile_spec(s, 256, magnification=20).level == 0
        tiles = list(slides.read_tiles(s, coords[:3], 256, magnification=10,
                                       assume_mpp=None if mpp else 0.25))
        # Tissue tiles are stained: mostly saturated, not white glass.
        for t in tiles:
            sat = np.asarray(Image.fromarray(t).convert("HSV"))[..., 1]
            assert t.shape == (256, 256, 3) and (sat > 40).mean() > 0.4


def test_cli_tile_writes_csv_json_png_and_bag(block_slide, tmp_path):
    from typer.testing import CliRunner

    from histofed.cli import app

    path, _ = block_slide
    result = CliRunner().invoke(app, ["data", "tile", str(path), "--out", str(tmp_path),
                                      "--tile-size", "128", "--magnification", "10",
                                      "--extract-features"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "block.tiles.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["x", "y"] and len(rows) == 7
    info = json.loads((tmp_path / "block.tiles.json").read_text())
    assert (info["level"], info["tile_size_level0"], info["n_tiles"]) == (1, 256, 6)
    png = Image.open(tmp_path / "block.tiles.png")
    assert png.size == (1024, 768)
    with h5py.File(tmp_path / "block.h5") as f:
        assert f["features"].shape == (6, 64) and f["coords"].shape == (6, 2)
    bad = CliRunner().invoke(app, ["data", "tile", str(tmp_path / "block.tiles.png"),
                                   "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "OpenSlide cannot open" in bad.output
