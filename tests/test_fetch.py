"""Downloads against a local HTTP server on 127.0.0.1 (never any other address) + converters."""

from __future__ import annotations

import csv
import hashlib
import io
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import scipy.io
from PIL import Image

from histofed.data import fetch as F
from histofed.data.formats import read_mask

PAYLOAD = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()


class Handler(BaseHTTPRequestHandler):
    """Serves ``server.files``; supports ``Range: bytes=N-``. Special paths:
    ``/cut/<name>`` announces the full length but closes after ``server.cut_at`` bytes;
    ``/norange/<name>`` ignores Range and always sends the whole file with 200."""

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.server.requests.append((self.path, self.headers.get("Range")))
        mode, _, name = self.path.lstrip("/").partition("/")
        if not name:
            mode, name = "plain", mode
        data = self.server.files.get(name)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and mode != "norange":
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(data):
                self.send_error(416, "Range Not Satisfiable")
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "cut":
            body = body[: self.server.cut_at]
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture()
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # talk to 127.0.0.1 directly, never via a proxy
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.requests, srv.cut_at = {"data.bin": PAYLOAD}, [], 100_000
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


SHA = hashlib.sha256(PAYLOAD).hexdigest()
QUIET = {"progress": False, "timeout": 5, "log": lambda line: None}


def test_full_download_and_skip_when_present(server, tmp_path):
    dest = tmp_path / "d" / "data.bin"
    assert F.download(f"{server.url}/data.bin", dest, sha256=SHA, **QUIET) == SHA
    assert dest.read_bytes() == PAYLOAD and not dest.with_name("data.bin.part").exists()
    n = len(server.requests)
    assert F.download(f"{server.url}/data.bin", dest, sha256=SHA, **QUIET) == SHA
    assert len(server.requests) == n  # present with the right checksum: no request at all


def test_resume_after_interruption(server, tmp_path):
    dest = tmp_path / "data.bin"
    part = tmp_path / "data.bin.part"
    with pytest.raises(F.DownloadError, match="run the same command again to resume"):
        F.download(f"{server.url}/cut/data.bin", dest, sha256=SHA, **QUIET)
    assert part.stat().st_size == 100_000 and not dest.exists()
    server.cut_at = 10**9  # the connection holds this time
    assert F.download(f"{server.url}/cut/data.bin", dest, sha256=SHA, **QUIET) == SHA
    assert server.requests[-1] == ("/cut/data.bin", "bytes=100000-")
    assert dest.read_bytes() == PAYLOAD and not part.exists()


def test_server_without_range_support_restarts(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(b"garbage that is not the start of the file")
    assert F.download(f"{server.url}/norange/data.bin", tmp_path / "data.bin", sha256=SHA,
                      **QUIET) == SHA
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD


def test_partial_file_already_complete_gives_416_then_restarts(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)
    assert F.download(f"{server.url}/data.bin", tmp_path / "data.bin", sha256=SHA, **QUIET) == SHA
    assert [r for _, r in server.requests] == [f"bytes={len(PAYLOAD)}-", None]


def test_checksum_mismatch_deletes_file(server, tmp_path):
    dest = tmp_path / "data.bin"
    with pytest.raises(F.ChecksumError, match="expected 0000"):
        F.download(f"{server.url}/data.bin", dest, sha256="0" * 64, **QUIET)
    assert not dest.exists() and not (tmp_path / "data.bin.part").exists()


def test_404_names_url_and_fix(server, tmp_path):
    with pytest.raises(F.DownloadError, match=r"missing\.zip: HTTP 404.*--archive FILE"):
        F.download(f"{server.url}/missing.zip", tmp_path / "m.zip", **QUIET)


def test_unreachable_host_is_a_download_error(tmp_path):
    # Port 9 on 127.0.0.1 ("discard") has no listener here: connection refused at once.
    with pytest.raises(F.DownloadError, match="cannot reach"):
        F.download("http://127.0.0.1:9/x.zip", tmp_path / "x.zip", **QUIET)


# --------------------------------------------------------------------------- converters

MONUSEG_ID = "TCGA-18-5592-01Z-00-DX1"  # a liver image (site 18) in the MoNuSeg table
XML = """<Annotations><Annotation><Regions>
<Region Id="1"><Vertices><Vertex X="2" Y="2"/><Vertex X="6" Y="2"/><Vertex X="6" Y="6"/>
<Vertex X="2" Y="6"/></Vertices></Region>
<Region Id="2"><Vertices><Vertex X="10" Y="10"/><Vertex X="14" Y="10"/><Vertex X="14" Y="13"/>
</Vertices></Region>
</Regions></Annotation></Annotations>"""


def _tif_bytes(rgb):
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="TIFF", compression="tiff_lzw")
    return buf.getvalue()


