"""Evaluation metrics: pure functions, numpy or torch in, python floats out (computed in float64).

Segmentation metrics work per image on binary masks. Predictions may be probabilities (a pixel
is foreground when ``p >= 0.5``, the rule of MONAI's ``AsDiscrete(threshold=0.5)``) or binary
masks; targets must be binary. Empty-mask convention (for ``dice`` and ``jaccard``):

- prediction and target both empty -> 1.0 (nothing to find, nothing found);
- exactly one of them empty -> 0.0.

This matches MONAI's ``compute_dice(..., ignore_empty=False)``. A dataset score is the mean of
the per-image scores (as FedSODA reports), not the score of all pixels pooled.

The three mask scores are hand-written (a few numpy lines) rather than MONAI's
``compute_dice``/``compute_iou``, to get float64, any image shape and the ``eps`` option; the
tests check them against MONAI. Classification metrics use scikit-learn on ``N x C`` scores.

Example:
    >>> import numpy as np
    >>> pred = np.array([[0.9, 0.2], [0.6, 0.1]])  # H x W probabilities
    >>> target = np.array([[1, 0], [0, 0]])        # H x W binary
    >>> dice(pred, target)  # 2 * 1 / (2 + 1)
    0.6666666666666666
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
from scipy.special import softmax
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

THRESHOLD = 0.5  # probability at or above which a pixel counts as foreground

__all__ = [
    "THRESHOLD",
    "classification_metrics",
    "dice",
    "jaccard",
    "pixel_accuracy",
    "segmentation_metrics",
]


def _as_float64(x: Any, name: str) -> np.ndarray:
    """Torch tensor, numpy array or nested list -> float64 numpy array (a copy for torch)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values; check the model output")
    return arr


