"""Metrics on hand-computed masks and scores; MONAI and scikit-learn as independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from histofed.metrics import (
    classification_metrics,
    dice,
    jaccard,
    pixel_accuracy,
    segmentation_metrics,
)


def mask(*rows: str) -> np.ndarray:
    """'#' is foreground: mask("##..", "....") -> 2 x 4 float64 array."""
    return np.array([[c == "#" for c in r] for r in rows], dtype=np.float64)


EMPTY = mask("....", "....", "....", "....")
TOP = mask("####", "####", "....", "....")  # 8 px
LEFT = mask("##..", "##..", "##..", "##..")  # 8 px, 4 shared with TOP, union 12
CORNER = mask("#...", "....", "....", "....")  # 1 px inside TOP
BOTTOM = mask("....", "....", "####", "####")  # disjoint from TOP

# (name, pred, target, dice, jaccard, pixel_acc), all computed by hand on 16 pixels
SEG_CASES = [
    ("identical", TOP, TOP, 1.0, 1.0, 1.0),
    ("half overlap", TOP, LEFT, 2 * 4 / 16, 4 / 12, 8 / 16),
    ("pred inside target", CORNER, TOP, 2 * 1 / 9, 1 / 8, 9 / 16),
    ("disjoint", TOP, BOTTOM, 0.0, 0.0, 0.0),
    ("both empty", EMPTY, EMPTY, 1.0, 1.0, 1.0),
    ("empty pred", EMPTY, TOP, 0.0, 0.0, 8 / 16),
    ("empty target", CORNER, EMPTY, 0.0, 0.0, 15 / 16),
]


@pytest.mark.parametrize("name,pred,target,d,j,acc", SEG_CASES, ids=[c[0] for c in SEG_CASES])
def test_mask_scores_match_hand_computation(name, pred, target, d, j, acc):
    assert dice(pred, target) == pytest.approx(d, abs=1e-12)
    assert jaccard(pred, target) == pytest.approx(j, abs=1e-12)
    assert pixel_accuracy(pred, target) == pytest.approx(acc, abs=1e-12)
    assert all(type(f(pred, target)) is float for f in (dice, jaccard, pixel_accuracy))


def test_probabilities_are_thresholded_at_one_half():
    probs = np.array([[0.49, 0.5], [0.51, 0.0]])  # -> [[0, 1], [1, 0]]
    target = np.array([[1.0, 1.0], [0.0, 0.0]])
    assert dice(probs, target) == pytest.approx(2 * 1 / 4)
    assert jaccard(probs, target) == pytest.approx(1 / 3)
    assert pixel_accuracy(probs, target) == pytest.approx(2 / 4)


def test_torch_bool_and_channel_first_inputs_agree_with_numpy():
    pred_t = torch.from_numpy(TOP).float().unsqueeze(0)  # 1 x 4 x 4
    target_t = torch.from_numpy(LEFT).bool()  # 4 x 4
    assert dice(pred_t, target_t) == pytest.approx(0.5)
    assert jaccard(pred_t, target_t) == pytest.approx(1 / 3)


def test_eps_smoothing():
    # (2*4 + 1) / (16 + 1); both empty stays 1.0 with smoothing
    assert dice(TOP, LEFT, eps=1.0) == pytest.approx(9 / 17)
    assert dice(EMPTY, EMPTY, eps=1.0) == 1.0
    with pytest.raises(ValueError, match="eps"):
        dice(TOP, LEFT, eps=-1.0)


def test_agrees_with_monai_on_random_masks():
    from monai.metrics import compute_dice, compute_iou

    rng = np.random.default_rng(0)
    preds = rng.random((6, 1, 1, 9, 7)) < rng.random((6, 1, 1, 1, 1))  # varied density
    targets = rng.random((6, 1, 1, 9, 7)) < 0.3
    preds[0], targets[0] = False, False  # include an empty pair
    for p, t in zip(preds, targets):
        pt, tt = torch.from_numpy(p).double(), torch.from_numpy(t).double()
        assert dice(p, t) == pytest.approx(compute_dice(pt, tt, ignore_empty=False).item())
        assert jaccard(p, t) == pytest.approx(compute_iou(pt, tt, ignore_empty=False).item())


@pytest.mark.parametrize(
    "pred,target,match",
    [
        (np.zeros((4, 4)), np.zeros((4, 5)), "shape"),
        (np.full((2, 2), 1.5), np.zeros((2, 2)), "outside"),
        (np.full((2, 2), np.nan), np.zeros((2, 2)), "NaN"),
        (np.zeros((2, 2)), np.full((2, 2), 255.0), "binary"),
    ],
    ids=["shape", "logits", "nan", "0-255 target"],
)
def test_bad_input_is_refused_with_a_hint(pred, target, match):
    with pytest.raises(ValueError, match=match):
        dice(pred, target)


def test_segmentation_metrics_is_the_per_image_mean():
    # image 1: perfect, 16 px; image 2: 2x2, pred 1 px vs target 3 px, overlap 1
    small_pred, small_target = mask("#.", ".."), mask("##", "#.")
    out = segmentation_metrics([TOP, small_pred], [TOP, small_target])
    assert list(out) == ["dice", "jaccard", "pixel_acc"]
    assert out["dice"] == pytest.approx((1.0 + 2 * 1 / 4) / 2)  # pooled would be 18/20
    assert out["jaccard"] == pytest.approx((1.0 + 1 / 3) / 2)
    assert out["pixel_acc"] == pytest.approx((1.0 + 2 / 4) / 2)


def test_segmentation_metrics_errors_name_the_image():
    with pytest.raises(ValueError, match="2 predictions but 1 targets"):
        segmentation_metrics([TOP, TOP], [TOP])
    with pytest.raises(ValueError, match="at least one"):
        segmentation_metrics([], [])
    with pytest.raises(ValueError, match="image 1"):
        segmentation_metrics([TOP, TOP], [TOP, TOP * 2])


def test_binary_classification_by_hand():
    labels = np.array([0, 0, 0, 1])
    p1 = np.array([0.1, 0.6, 0.35, 0.8])  # P(class 1)
    probs = np.stack([1 - p1, p1], axis=1)  # N x 2
    out = classification_metrics(probs, labels)
    # predictions 0,1,0,1 -> 3/4 right; recalls 2/3 (class 0) and 1 (class 1)
    assert out["accuracy"] == pytest.approx(3 / 4)
    assert out["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    # positive 0.8 outranks all 3 negatives -> AUC 1; swap one rank: see below
    assert out["auc"] == pytest.approx(1.0)
    p1b = np.array([0.1, 0.9, 0.35, 0.8])  # 0.8 beats 2 of 3 negatives
    assert classification_metrics(np.stack([1 - p1b, p1b], 1), labels)["auc"] == pytest.approx(2 / 3)


def test_logits_give_the_same_metrics_as_their_softmax():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(20, 3)) * 3
    labels = rng.integers(0, 3, size=20)
    probs = torch.softmax(torch.from_numpy(logits), dim=1)
    a = classification_metrics(torch.from_numpy(logits), torch.from_numpy(labels))
    b = classification_metrics(probs, labels)
    assert a == pytest.approx(b)


def test_multiclass_auc_is_macro_one_vs_rest():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(4), size=30)
    labels = np.arange(30) % 4
    got = classification_metrics(probs, labels)["auc"]
    assert got == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    # hand case: column k separates class k perfectly for k = 0, 1; class 2 absent -> mean of 1, 1
    probs = np.array([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.5, 0.3]])
    assert classification_metrics(probs, [0, 0, 1, 1])["auc"] == pytest.approx(1.0)


def test_single_class_auc_is_nan():
    out = classification_metrics(np.array([[0.9, 0.1], [0.4, 0.6]]), np.array([0, 0]))
    assert math.isnan(out["auc"])
    assert out["accuracy"] == pytest.approx(0.5)
    assert out["balanced_accuracy"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "scores,labels,match",
    [
        (np.zeros(4), np.zeros(4), "N x C"),
        (np.zeros((4, 2)), np.zeros(3), "shape"),
        (np.zeros((2, 2)), np.array([0, 2]), r"\[0, 2\)"),
        (np.zeros((2, 2)), np.array([0, 0.5]), "integers"),
        (np.zeros((0, 2)), np.zeros(0), "at least one"),
    ],
    ids=["1-D", "length", "range", "fractional", "empty"],
)
def test_classification_bad_input(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(scores, labels)
