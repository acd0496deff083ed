"""Aggregation math on arrays whose answers were computed by hand."""

import numpy as np
import pytest

from histofed.algorithms.aggregate import (
    add,
    difference,
    global_l2_norm,
    non_finite_keys,
    weighted_mean,
)


def test_weighted_mean_by_hand():
    a = {"w": np.array([1.0, 2.0], np.float32), "b": np.array([0.0], np.float32)}
    b = {"w": np.array([4.0, 8.0], np.float32), "b": np.array([3.0], np.float32)}
    out = weighted_mean([a, b], [1, 2])  # (1*a + 2*b) / 3
    np.testing.assert_allclose(out["w"], [3.0, 6.0])
    np.testing.assert_allclose(out["b"], [2.0])
    assert out["w"].dtype == np.float32


def test_weighted_mean_equal_weights_is_plain_mean():
    ups = [{"x": np.full((2, 2), v)} for v in (1.0, 2.0, 6.0)]
    np.testing.assert_allclose(weighted_mean(ups, [5, 5, 5])["x"], np.full((2, 2), 3.0))


@pytest.mark.parametrize("weights", [[0, 0], [-1, 1]])
def test_weighted_mean_rejects_non_positive_total(weights):
    ups = [{"x": np.ones(1)}, {"x": np.ones(1)}]
    with pytest.raises(ValueError, match="sum to > 0"):
        weighted_mean(ups, weights)


def test_weighted_mean_rejects_different_keys():
    with pytest.raises(KeyError, match="different keys"):
        weighted_mean([{"x": np.ones(1)}, {"y": np.ones(1)}], [1, 1])


def test_difference_add_norm():
    a, b = {"x": np.array([3.0, 4.0])}, {"x": np.array([0.0, 0.0])}
    assert global_l2_norm(difference(a, b)) == pytest.approx(5.0)
    np.testing.assert_allclose(add(b, a, scale=0.5)["x"], [1.5, 2.0])


def test_non_finite_keys():
    arrays = {"ok": np.ones(2), "nan": np.array([np.nan]), "inf": np.array([np.inf]),
              "int": np.array([1], np.int64)}
    assert sorted(non_finite_keys(arrays)) == ["inf", "nan"]
