"""Aggregation math on arrays whose answers were computed by hand."""

import numpy as np
import pytest

from histofed.algorithms.aggregate import (
    add,
    coordinate_median,
    difference,
    global_l2_norm,
    krum_select,
    non_finite_keys,
    norm_outliers,
    robust_aggregate,
    scalar_problems,
    structure_problems,
    trimmed_mean,
    update_norm,
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


# ---- robust aggregation and update validation (issue 13) -----------------------------------
def _ups(*rows):
    return [{"x": np.array(r, dtype=np.float32)} for r in rows]


def test_coordinate_median_by_hand_ignores_nan():
    ups = _ups([1, 10, np.nan], [2, -5, 4], [9, 0, 6], [3, 1, np.nan])
    # column 0: median(1, 2, 9, 3) = 2.5; column 1: median(10, -5, 0, 1) = 0.5; column 2: (4+6)/2
    out = coordinate_median(ups)["x"]
    np.testing.assert_array_equal(out, np.array([2.5, 0.5, 5.0], np.float32))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(coordinate_median(_ups([1, 8], [5, 2], [3, 4]))["x"], [3, 4])


def test_trimmed_mean_by_hand():
    ups = _ups([0, 5], [1, 6], [2, 7], [3, 8], [1000, -1000])
    # int(0.2 * 5) = 1 cut each end: column 0 keeps 1, 2, 3 -> 2; column 1 keeps 5, 6, 7 -> 6
    np.testing.assert_array_equal(trimmed_mean(ups, 0.2)["x"], [2.0, 6.0])
    # too few clients to cut anything: the plain (unweighted) mean
    np.testing.assert_allclose(trimmed_mean(ups[:3], 0.2)["x"], [1.0, 6.0])
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        trimmed_mean(ups, 0.5)


def test_krum_and_multi_krum_by_hand():
    # four close points and one far one; n = 5, f = 1: each score sums the n - f - 2 = 2 nearest
    ups = _ups([0.0], [1.0], [2.0], [3.0], [100.0])
    # squared distances to the 2 nearest: 0 -> 1 + 4 = 5; 1 -> 1 + 1 = 2; 2 -> 2; 3 -> 1 + 4 = 5
    assert krum_select(ups, byzantine=1, keep=1) in ([1], [2])
    assert krum_select(ups, byzantine=1, keep=4) == [0, 1, 2, 3]
    multi = robust_aggregate(ups, [1, 1, 1, 1, 1], "multi-krum", byzantine=1)
    np.testing.assert_allclose(multi["x"], [1.5])  # mean of the four kept
    weighted = robust_aggregate(ups, [3, 1, 1, 1, 100], "multi-krum", byzantine=1)
    np.testing.assert_allclose(weighted["x"], [(0 * 3 + 1 + 2 + 3) / 6])  # FedAvg weights kept
    assert robust_aggregate(ups, [1] * 5, "krum", byzantine=1)["x"][0] in (1.0, 2.0)


def test_mean_rule_is_fedavg_and_unknown_rule_is_refused():
    ups = _ups([0.0], [3.0])
    np.testing.assert_allclose(robust_aggregate(ups, [2, 1], "mean")["x"], [1.0])
    with pytest.raises(ValueError, match="median"):
        robust_aggregate(ups, [1, 1], "mode")


def test_update_norm_by_hand():
    sent = {"w": np.array([1.0, 2.0]), "b": np.array([0.0])}
    up = {"w": np.array([4.0, 6.0]), "b": np.array([0.0]), "extra": np.array([12.0]),
          "count": np.array([7])}
    # (3, 4) from w, 0 from b, 12 from the array the client never received; ints ignored
    assert update_norm(up, sent) == pytest.approx(13.0)
    assert update_norm({"w": np.array([3.0, 4.0])}) == pytest.approx(5.0)


def test_norm_outliers_by_hand():
    assert norm_outliers({0: 1.0, 1: 2.0, 2: 3.0, 3: 100.0}, 10.0) == (2.5, [3])
    assert norm_outliers({0: 1.0, 1: 2.0, 2: 3.0, 3: 100.0}, 0.0) == (None, [])  # off
    assert norm_outliers({0: 1.0, 1: 1000.0}, 10.0) == (None, [])  # 2 clients: no reference
    assert norm_outliers({0: 0.0, 1: 0.0, 2: 5.0}, 10.0) == (None, [])  # median 0


def test_structure_and_scalar_problems():
    expected = {"a": ((2,), np.dtype("float32")), "b": ((1,), np.dtype("float32"))}
    ok = {"a": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}
    assert structure_problems(ok, expected) == []
    bad = {"a": np.zeros(3, np.float32), "c": np.zeros(1, np.float32)}
    assert structure_problems(bad, expected) == [
        "missing key 'b'", "unexpected key 'c'", "'a' has shape (3,), expected (2,)"]
    assert structure_problems({**ok, "b": np.zeros(1, np.float64)}, expected) == [
        "'b' has dtype float64, expected float32"]
    assert scalar_problems({"n": 3, "mu": 0.5, "flag": True, "name": "x"}) == []
    assert scalar_problems({"mu": float("nan"), "s": [1.0, float("inf")], "n": 2}) == ["mu", "s"]
