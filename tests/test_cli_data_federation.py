"""`histofed data list` and `histofed data federation NAME` through the real Typer app."""

from __future__ import annotations

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from histofed.cli import app
from histofed.cli.data_federation import data_sources, parse_options
from histofed.data.federation import ClientData, Federation
from histofed.data.summary import federation_table

runner = CliRunner()


def test_parse_options():
    assert parse_options(["alpha=0.1", "num_clients=8", "augment=false", "bags_dir=a=b"]) == {
        "alpha": 0.1,
        "num_clients": 8,
        "augment": False,
        "bags_dir": "a=b",
    }


def test_list_shows_federations_and_data_sources(tmp_path):
    (tmp_path / "nuclei" / "lab1" / "images").mkdir(parents=True)
    (tmp_path / "nuclei" / "lab1" / "masks").mkdir()
    (tmp_path / "nuclei" / "lab1" / "images" / "a.png").write_bytes(b"")
    (tmp_path / "bags").mkdir()
    (tmp_path / "bags" / "s.h5").write_bytes(b"")
    result = runner.invoke(app, ["data", "list", "--data-root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for name in (
        "crchisto-dirichlet",
        "slides-bags",
        "ucsb-breast-bags",
        "synthetic-patches",
        "synthetic-bags",
    ):
        assert name in result.output
    assert "nuclei/lab1" in result.output and "1 images + masks" in result.output
    assert data_sources(tmp_path) == [
        ("bags", "1 feature bags (.h5) (MIL)"),
        ("nuclei/lab1", "1 images + masks (segmentation source)"),
    ]


def test_federation_prints_table_and_writes_png(tmp_path):
    result = runner.invoke(
        app,
        [
            "data",
            "federation",
            "synthetic-bags",
            "--out",
            str(tmp_path),
            "--seed",
            "2",
            "-o",
            "num_clients=2",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("synthetic-bags (mil, 2 classes)")
    assert any(line.startswith("client-1") for line in lines)
    total = next(line for line in lines if line.startswith("total")).split()
    assert total[:4] == ["total", "36", "-", "12"]  # 2 clients x 24 bags, 25 % test, no val set
    png = tmp_path / "federation-synthetic-bags.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 600
    assert [p.name for p in tmp_path.iterdir()] == [png.name]  # no temp file left


def test_federation_bad_input_exits_with_message(tmp_path):
    unknown = runner.invoke(app, ["data", "federation", "synthetic-bag", "--out", str(tmp_path)])
    assert unknown.exit_code == 2 and 'Did you mean "synthetic-bags"' in unknown.output
    option = runner.invoke(app, ["data", "federation", "synthetic-bags", "-o", "dim=x"])
    assert option.exit_code == 2 and "option dim='x' must be a int" in option.output
    malformed = runner.invoke(app, ["data", "federation", "synthetic-bags", "-o", "dim"])
    assert malformed.exit_code == 2 and "expected key=value" in malformed.output
    no_root = runner.invoke(
        app, ["data", "federation", "ucsb-breast-bags"], env={"HISTOFED_DATA": ""}
    )
    assert no_root.exit_code == 2 and "--data-root" in no_root.output


def test_help_teaches_with_an_example():
    result = runner.invoke(app, ["data", "federation", "--help"])
    assert result.exit_code == 0 and "histofed data federation crchisto-dirichlet" in result.output


def test_segmentation_table_hand_computed():
    class Seg:  # the segmentation dataset contract: `images` and `masks` lists
        def __init__(self, fg_rows):
            self.images = [np.zeros((10, 10, 3), np.uint8)] * len(fg_rows)
            self.masks = []
            for rows in fg_rows:
                m = np.zeros((10, 10), np.uint8)
                m[:rows] = 1
                self.masks.append(m)

        def __len__(self):
            return 1000  # random crops per pass: not the number of images

    fed = Federation(
        "toy",
        "segmentation",
        [ClientData("a", Seg([2, 4]), Seg([5])), ClientData("b", Seg([1]), Seg([0]), val=Seg([3]))],
        1,
    )
    rows = {line.split()[0]: line.split() for line in federation_table(fed).splitlines()[1:]}
    assert rows["a"][1:] == ["2", "-", "1", "0.00", "0.300", "0.500"]  # (20+40)/200, 50/100
    assert rows["b"][1:] == ["1", "1", "1", "0.00", "0.100", "0.000"]
    assert rows["total"][1:] == ["3", "1", "2", "0.00", "0.233", "0.250"]  # 70/300, 50/200


def test_nuclei_multisource_via_cli(shared_data, tmp_path):
    result = runner.invoke(
        app,
        ["data", "federation", "nuclei-multisource", "--out", str(tmp_path)],
        env={"HISTOFED_DATA": str(shared_data)},
    )
    assert result.exit_code == 0, result.output
    assert "segmentation" in result.output.splitlines()[0] and "fg train" in result.output
    assert (tmp_path / "federation-nuclei-multisource.png").stat().st_size > 1000