def _binarize(pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate a prediction/target pair and return two boolean masks of the same shape.

    Singleton dimensions are ignored, so ``[1, H, W]`` against ``[H, W]`` is accepted.
    """
    p, t = _as_float64(pred, "pred"), _as_float64(target, "target")
    if p.shape != t.shape:
        if np.squeeze(p).shape != np.squeeze(t).shape:
            raise ValueError(
                f"pred shape {p.shape} does not match target shape {t.shape}; "
                "pass one image at a time (e.g. [1, H, W] or [H, W]) with matching sizes"
            )
        p, t = np.squeeze(p), np.squeeze(t)
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(
            f"pred has values outside [0, 1] (min {p.min():g}, max {p.max():g}): pass "
            "probabilities (apply torch.sigmoid to logits) or a binary mask"
        )
    if not np.all((t == 0.0) | (t == 1.0)):
        bad = np.unique(t[(t != 0.0) & (t != 1.0)])[:5]
        raise ValueError(
            f"target must be a binary mask with values in {{0, 1}}, found {bad.tolist()}; "
            "threshold it or divide a 0/255 mask by 255"
        )
    return p >= THRESHOLD, t == 1.0


def dice(pred: Any, target: Any, eps: float = 0.0) -> float:
    """Dice coefficient ``(2|P & T| + eps) / (|P| + |T| + eps)`` of one image.

    Args:
        pred: probabilities in [0, 1] or a binary mask. # H x W (or 1 x H x W)
        target: binary mask, same shape as ``pred``. # H x W (or 1 x H x W)
        eps: optional smoothing added to numerator and denominator (0 gives the exact Dice).

    Returns:
        Dice in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is (for eps=0).

    Raises:
        ValueError: on mismatched shapes, non-binary targets, predictions outside [0, 1],
            NaN values or a negative ``eps``.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    p, t = _binarize(pred, target)
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return 1.0
    return float((2.0 * np.logical_and(p, t).sum() + eps) / (total + eps))


def jaccard(pred: Any, target: Any) -> float:
    """Jaccard index (IoU) ``|P & T| / |P | T|`` of one image; 1.0 when both masks are empty.

    Args:
        pred: probabilities in [0, 1] or a binary mask. # H x W (or 1 x H x W)
        target: binary mask, same shape as ``pred``. # H x W (or 1 x H x W)

    Raises:
        ValueError: as for :func:`dice`.
    """
    p, t = _binarize(pred, target)
    union = int(np.logical_or(p, t).sum())
    if union == 0:
        return 1.0
    return float(np.logical_and(p, t).sum() / union)


def pixel_accuracy(pred: Any, target: Any) -> float:
    """Fraction of pixels whose thresholded prediction equals the target (well defined when empty).

    Args:
        pred: probabilities in [0, 1] or a binary mask. # H x W (or 1 x H x W)
        target: binary mask, same shape as ``pred``. # H x W (or 1 x H x W)

    Raises:
        ValueError: as for :func:`dice`, and for an image with no pixels.
    """
    p, t = _binarize(pred, target)
    if p.size == 0:
        raise ValueError("pixel_accuracy of an image with no pixels is undefined")
    return float(np.mean(p == t))


def segmentation_metrics(preds: Iterable[Any], targets: Iterable[Any]) -> dict[str, float]:
    """Mean over images of Dice, Jaccard and pixel accuracy.

    Args:
        preds: one prediction per image (sizes may differ); a batched ``B x 1 x H x W`` array
            is iterated along its first axis.
        targets: one binary mask per image, in the same order.

    Returns:
        ``{"dice": ..., "jaccard": ..., "pixel_acc": ...}``, each the unweighted mean of the
        per-image scores.

    Raises:
        ValueError: when the lists are empty or of different lengths, or an image is invalid
            (the message names its index).
    """
    preds, targets = list(preds), list(targets)
    if len(preds) != len(targets):
        raise ValueError(f"got {len(preds)} predictions but {len(targets)} targets")
    if not preds:
        raise ValueError("segmentation_metrics needs at least one image")
    scores = np.empty((len(preds), 3), dtype=np.float64)  # N x 3
    for i, (p, t) in enumerate(zip(preds, targets)):
        try:
            scores[i] = dice(p, t), jaccard(p, t), pixel_accuracy(p, t)
        except ValueError as err:
            raise ValueError(f"image {i}: {err}") from err
    mean = scores.mean(axis=0)
    return {"dice": float(mean[0]), "jaccard": float(mean[1]), "pixel_acc": float(mean[2])}


def _probabilities(scores: np.ndarray) -> np.ndarray:
    """Rows already on the simplex are kept as probabilities; anything else is softmaxed."""
    is_prob = (
        np.all(scores >= 0.0) and np.all(scores <= 1.0) and np.allclose(scores.sum(1), 1.0, atol=1e-4)
    )
    return scores if is_prob else softmax(scores, axis=1)


def _macro_ovr_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC of the positive class (C == 2) or macro one-vs-rest AUC over present classes."""
    present = np.unique(labels)
    if present.size < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    # sklearn's multi_class="ovr" refuses a class absent from labels; average over present ones
    return float(np.mean([roc_auc_score(labels == k, probs[:, k]) for k in present]))


def classification_metrics(logits_or_probs: Any, labels: Any) -> dict[str, float]:
    """Accuracy, balanced accuracy and ROC AUC.

    Args:
        logits_or_probs: class scores. # N x C, C >= 2. Rows that are already probabilities
            (non-negative, summing to 1) are used as they are; otherwise a softmax is applied.
            For a single-logit binary model pass ``torch.stack([-z, z], 1)``.
        labels: integer class indices in ``[0, C)``. # N

    Returns:
        ``{"accuracy", "balanced_accuracy", "auc"}`` as floats.
        - ``balanced_accuracy``: mean recall over the classes present in ``labels``.
        - ``auc``: binary -> ROC AUC of class 1; multi-class -> macro one-vs-rest AUC over the
          classes present in ``labels``; ``nan`` when ``labels`` holds a single class, since
          ROC AUC is undefined without both positives and negatives.

    Raises:
        ValueError: on bad shapes, NaN scores, non-integer or out-of-range labels, or N == 0.
    """
    scores = _as_float64(logits_or_probs, "logits_or_probs")
    y = _as_float64(labels, "labels")
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(
            f"logits_or_probs must be N x C with C >= 2, got shape {scores.shape}; for a "
            "single-logit binary model pass torch.stack([-z, z], 1)"
        )
    if y.ndim != 1 or y.shape[0] != scores.shape[0]:
        raise ValueError(f"labels must have shape ({scores.shape[0]},), got {y.shape}")
    if y.size == 0:
        raise ValueError("classification_metrics needs at least one example")
    if not np.all(y == np.round(y)) or y.min() < 0 or y.max() >= scores.shape[1]:
        raise ValueError(
            f"labels must be integers in [0, {scores.shape[1]}), found "
            f"min {y.min():g}, max {y.max():g}"
        )
    y = y.astype(np.int64)
    probs = _probabilities(scores)  # N x C
    pred = probs.argmax(axis=1)
    with warnings.catch_warnings():  # expected when a label is absent from this split
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        bacc = balanced_accuracy_score(y, pred)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(bacc),
        "auc": _macro_ovr_auc(y, probs),
    }
