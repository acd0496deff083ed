"""The FedSODA benchmark's pure helpers: validation-only round selection per model kind,
paired-by-seed differences and the table rows (benchmarks/fedsoda.py; no training here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "fedsoda.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_fedsoda", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_fedsoda"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_fedsoda", None)


def _row(rnd, client, split, model, dice):
    return {"round": rnd, "client": client, "split": split, "model": model,
            "dice": dice, "jaccard": dice / 2, "pixel_acc": 0.9}


def _lines():
    rows = []
    # global: val best at round 5 (mean 0.7), round 10 has the best TEST but worse val
    for rnd, val, test in ((5, (0.6, 0.8), (0.5, 0.7)), (10, (0.6, 0.6), (0.9, 0.9))):
        for c, v, t in zip(("a", "b"), val, test, strict=True):
            rows += [_row(rnd, c, "val", "global", v), _row(rnd, c, "test", "global", t)]
        rows.append(_row(rnd, "u", "unseen", "global", 0.3 if rnd == 5 else 0.99))
    # finetuned: a tie on val (0.5 at both rounds) keeps the earlier round
    for rnd, test in ((5, 0.4), (10, 0.8)):
        for c in ("a", "b"):
            rows += [_row(rnd, c, "val", "finetuned", 0.5), _row(rnd, c, "test", "finetuned", test)]
    # personal: unseen is the mean over the sites' own models at the selected round
    for c in ("a", "b"):
        rows += [_row(5, c, "val", "personal", 0.5), _row(5, c, "test", "personal", 0.6)]
    rows += [_row(5, "u", "unseen", "personal:a", 0.2), _row(5, "u", "unseen", "personal:b", 0.4),
             _row(5, "u", "unseen", "global", 0.3)]
    return rows


def test_selection_uses_validation_only_and_keeps_the_earlier_round_on_ties(bench):
    out = bench.select_scores(_lines())
    g = out["global"]
    assert g["round"] == 5 and g["val_dice"] == pytest.approx(0.7)
    assert g["mean"]["dice"] == pytest.approx(0.6)  # test at round 5, not the better round 10
    assert g["clients"]["b"]["dice"] == pytest.approx(0.7)
    assert g["last_round"] == 10 and g["last_test_dice"] == pytest.approx(0.9)
    assert g["unseen_dice"] == pytest.approx(0.3)
    f = out["finetuned"]
    assert f["round"] == 5 and f["mean"]["dice"] == pytest.approx(0.4)
    assert f["unseen_dice"] is None  # a locally trained model is not scored on the unseen site
    p = out["personal"]
    assert p["unseen_dice"] == pytest.approx(0.3) and p["unseen_best_site_dice"] == pytest.approx(0.4)


def _summary(dice_by_kind):
    return {"models": {k: {"mean": {"dice": d, "jaccard": d / 2, "pixel_acc": 0.9},
                           "clients": {"a": {"dice": d}}, "round": 5, "last_test_dice": d,
                           "unseen_dice": None} for k, d in dice_by_kind.items()},
            "mb_up_per_round": 1.0, "mb_down_per_round": 1.0, "fit_seconds_per_round": 2.0}


def test_paired_delta_pairs_by_seed_and_compares_like_with_like(bench):
    runs = {"fedavg": {0: _summary({"global": 0.70, "finetuned": 0.60}),
                       1: _summary({"global": 0.72, "finetuned": 0.62}),
                       2: _summary({"global": 0.74, "finetuned": 0.64})},
            "fedsoda": {0: _summary({"global": 0.69, "finetuned": 0.66}),
                        2: _summary({"global": 0.70, "finetuned": 0.70})}}
    assert bench.paired_delta(runs, "fedsoda", "fedavg") == pytest.approx([-0.01, -0.04])
    assert bench.paired_delta(runs, "fedsoda", "fedavg", "finetuned", "finetuned") == \
        pytest.approx([0.06, 0.06])
    table, clients = bench.aggregate(runs)
    entry = next(t for t in table if t["row"] == "fedsoda" and t["model"] == "finetuned")
    assert entry["delta_fedavg"] == pytest.approx([0.06, 0.06]) and entry["seeds"] == [0, 2]
    assert entry["protocol"].endswith("(paper)") and clients == ["a"]
    assert [t["model"] for t in table if t["row"] == "fedavg"] == ["global", "finetuned"]


def test_verdict_needs_three_seeds_and_two_sd(bench):
    assert "too few" in bench.verdict([0.1, 0.2])
    assert "higher" in bench.verdict([0.10, 0.11, 0.12])
    assert "lower" in bench.verdict([-0.10, -0.11, -0.12])
    assert "not distinguishable" in bench.verdict([0.1, -0.1, 0.05])


def test_confidence_counts_by_hand(bench):
    import numpy as np

    prob = np.array([[0.95, 0.6], [0.3, 0.05]])
    truth = np.array([[1, 0], [1, 0]])
    c = bench.confidence_counts(prob, truth)
    assert (c["tp"], c["fp"], c["fn"], c["pred_fg"], c["true_fg"]) == (1, 1, 1, 2, 2)
    assert c["uncertain"] == 2 and c["pixels"] == 4
    assert c["p_on_nuclei"] == pytest.approx(1.25)