def monuseg_zip(path):
    rgb = np.random.default_rng(1).integers(0, 256, (16, 20, 3), dtype=np.uint8)  # H x W x 3
    root = "MoNuSeg 2018 Training Data"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{root}/Tissue Images/{MONUSEG_ID}.tif", _tif_bytes(rgb))
        z.writestr(f"{root}/Annotations/{MONUSEG_ID}.xml", XML)
        z.writestr(f"__MACOSX/{root}/Tissue Images/._{MONUSEG_ID}.tif", b"junk")
    return rgb


def test_convert_monuseg(tmp_path):
    rgb = monuseg_zip(tmp_path / "m.zip")
    out = tmp_path / "out"
    out.mkdir()
    assert F.convert_monuseg(tmp_path / "m.zip", out) == {"images": 1}
    assert list(out.iterdir()).__len__() == 3  # images/, masks/, meta.csv; scratch removed
    np.testing.assert_array_equal(np.asarray(Image.open(out / "images" / f"{MONUSEG_ID}.png")), rgb)
    mask = read_mask(out / "masks" / f"{MONUSEG_ID}.png")
    assert mask.dtype == np.uint16 and mask.shape == (16, 20)
    expected = np.zeros((16, 20), np.uint16)
    expected[2:7, 2:7] = 1  # square 2..6 inclusive (pixel centres on the border count)
    for r in range(10, 14):  # triangle (10,10) (14,10) (14,13): columns c with (c-10)*3/4 <= r-10
        for c in range(10, 15):
            if (r - 10) * 4 <= (c - 10) * 3:
                expected[r, c] = 2
    np.testing.assert_array_equal(mask, expected)
    with open(out / "meta.csv") as f:
        assert list(csv.DictReader(f)) == [
            {"id": MONUSEG_ID, "organ": "liver", "site": "18", "mask": "instance"}]


def crchisto_zip(path, mirror=False):
    """Two images; the official layout (Classification/ + Detection/) or the sfcn-opi one."""
    rng = np.random.default_rng(2)
    images = {k: rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) for k in (1, 4)}
    pts = {(1, "fibroblast"): [[1.5, 2.0], [3.0, 4.25]], (1, "others"): [[5.0, 6.0]],
           (4, "epithelial"): [[7.0, 8.0]], (1, "detection"): [[1, 1]] * 5,
           (4, "detection"): [[1, 1]] * 2}
    with zipfile.ZipFile(path, "w") as z:
        for k, rgb in images.items():
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="BMP")
            top = (f"repo/CRCHistoPhenotypes_2016_04_28/cls_and_det/{'validation' if k == 4 else 'train'}"
                   if mirror else "CRCHistoPhenotypes_2016_04_28/Classification")
            z.writestr(f"{top}/img{k}/img{k}.bmp", buf.getvalue())
            if not mirror:
                z.writestr(f"CRCHistoPhenotypes_2016_04_28/Detection/img{k}/img{k}.bmp", buf.getvalue())
            for (kk, cls), xy in pts.items():
                if kk == k:
                    folder = top if mirror or cls != "detection" else \
                        "CRCHistoPhenotypes_2016_04_28/Detection"
                    mat = io.BytesIO()
                    scipy.io.savemat(mat, {"detection": np.array(xy, np.float64)})
                    z.writestr(f"{folder}/img{k}/img{k}_{cls}.mat", mat.getvalue())
    return images


