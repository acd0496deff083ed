"""Image and slide files that used to crash or read silently wrong (issue #14)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from histofed.cli import app
from histofed.data import slides
from histofed.data.formats import DataFormatError, read_image, read_source
from histofed.data.synthetic import write_synthetic_source

runner = CliRunner()


def _png_with_half_the_rows(path, rgb):
    """A PNG whose compressed data stops after half the rows (an interrupted writer)."""
    h, w = rgb.shape[:2]
    raw = b"".join(b"\x00" + rgb[r].tobytes() for r in range(h // 2))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def test_png_whose_data_stops_early_is_refused_naming_the_file(tmp_path):
    rgb = np.full((40, 30, 3), 200, np.uint8)
    path = _png_with_half_the_rows(tmp_path / "cut.png", rgb)
    with pytest.raises(DataFormatError, match=r"cut\.png.*ends before the last row"):
        read_image(path)
    Image.fromarray(rgb).save(tmp_path / "whole.png")  # the same image, complete, still reads
    assert (read_image(tmp_path / "whole.png") == 200).all()


def test_interlaced_png_is_not_mistaken_for_a_cut_one(tmp_path):
    rgb = (np.random.default_rng(0).random((37, 29, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "adam7.png", interlace=1)
    assert np.array_equal(read_image(tmp_path / "adam7.png"), rgb)


@pytest.mark.parametrize("channels", [1, 3])
def test_12_bit_data_in_a_16_bit_tiff_is_not_read_as_near_black(tmp_path, channels):
    ramp = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)  # 12-bit camera
    data = ramp if channels == 1 else np.stack([ramp] * 3, -1)
    tifffile.imwrite(tmp_path / "cam.tif", data, photometric="minisblack" if channels == 1 else "rgb")
    with pytest.warns(UserWarning, match=r"cam\.tif.*only reach 4095: read as 12-bit"):
        img = read_image(tmp_path / "cam.tif")
    assert img.max() == 255 and img[0, 0, 0] == 0
    full = (ramp.astype(np.uint32) * 16).astype(np.uint16)  # real 16-bit data: x / 257 as before
    tifffile.imwrite(tmp_path / "full.tif", full)
    assert read_image(tmp_path / "full.tif").max() == round(full.max() / 257)


def test_decompression_bomb_names_the_file_size_and_the_way_to_allow_it(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    Image.new("RGB", (64, 64), "white").save(tmp_path / "big.png")
    monkeypatch.setenv("HISTOFED_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(DataFormatError, match=r"big\.png has 64 x 64 = 4096 pixels.*"
                                              r"HISTOFED_MAX_IMAGE_PIXELS=<pixels>"):
        read_image(tmp_path / "big.png")
    monkeypatch.setenv("HISTOFED_MAX_IMAGE_PIXELS", "0")  # 0 = no limit
    assert read_image(tmp_path / "big.png").shape == (64, 64, 3)
    # without the variable, Pillow's own DecompressionBombError becomes the same clear error
    monkeypatch.delenv("HISTOFED_MAX_IMAGE_PIXELS")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataFormatError, match=r"big\.png has 4096 pixels, more than the limit"):
        read_image(tmp_path / "big.png")


def test_decompression_bomb_in_a_source_is_a_clear_cli_error(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 64 x 64 tiles > 2 x 500 pixels
    src = write_synthetic_source(tmp_path, "labA", 2, 64, np.random.default_rng(0))
    result = runner.invoke(app, ["data", "inspect", str(src), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)  # no traceback
    assert "HISTOFED_MAX_IMAGE_PIXELS" in result.output and "Traceback" not in result.output
    with pytest.raises(DataFormatError, match="decompression bombs"):
        read_source(src)


def test_truncated_slide_is_reported_as_truncated_not_as_an_unknown_format(tmp_path):
    from test_slides import write_pyramid

    path = write_pyramid(tmp_path / "slide.svs", np.full((512, 512, 3), 200, np.uint8))
    data = path.read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(slides.SlideError, match=r"cut\.svs is a TIFF-based slide file that is "
                                                r"truncated or corrupt"):
        slides.open_slide(cut)
    png = tmp_path / "photo.png"  # a non-TIFF still gets the unknown-format message
    Image.new("RGB", (8, 8)).save(png)
    with pytest.raises(slides.SlideError, match="not a whole-slide format"):
        slides.open_slide(png)
