"""Instance metrics (AJI, PQ, F1) on tiny masks whose scores were computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histofed.instances import (
    InstanceOptions,
    aji,
    image_instance_scores,
    instance_metrics,
    label_instances,
    panoptic_quality,
    reference_instances,
)


def canvas():
    return np.zeros((8, 12), np.int32)  # H x W


def nucleus_a(m, k=1):
    m[0:4, 0:4] = k  # 16 px
    return m


def test_perfect_match_scores_one():
    ref = nucleus_a(canvas())
    ref[5:8, 8:12] = 2  # 12 px (the default min_area of 10 keeps it)
    s = image_instance_scores(ref > 0, ref)
    assert s["aji"] == s["pq"] == s["sq"] == s["f1"] == 1.0
    assert s["nuclei_ref"] == s["nuclei_pred"] == 2


def test_partial_match():
    ref = nucleus_a(canvas())
    pred = canvas()
    pred[0:4, 0:3] = 1  # 12 px inside the 16 px nucleus: IoU 12/16 = 0.75
    assert aji(ref, pred) == 0.75  # C = 12, U = 16
    pq = panoptic_quality(ref, pred)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (1, 0, 0)
    assert pq["sq"] == 0.75 and pq["dq"] == 1.0 and pq["pq"] == 0.75


def test_split_nucleus():
    # reference: one 4x4 nucleus; prediction: two pieces, columns 0-1 (8 px) and column 3 (4 px)
    ref = nucleus_a(canvas())
    binary = np.zeros_like(ref)
    binary[0:4, 0:2] = 1
    binary[0:4, 3] = 1
    pred = label_instances(binary, InstanceOptions(min_area=0))
    assert pred.max() == 2
    # AJI: best piece IoU 8/16 = 0.5 -> C = 8, U = 16; the other piece is unused: U += 4
    assert aji(ref, pred) == pytest.approx(8 / 20)  # 0.4
    # PQ: IoU 0.5 is not > 0.5 -> no true positive: TP 0, FP 2, FN 1
    pq = panoptic_quality(ref, pred)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (0, 2, 1)
    assert pq["pq"] == pq["sq"] == pq["dq"] == 0.0


def test_merged_nuclei_and_which_reference():
    # reference: two touching 4x4 nuclei (ids 1, 2); prediction: one 4x8 blob
    ref = nucleus_a(canvas())
    ref[0:4, 4:8] = 2
    pred = (ref > 0).astype(np.uint8)
    # AJI: both nuclei pick the blob (IoU 16/32): C = 16 + 16, U = 32 + 32 -> 0.5
    s = image_instance_scores(pred, ref, InstanceOptions(min_area=0))
    assert s["aji"] == 0.5
    # PQ: IoU 0.5 for both, not > 0.5: TP 0, FP 1, FN 2 -> 0
    assert s["pq"] == 0.0 and s["f1"] == 0.0 and s["ref_instance_ids"] == 1.0
    # the same nuclei in a BINARY reference merge into one component: a perfect score
    s = image_instance_scores(pred, (ref > 0) * 255, InstanceOptions(min_area=0))
    assert s["aji"] == 1.0 and s["pq"] == 1.0 and s["ref_instance_ids"] == 0.0


def test_missed_nucleus_and_false_positive():
    ref = nucleus_a(canvas())
    ref[5:8, 8:11] = 2  # 9 px, not predicted
    pred = nucleus_a(canvas())
    # AJI: C = 16, U = 16 + 9 (the missed nucleus) -> 16/25
    assert aji(ref, pred) == 16 / 25
    pq = panoptic_quality(ref, pred)  # TP 1, FN 1: DQ = 1 / (1 + 0.5) = 2/3, SQ = 1
    assert pq["dq"] == pytest.approx(2 / 3) and pq["sq"] == 1.0 and pq["pq"] == pytest.approx(2 / 3)
    ref2 = nucleus_a(canvas())
    pred2 = nucleus_a(canvas())
    pred2[5:8, 6:10] = 2  # 12 px false positive: U = 16 + 12 -> 16/28
    assert aji(ref2, pred2) == 16 / 28
    assert panoptic_quality(ref2, pred2)["pq"] == pytest.approx(2 / 3)  # TP 1, FP 1


def test_empty_prediction_reference_and_both():
    ref, empty = nucleus_a(canvas()), canvas()
    assert aji(ref, empty) == 0.0 and panoptic_quality(ref, empty)["pq"] == 0.0  # FN 1
    assert aji(empty, ref) == 0.0 and panoptic_quality(empty, ref)["pq"] == 0.0  # FP 1
    assert aji(empty, empty) == 1.0 and panoptic_quality(empty, empty)["pq"] == 1.0


def test_aji_reuses_a_prediction_for_several_references():
    # refs: 4x4 (16 px) and a 4x2 strip (8 px) beside it; one pred covers the 16 and half the 8
    ref = nucleus_a(canvas())
    ref[0:4, 4:6] = 2
    pred = canvas()
    pred[0:4, 0:5] = 1  # 20 px
    # ref 1: IoU 16/20 -> C 16, U 20; ref 2: IoU 4/(8 + 20 - 4) = 4/24 -> C 4, U 24
    assert aji(ref, pred) == pytest.approx(20 / 44)


def test_watershed_splits_touching_discs_and_min_area_drops_specks():
    yy, xx = np.mgrid[:24, :34]
    ref = np.zeros((24, 34), np.int32)
    ref[(yy - 12) ** 2 + (xx - 10) ** 2 <= 49] = 1
    ref[(yy - 12) ** 2 + (xx - 22) ** 2 <= 49] = 2  # centres 12 px apart, radius 7: touching
    binary = ref > 0
    binary[0, 33] = True  # a 1-px speck
    cc = label_instances(binary)  # default min_area = 10 drops the speck
    assert cc.max() == 1
    ws = InstanceOptions(split="watershed", min_distance=4)
    assert label_instances(binary, ws).max() == 2
    # merged blob: disc 2 (drawn last, 149 px) has IoU 149/297 > 0.5 with it, disc 1 < 0.5;
    # TP 1, FN 1 -> DQ 2/3, SQ ~0.50, PQ ~0.34; split by the watershed both match (IoU > 0.9)
    merged = instance_metrics([binary], [ref])
    split = instance_metrics([binary], [ref], ws)
    assert merged["f1"] == pytest.approx(2 / 3) and merged["pq"] < 0.35
    assert split["f1"] == 1.0 and split["pq"] > 0.9 and split["aji"] > merged["aji"] + 0.3
    assert label_instances(binary, InstanceOptions(min_area=0)).max() == 2  # blob + speck


def test_reference_with_one_id_is_treated_as_binary():
    m = np.zeros((6, 6), np.uint16)
    m[0:2, 0:2] = 7
    m[4:6, 4:6] = 7  # the same value twice: binary, so two components
    labels, has_ids = reference_instances(m)
    assert labels.max() == 2 and not has_ids


def test_instance_metrics_means_and_errors():
    ref = nucleus_a(canvas())
    out = instance_metrics([ref > 0, canvas()], [ref, ref], InstanceOptions(min_area=0))
    assert out["aji"] == 0.5 and out["pq"] == 0.5  # (1 + 0) / 2
    assert out["nuclei_ref"] == 2 and out["nuclei_pred"] == 1
    with pytest.raises(ValueError, match="image 1"):
        instance_metrics([ref, ref], [ref, np.zeros((3, 3))])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        instance_metrics([ref, ref], [ref])
    with pytest.raises(ValueError, match="split"):
        InstanceOptions(split="magic")


def _random_labels(rng, shape=(48, 48), n=12):
    m = np.zeros(shape, np.int32)
    for k in range(1, n + 1):
        y, x = rng.integers(0, shape[0] - 6), rng.integers(0, shape[1] - 6)
        h, w = rng.integers(3, 10, 2)
        m[y:y + h, x:x + w] = k
    return m


def _aji_by_the_equation(ref, pred):
    """Kumar et al. 2017, Algorithm 1, written as loops over instances."""
    c = u = 0.0
    used = set()
    for i in np.unique(ref)[1:]:
        g = ref == i
        best, best_iou = None, 0.0
        for j in np.unique(pred)[1:]:
            s = pred == j
            iou = (g & s).sum() / (g | s).sum()
            if iou > best_iou:
                best, best_iou = j, iou
        if best is None:
            u += g.sum()
        else:
            s = pred == best
            c += (g & s).sum()
            u += (g | s).sum()
            used.add(best)
    u += sum((pred == j).sum() for j in np.unique(pred)[1:] if j not in used)
    return c / u


def test_against_the_equation_and_monai():
    from monai.metrics import compute_panoptic_quality

    rng = np.random.default_rng(0)
    for _ in range(10):
        ref, pred = _random_labels(rng), _random_labels(rng)
        assert aji(ref, pred) == pytest.approx(_aji_by_the_equation(ref, pred), abs=1e-12)
        ours = panoptic_quality(ref, pred)
        tp, fp, fn, iou_sum = compute_panoptic_quality(
            torch.from_numpy(pred), torch.from_numpy(ref), output_confusion_matrix=True).tolist()
        assert (ours["tp"], ours["fp"], ours["fn"]) == (tp, fp, fn)
        assert ours["iou_sum"] == pytest.approx(iou_sum, abs=1e-5)


class _RedIsNucleus(torch.nn.Module):
    """A 'model' that predicts nucleus wherever the red channel is 1 (logit +-50)."""

    def forward(self, x):  # B x 3 x H x W -> B x 1 x H x W
        return (x[:, :1] - 0.5) * 100


def test_segmentation_evaluate_reports_instance_scores():
    from histofed.config import EvalConfig, TrainConfig
    from histofed.data.datasets import SegmentationTiles
    from histofed.tasks import make_task

    ref = np.zeros((32, 32), np.uint16)
    ref[4:12, 4:10] = 1
    ref[4:12, 10:16] = 2  # touching: one blob in the prediction
    ref[20:28, 20:28] = 3
    image = np.zeros((32, 32, 3), np.uint8)
    image[..., 0] = (ref > 0) * 255
    task = make_task("segmentation", TrainConfig(), 1, crop_size=32)
    with_ids = task.evaluate(_RedIsNucleus(), SegmentationTiles([image], [ref]), EvalConfig())
    assert with_ids["dice"] == 1.0 and with_ids["ref_instance_ids"] == 1.0
    # nuclei 1, 2 merge (IoU 48/96 each, not > 0.5): TP 1, FP 1, FN 2 -> F1 = 2/(2+3) = 0.4
    # AJI: C = 48 + 48 + 64 (nucleus 3 exact), U = 96 + 96 + 64 -> 160/256
    assert with_ids["f1"] == pytest.approx(0.4) and with_ids["aji"] == 160 / 256
    binary = task.evaluate(_RedIsNucleus(), SegmentationTiles([image], [(ref > 0) * 255]),
                           EvalConfig())
    assert binary["f1"] == 1.0 and binary["aji"] == 1.0 and binary["ref_instance_ids"] == 0.0