@pytest.mark.parametrize("mirror", [False, True])
def test_convert_crchisto(tmp_path, mirror):
    images = crchisto_zip(tmp_path / "c.zip", mirror=mirror)
    out = tmp_path / "out"
    out.mkdir()
    assert F.convert_crchisto(tmp_path / "c.zip", out) == {"images": 2, "labelled_points": 4}
    np.testing.assert_array_equal(np.asarray(Image.open(out / "images" / "img4.png")), images[4])
    with open(out / "points" / "img1.csv") as f:
        assert list(csv.reader(f)) == [["x", "y", "label"], ["1.5", "2.0", "fibroblast"],
                                       ["3.0", "4.25", "fibroblast"], ["5.0", "6.0", "others"]]
    with open(out / "split.csv") as f:  # img4 is a validation image in the sfcn-opi split
        assert list(csv.reader(f)) == [["id", "split"], ["img1", "train"], ["img4", "validation"]]
    with open(out / "class_counts.csv") as f:
        rows = list(csv.reader(f))
    assert rows[1] == ["img1", "train", "0", "2", "0", "1", "3", "5"]
    assert rows[-1] == ["ALL", "all", "1", "2", "0", "1", "4", "7"]


def test_fetch_end_to_end_with_mirror_fallback(server, tmp_path):
    monuseg_zip(tmp_path / "m.zip")
    server.files["m.zip"] = (tmp_path / "m.zip").read_bytes()
    server.files["page.zip"] = b"<!DOCTYPE html><html>Confirm download</html>"
    ds = F.Dataset(
        name="test-monuseg", subdir="nuclei/monuseg", title="t", homepage="h", licence="l",
        citation="c", convert=F.convert_monuseg,
        downloads=(F.Download(f"{server.url}/gone.zip", "a.zip"),
                   F.Download(f"{server.url}/page.zip", "b.zip"),
                   F.Download(f"{server.url}/m.zip", "c.zip")),
    )
    lines: list[str] = []
    out = F.fetch(ds, tmp_path / "data", progress=False, timeout=5, log=lines.append)
    assert out == tmp_path / "data" / "nuclei" / "monuseg"
    assert (out / "images" / f"{MONUSEG_ID}.png").is_file() and (out / "fetch.json").is_file()
    assert any("HTTP 404" in s for s in lines) and any("HTML page" in s for s in lines)
    assert any("sha256 of c.zip is" in s for s in lines)  # unpinned: printed for the user
    assert not (tmp_path / "data" / "downloads" / "test-monuseg" / "b.zip").exists()
    n = len(server.requests)
    F.fetch(ds, tmp_path / "data", progress=False, log=lines.append)  # idempotent
    assert len(server.requests) == n and "already there" in lines[-1]
    with pytest.raises(F.DownloadError, match=r"(?s)could not download.*--archive FILE"):
        F.fetch(F.Dataset(**{**ds.__dict__, "downloads": ds.downloads[:1]}), tmp_path / "other",
                progress=False, log=lines.append)
    assert not (tmp_path / "other" / "nuclei" / "monuseg").exists()


def test_fetch_with_local_archive_and_force(tmp_path):
    monuseg_zip(tmp_path / "m.zip")
    (tmp_path / "data" / "nuclei" / "monuseg").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not made by"):
        F.fetch("monuseg", tmp_path / "data", archive=tmp_path / "m.zip", log=lambda s: None)
    out = F.fetch("monuseg", tmp_path / "data", archive=tmp_path / "m.zip", force=True,
                  log=lambda s: None)
    assert sorted(p.name for p in out.iterdir()) == ["fetch.json", "images", "masks", "meta.csv"]


def test_registry_lists_documented_sources():
    assert {"monuseg", "crchisto"} <= set(F.DATASETS)
    for name in F.DATASETS:
        ds = F.DATASETS.get(name)
        assert ds.downloads and all(d.url.startswith("https://") for d in ds.downloads)


def test_cli_fetch_list_and_errors(tmp_path):
    from typer.testing import CliRunner

    from histofed.cli import app

    runner = CliRunner()
    listing = runner.invoke(app, ["data", "fetch", "--list"])
    assert listing.exit_code == 0 and "monuseg" in listing.output and "crchisto" in listing.output
    bad = runner.invoke(app, ["data", "fetch", "monusg", "--dest", str(tmp_path)])
    assert bad.exit_code == 2 and 'Did you mean "monuseg"' in bad.output
    monuseg_zip(tmp_path / "m.zip")
    ok = runner.invoke(app, ["data", "fetch", "monuseg", "--dest", str(tmp_path / "d"),
                             "--archive", str(tmp_path / "m.zip")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "d" / "nuclei" / "monuseg" / "meta.csv").is_file()
