"""Image/mask readers, source folders and Aperio XML, each bad input with its own test."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from histofed.data.formats import (
    DataFormatError,
    read_aperio_xml,
    read_image,
    read_mask,
    read_source,
    write_image_png,
    write_mask_png,
)


def _rgb(h: int = 6, w: int = 5) -> np.ndarray:
    return (np.arange(h * w * 3).reshape(h, w, 3) % 251).astype(np.uint8)


# ----------------------------------------------------------------------------- images


def test_rgb_png_and_jpeg_roundtrip(tmp_path: Path) -> None:
    img = _rgb()
    write_image_png(tmp_path / "a.png", img)
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and np.array_equal(out, img)
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(tmp_path / "b.jpg", quality=95)
    jpg = read_image(tmp_path / "b.jpg")
    assert jpg.shape == (8, 8, 3) and abs(int(jpg.mean()) - 128) <= 2


def test_rgba_opaque_drops_alpha_without_warning(tmp_path: Path) -> None:
    rgba = np.dstack([_rgb(), np.full((6, 5), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = read_image(tmp_path / "a.png")
    assert np.array_equal(out, _rgb())


def test_rgba_transparent_is_composited_on_white(tmp_path: Path) -> None:
    px = np.array([[[100, 0, 255, 128], [10, 20, 30, 0]]], np.uint8)  # 1 x 2 x 4
    Image.fromarray(px, "RGBA").save(tmp_path / "t.png")
    with pytest.warns(UserWarning, match="t.png"):
        out = read_image(tmp_path / "t.png")
    # 100*128/255 + 255*127/255 = 50.2 + 127 -> 177; 0 -> 127; 255 -> 255; alpha 0 -> white
    assert out.tolist() == [[[177, 127, 255], [255, 255, 255]]]


def test_grayscale_becomes_three_channels(tmp_path: Path) -> None:
    gray = np.array([[0, 50], [200, 255]], np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (2, 2, 3) and (out == gray[..., None]).all()


def test_16bit_gray_png_and_rgb_tiff_scale_by_257(tmp_path: Path) -> None:
    vals = np.array([[0, 257], [32896, 65535]], np.uint16)  # = 257 * [0, 1, 128, 255]
    Image.fromarray(vals).save(tmp_path / "g16.png")
    assert read_image(tmp_path / "g16.png")[..., 0].tolist() == [[0, 1], [128, 255]]
    rgb16 = np.dstack([vals, vals[::-1], np.full((2, 2), 65535, np.uint16)])
    tifffile.imwrite(tmp_path / "c16.tif", rgb16, photometric="rgb")
    out = read_image(tmp_path / "c16.tif")
    assert out.dtype == np.uint8
    assert out[..., 0].tolist() == [[0, 1], [128, 255]]
    assert out[..., 1].tolist() == [[128, 255], [0, 1]] and (out[..., 2] == 255).all()


def test_16bit_rgb_png_is_reduced_to_high_byte_by_pillow(tmp_path: Path) -> None:
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    px = np.array([[[0, 257, 65535], [32896, 300, 65280]]], ">u2")  # 1 x 2 x 3, 16-bit RGB
    raw = b"".join(b"\x00" + row.tobytes() for row in px)  # filter byte 0 per row
    ihdr = struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0)  # W, H, depth 16, colour type RGB
    (tmp_path / "rgb16.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                                         + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    # x >> 8: 300 -> 1 and 65280 -> 255 (x / 257 would give 1 and 254); documented behaviour
    assert read_image(tmp_path / "rgb16.png").tolist() == [[[0, 1, 255], [128, 1, 255]]]


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_corrupt_truncated_and_missing_images(tmp_path: Path) -> None:
    (tmp_path / "junk.png").write_bytes(b"this is not a png")
    with pytest.raises(DataFormatError, match=r"junk\.png.*Fix"):
        read_image(tmp_path / "junk.png")
    write_image_png(tmp_path / "full.png", np.random.default_rng(0).integers(
        0, 255, (64, 64, 3), dtype=np.uint8))
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match=r"cut\.png"):
        read_image(tmp_path / "cut.png")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(DataFormatError, match=r"bad\.tif"):
        read_image(tmp_path / "bad.tif")
    with pytest.raises(DataFormatError, match="does not exist"):
        read_image(tmp_path / "nope.png")
    assert issubclass(DataFormatError, ValueError)


# ----------------------------------------------------------------------------- masks


def test_masks_keep_dtype_and_values(tmp_path: Path) -> None:
    inst = np.array([[0, 1, 1], [300, 0, 2]], np.uint16)
    write_mask_png(tmp_path / "i.png", inst)
    out = read_mask(tmp_path / "i.png", (2, 3, 3))
    assert out.dtype == np.uint16 and np.array_equal(out, inst)
    binary = np.array([[0, 255], [255, 0]], np.uint8)
    write_mask_png(tmp_path / "b.png", binary)
    out = read_mask(tmp_path / "b.png")
    assert out.dtype == np.uint8 and np.array_equal(out, binary)
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no temp files
    pal = Image.fromarray(np.array([[0, 1], [2, 0]], np.uint8), "L").convert("P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    pal.save(tmp_path / "p.png")
    assert read_mask(tmp_path / "p.png").tolist() == [[0, 1], [2, 0]]  # indices, not colours


def test_mask_wrong_size_names_both_files(tmp_path: Path) -> None:
    write_mask_png(tmp_path / "m.png", np.zeros((4, 7), np.uint8))
    with pytest.raises(DataFormatError, match=r"m\.png is 7x4.*x\.png is 5x6"):
        read_mask(tmp_path / "m.png", (6, 5, 3), image_path=tmp_path / "x.png")


def test_colour_mask_rejected(tmp_path: Path) -> None:
    Image.fromarray(_rgb()).save(tmp_path / "c.png")
    with pytest.raises(DataFormatError, match="colour"):
        read_mask(tmp_path / "c.png")


# ----------------------------------------------------------------------------- sources


def _source(root: Path, ids: list[str], size: tuple[int, int] = (6, 5)) -> Path:
    for i, image_id in enumerate(ids):
        write_image_png(root / "images" / f"{image_id}.png", _rgb(*size))
        mask = np.zeros(size, np.uint16)
        mask[1:3, 1:3] = i + 1
        write_mask_png(root / "masks" / f"{image_id}.png", mask)
    return root


def test_read_source_with_meta(tmp_path: Path) -> None:
    root = _source(tmp_path / "lab", ["b", "a"])
    (root / "meta.csv").write_text("id,organ\na,kidney\n")
    src = read_source(root)
    assert src.name == "lab" and src.ids == ["a", "b"] and len(src) == 2
    assert src.meta == [{"id": "a", "organ": "kidney"}, {}]
    assert src.images[0].shape == (6, 5, 3)
    assert src.masks[0].max() == 2 and src.masks[1].max() == 1  # paired by id, not file order


def test_meta_without_id_column(tmp_path: Path) -> None:
    root = _source(tmp_path / "lab", ["a"])
    (root / "meta.csv").write_text("name,organ\na,kidney\n")
    with pytest.raises(DataFormatError, match=r"meta\.csv has no 'id' column"):
        read_source(root)


def test_empty_or_missing_images_folder(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="no images/ folder.*expected layout"):
        read_source(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(DataFormatError, match="holds no"):
        read_source(tmp_path)


def test_image_without_mask_says_where_the_mask_should_be(tmp_path: Path) -> None:
    root = _source(tmp_path, ["a"])
    write_image_png(root / "images" / "lonely.png", _rgb())
    with pytest.raises(DataFormatError, match=r"lonely\.png.*masks/lonely\.png"):
        read_source(root)


def test_mask_without_image_warns(tmp_path: Path) -> None:
    root = _source(tmp_path, ["a"])
    write_mask_png(root / "masks" / "orphan.png", np.zeros((6, 5), np.uint8))
    with pytest.warns(UserWarning, match=r"orphan\.png"):
        src = read_source(root)
    assert src.ids == ["a"]


def test_source_size_mismatch_and_duplicates(tmp_path: Path) -> None:
    root = _source(tmp_path / "s1", ["a"])
    write_mask_png(root / "masks" / "a.png", np.zeros((3, 3), np.uint8))
    with pytest.raises(DataFormatError, match=r"masks/a\.png is 3x3.*images/a\.png is 5x6"):
        read_source(root)
    root = _source(tmp_path / "s2", ["a"])
    tifffile.imwrite(root / "images" / "a.tif", _rgb(), photometric="rgb")
    with pytest.raises(DataFormatError, match="two image files for id 'a'"):
        read_source(root)


def test_corrupt_image_in_source_names_file(tmp_path: Path) -> None:
    root = _source(tmp_path, ["a", "b"])
    (root / "images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(DataFormatError, match=r"images/b\.png"):
        read_source(root)


def test_every_real_source_reads_fast(shared_data: Path) -> None:
    expected = {"monuseg": 30, "cpm15": 15, "cryonuseg": 2}
    t = time.perf_counter()
    sources = {name: read_source(shared_data / "nuclei" / name) for name in expected}
    seconds = time.perf_counter() - t
    print(f"read all {sum(expected.values())} real images + masks: {seconds:.2f} s")
    assert seconds < 20
    for name, n in expected.items():
        src = sources[name]
        assert len(src) == n and all(row for row in src.meta)
        for img, mask in zip(src.images, src.masks):
            assert img.dtype == np.uint8 and img.shape[:2] == mask.shape
    assert {m.dtype for m in sources["monuseg"].masks} == {np.dtype(np.uint8)}
    assert all(set(np.unique(m)) == {0, 255} for m in sources["monuseg"].masks)
    assert sum(int(m.max()) for m in sources["cpm15"].masks) == 2905  # README's nucleus count
    for m, row in zip(sources["cpm15"].masks, sources["cpm15"].meta):
        assert m.shape == (int(row["height"]), int(row["width"]))


# ----------------------------------------------------------------------------- Aperio XML


def _xml(path: Path, regions: list[list[tuple[float, float]]]) -> Path:
    body = "".join(
        f'<Region Id="{k}"><Vertices>'
        + "".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in verts)
        + "</Vertices></Region>"
        for k, verts in enumerate(regions, start=1)
    )
    path.write_text(
        '<?xml version="1.0"?><Annotations MicronsPerPixel="0.25"><Annotation Id="1">'
        f"<Regions>{body}</Regions></Annotation></Annotations>"
    )
    return path


def test_aperio_rectangle_and_triangle_pixel_counts(tmp_path: Path) -> None:
    rect = [(2, 1), (6, 1), (6, 4), (2, 4)]  # x 2..6, y 1..4 inclusive -> 5 x 4 = 20 px
    tri = [(0, 10), (4, 10), (0, 14)]  # legs of 4 px: 5 + 4 + 3 + 2 + 1 = 15 px
    mask = read_aperio_xml(_xml(tmp_path / "a.xml", [rect, tri]), (20, 12))
    assert mask.dtype == np.uint16 and mask.shape == (20, 12)
    assert (mask == 1).sum() == 20 and (mask == 2).sum() == 15
    assert (mask[1:5, 2:7] == 1).all()  # rows = Y, cols = X
    assert mask[10].tolist()[:6] == [2, 2, 2, 2, 2, 0] and mask[14, 0] == 2


def test_aperio_later_region_overwrites(tmp_path: Path) -> None:
    big = [(0, 0), (5, 0), (5, 5), (0, 5)]  # 36 px
    small = [(1, 1), (2, 1), (2, 2), (1, 2)]  # 4 px inside
    mask = read_aperio_xml(_xml(tmp_path / "o.xml", [big, small]), (8, 8))
    assert (mask == 1).sum() == 32 and (mask == 2).sum() == 4


def test_aperio_degenerate_region_skipped_with_warning(tmp_path: Path) -> None:
    path = _xml(tmp_path / "d.xml", [[(1, 1), (3, 3)], [(0, 0), (2, 0), (2, 2), (0, 2)]])
    with pytest.warns(UserWarning, match="skipped 1 region"):
        mask = read_aperio_xml(path, (5, 5))
    assert (mask == 2).sum() == 9 and (mask == 1).sum() == 0


def test_aperio_bad_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.xml"
    empty.write_text('<Annotations><Annotation Id="1"><Regions/></Annotation></Annotations>')
    with pytest.raises(DataFormatError, match=r"empty\.xml contains no <Region>"):
        read_aperio_xml(empty, (4, 4))
    assert read_aperio_xml(empty, (4, 4), allow_empty=True).sum() == 0
    garbled = tmp_path / "garbled.xml"
    garbled.write_text("<Annotations><Annotation><Regions><Region>")
    with pytest.raises(DataFormatError, match=r"cannot parse Aperio XML .*garbled\.xml"):
        read_aperio_xml(garbled, (4, 4))
    bad_vertex = tmp_path / "nan.xml"
    bad_vertex.write_text(
        '<Annotations><Annotation><Regions><Region Id="7"><Vertices><Vertex X="a" Y="1"/>'
        "</Vertices></Region></Regions></Annotation></Annotations>"
    )
    with pytest.raises(DataFormatError, match="region 7"):
        read_aperio_xml(bad_vertex, (4, 4))
    with pytest.raises(DataFormatError, match="cannot parse"):
        read_aperio_xml(tmp_path / "missing.xml", (4, 4))
