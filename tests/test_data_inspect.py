"""`histofed data inspect` through the real CLI app."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from histofed.cli import app
from histofed.cli.data_inspect import source_stats
from histofed.data.formats import Source
from histofed.data.synthetic import write_synthetic_source

runner = CliRunner()


def test_inspect_synthetic_source_writes_contact_sheet(tmp_path: Path) -> None:
    src = write_synthetic_source(tmp_path / "data", "labA", 3, 96, np.random.default_rng(0))
    out = tmp_path / "out"
    result = runner.invoke(app, ["data", "inspect", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "source labA: 3 images with masks, meta.csv present" in result.output
    assert "96 / 96 / 96 px" in result.output and "optical density" in result.output
    sheet = out / "inspect-labA.png"
    assert sheet.is_file() and not list(out.glob("*.tmp*"))
    with Image.open(sheet) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 200


def test_inspect_folder_of_sources(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        write_synthetic_source(tmp_path / "nuclei", name, 2, 64, rng)
    result = runner.invoke(app, ["data", "inspect", str(tmp_path / "nuclei"), "--out",
                                 str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "source a:" in result.output and "source b:" in result.output
    assert (tmp_path / "inspect-nuclei.png").is_file()


def test_stats_are_hand_checkable() -> None:
    image = np.zeros((2, 2, 3), np.uint8)
    image[0, 0] = (255, 255, 255)  # OD 0; others OD -log10(1/255) = 2.4065
    mask = np.array([[0, 1], [2, 2]], np.uint16)
    st = source_stats(Source("s", Path("."), ["x"], [image], [mask], [{}]))
    assert np.allclose(st["rgb_mean"], 63.75)
    assert np.allclose(st["od_mean"], 0.75 * np.log10(255.0))
    assert st["foreground"].tolist() == [0.75] and st["instances"].tolist() == [2]


def test_inspect_rejects_unknown_layout(tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    result = runner.invoke(app, ["data", "inspect", str(tmp_path / "stuff")])
    assert result.exit_code == 2
    assert "inspect understands" in result.output and "images/<id>.png" in result.output


def test_inspect_names_corrupt_file(tmp_path: Path) -> None:
    src = write_synthetic_source(tmp_path, "labB", 2, 64, np.random.default_rng(2))
    (src / "images" / "labB_001.png").write_bytes(b"not a png")
    result = runner.invoke(app, ["data", "inspect", str(src), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "labB_001.png" in result.output


def test_inspect_real_cpm15(shared_data: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "inspect", str(shared_data / "nuclei" / "cpm15"),
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "source cpm15: 15 images" in result.output
    assert "(instance ids), total 2905" in result.output
    assert "439 / 643 / 1032 px" in result.output  # width min/median/max from meta.csv
    assert (tmp_path / "inspect-cpm15.png").is_file()
