"""Run report and run comparison on fake run directories with hand-computed expectations."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from histofed.report import compare_runs, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFIG = '[run]\nalgorithm = "fedavg"\nrounds = 2\n# <not html> & "quoted"\n'

# two clients, two rounds; final (round 2) test dice a=0.6, b=0.9 -> mean 0.75, std 0.15
METRICS = [
    {"round": 1, "client": "a", "split": "train", "loss": 0.9, "steps": 4, "seconds": 1.0},
    {"round": 1, "client": "b", "split": "train", "loss": 0.7, "steps": 4, "seconds": 1.0},
    {"round": 1, "client": "a", "split": "test", "model": "global", "loss": 0.5,
     "dice": 0.5, "jaccard": 0.4, "pixel_acc": 0.8},
    {"round": 1, "client": "b", "split": "test", "dice": 0.7, "jaccard": 0.5, "pixel_acc": 0.9},
    {"round": 2, "client": "a", "split": "test", "dice": 0.6, "jaccard": 0.45, "pixel_acc": 0.85},
    {"round": 2, "client": "b", "split": "test", "dice": 0.9, "jaccard": 0.8, "pixel_acc": 0.95},
    {"round": 2, "client": "b", "event": "client_failed", "message": "disk <full>"},
]
EGRESS = [
    {"round": 1, "client": "a", "direction": "up", "kind": "weights", "bytes": 1_000_000},
    {"round": 2, "client": "a", "direction": "up", "kind": "weights", "bytes": 500_000},
    {"round": 1, "client": "b", "direction": "up", "kind": "stats", "bytes": 250_000},
    {"round": 1, "client": "a", "direction": "down", "kind": "weights", "bytes": 3_000_000},
    {"round": 1, "client": "b", "direction": "down", "kind": "weights", "bytes": 3_000_000},
]


def jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def make_run(root: Path, name: str, metrics=METRICS, egress=EGRESS, privacy=None,
             algorithm: str | None = "fedavg") -> Path:
    run = root / name
    run.mkdir()
    (run / "config.toml").write_text(CONFIG, encoding="utf-8")
    if algorithm:
        (run / "run.json").write_text(json.dumps(
            {"name": name, "algorithm": algorithm, "seed": 0, "rounds": 2,
             "started": 0.0, "wall_seconds": 12.3}))
    for fname, records in (("metrics.jsonl", metrics), ("egress.jsonl", egress),
                           ("privacy.jsonl", privacy)):
        if records is not None:
            jsonl(run / fname, records)
    return run


def md_row(md: str, first: str) -> list[str]:
    """Cells of the Markdown table row whose first cell is ``first``."""
    rows = [line for line in md.splitlines() if line.startswith(f"| {first} |")]
    assert rows, f"no row {first!r} in:\n{md}"
    return [c.strip() for c in rows[0].strip("|").split("|")][1:]


def test_report_files_plots_and_hand_computed_numbers(tmp_path):
    run = make_run(tmp_path, "r1")
    html_path, md_path = write_report(run)
    assert (html_path, md_path) == (run / "report.html", run / "summary.md")
    html, md = html_path.read_text(), md_path.read_text()

    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert sorted(srcs) == sorted(
        f"plots/{n}.png" for n in ("test_dice_global", "test_jaccard_global",
                                   "test_pixel_acc_global", "train_loss_global", "egress"))
    for src in srcs:
        assert (run / src).read_bytes()[:8] == PNG_MAGIC
        assert f"]({src})" in md  # the same plots are linked from the summary

    assert "| client | dice | jaccard | pixel_acc |" in md
    assert md_row(md, "a") == ["0.6000", "0.4500", "0.8500"]
    assert md_row(md, "mean") == ["0.7500", "0.6250", "0.9000"]
    assert md_row(md, "std over clients") == ["0.1500", "0.1750", "0.0500"]
    assert "round 2" in md
    assert "| started | 1970-01-01T00:00:00+00:00 |" in md and "| wall_seconds | 12.3 s |" in md
    # egress totals per client in MB: a up 1.5, down 3; b up 0.25, down 3
    assert "| a | 1.500 | 3.000 |" in md
    assert md_row(md, "total") == ["1.750", "6.000"]
    assert "| 2 | b | client_failed | disk &lt;full&gt; |" in md
    # config verbatim (escaped) and collapsible; HTML-escaped event message
    assert "<details>" in html and "# &lt;not html&gt; &amp; &quot;quoted&quot;" in html
    assert "disk &lt;full&gt;" in html
    assert "Privacy" not in html and "Privacy" not in md
    assert not list(run.rglob("*.tmp"))


def test_engine_mean_line_wins_and_later_lines_win(tmp_path):
    extra = [
        {"round": 2, "client": "__mean__", "split": "test", "dice": 0.8, "jaccard": 0.7,
         "pixel_acc": 0.9},
        # a resumed run re-evaluated round 2 for client a: the later line counts
        {"round": 2, "client": "a", "split": "test", "dice": 0.5, "jaccard": 0.4,
         "pixel_acc": 0.85},
    ]
    run = make_run(tmp_path, "r", metrics=METRICS + extra)
    md = write_report(run)[1].read_text()
    assert "| __mean__ |" not in md
    assert md_row(md, "mean")[0] == "0.8000"  # engine's value, not (0.5 + 0.9) / 2
    assert md_row(md, "a")[0] == "0.5000"
    assert md_row(md, "std over clients")[0] == "0.2000"  # std of {0.5, 0.9}


def test_personal_models_get_their_own_columns_and_plots(tmp_path):
    personal = [{"round": 2, "client": c, "split": "test", "model": "personal", "dice": d,
                 "jaccard": 0.5, "pixel_acc": 0.9} for c, d in (("a", 0.8), ("b", 1.0))]
    run = make_run(tmp_path, "r", metrics=METRICS + personal)
    html, md = (p.read_text() for p in write_report(run))
    assert "| client | dice (global) | jaccard (global) | pixel_acc (global) | dice (personal) |" in md
    assert md_row(md, "mean")[0] == "0.7500" and md_row(md, "mean")[3] == "0.9000"
    assert 'src="plots/test_dice_personal.png"' in html
    assert (run / "plots" / "test_dice_personal.png").exists()


def test_privacy_section_only_when_privacy_file_exists(tmp_path):
    privacy = [{"round": r, "epsilon": e, "delta": 1e-5, "accountant": "rdp"}
               for r, e in ((1, 0.5), (2, 0.8))]
    run = make_run(tmp_path, "r", privacy=privacy)
    html, md = (p.read_text() for p in write_report(run))
    for text in (html, md):
        assert "Privacy" in text and "is not a guarantee" in text
    assert 'src="plots/privacy_epsilon.png"' in html
    assert md_row(md, "rdp (delta=1e-05)") == ["2", "0.800"]


def test_run_without_metrics_still_reports(tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "config.toml").write_text(CONFIG)
    html, md = (p.read_text() for p in write_report(run))
    for text in (html, md):
        assert "No metrics recorded yet" in text
        assert "egress.jsonl not found" in text
        assert "run.json not found" in text
    assert "<img" not in html
    (run / "metrics.jsonl").write_text(json.dumps(METRICS[0]) + "\n")  # training only, no test
    md = write_report(run)[1].read_text()
    assert "No test metrics recorded yet" in md and "plots/train_loss_global.png" in md


def test_classification_run_leaves_nan_auc_out_of_the_mean(tmp_path):
    metrics = [
        {"round": 1, "client": "a", "split": "test", "accuracy": 0.8, "balanced_accuracy": 0.7,
         "auc": 0.9},
        {"round": 1, "client": "b", "split": "test", "accuracy": 0.6, "balanced_accuracy": 0.5,
         "auc": float("nan")},  # json writes NaN; a one-class test set has no AUC
    ]
    md = write_report(make_run(tmp_path, "c", metrics=metrics))[1].read_text()
    assert "| client | accuracy | balanced_accuracy | auc |" in md
    assert md_row(md, "b") == ["0.6000", "0.5000", "nan"]
    assert md_row(md, "mean") == ["0.7000", "0.6000", "0.9000"]


def test_bad_files_are_named_in_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        write_report(tmp_path / "missing")
    run = make_run(tmp_path, "bad")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not valid JSON"):
        write_report(run)
    (run / "metrics.jsonl").write_text(json.dumps({"round": 1, "client": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:1: .*split or event"):
        write_report(run)
    # a run killed mid-write leaves a torn last line: reported, not fatal
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"round": 3, "cli')
    md = write_report(run)[1].read_text()
    assert "metrics.jsonl: ignored an incomplete last line (8)" in md
    assert md_row(md, "mean")[0] == "0.7500"


def test_compare_runs_table_plot_and_errors(tmp_path):
    fedavg = make_run(tmp_path, "run-fedavg")
    personal = [{"round": 3, "client": c, "split": "test", "model": "personal", "dice": d}
                for c, d in (("a", 0.8), ("b", 0.6), ("c", 0.7))]
    fedbn = make_run(tmp_path, "run-fedbn", metrics=METRICS + personal, algorithm="fedbn",
                     egress=[])
    nameless = make_run(tmp_path, "run-x", algorithm=None, egress=None)
    out = tmp_path / "cmp" / "compare.md"
    text = compare_runs([fedavg, fedbn, nameless], out)
    assert out.read_text() == text
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == PNG_MAGIC
    assert "![mean test dice vs round](compare.png)" in text
    assert "| run | model | round | dice mean | ± std | a | b | c | MB up |" in text
    assert md_row(text, "fedavg") == ["global", "2", "0.7500", "0.1500", "0.6000", "0.9000",
                                      "—", "1.75"]
    # fedbn has personal models -> scored on them: mean 0.7, std sqrt(2/300)
    assert md_row(text, "fedbn") == ["personal", "3", "0.7000", "0.0816", "0.8000", "0.6000",
                                     "0.7000", "0.00"]
    assert md_row(text, "run-x")[-1] == "—"  # no egress.jsonl: unknown, not zero
    glob = compare_runs([fedbn], tmp_path / "g.md", model="global")
    assert md_row(glob, "fedbn")[:3] == ["global", "2", "0.7500"]
    with pytest.raises(ValueError, match="'auc'.*dice"):
        compare_runs([fedavg], tmp_path / "x.md", metric="auc")
