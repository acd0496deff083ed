"""Accountants: pinned epsilon values, the exact q = 1 closed form, and the persisted history."""

import numpy as np
import pytest
from scipy.stats import norm

from histofed.privacy.accountant import (
    Ledger,
    epsilon,
    epsilon_curve,
    gaussian_epsilon,
    noise_for_epsilon,
)
from histofed.privacy.dp import PrivacyConfigError, check_mechanism

DELTA = 1e-5


@pytest.mark.parametrize("accountant, expected", [("rdp", 131.69), ("prv", 126.39)])
def test_sigma1_q1_150_rounds_matches_reference(accountant, expected):
    assert epsilon([(1.0, 1.0, 150)], DELTA, accountant) == pytest.approx(expected, abs=0.05)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_sigma2_q_half_150_rounds_is_18_to_20(accountant):
    assert 18.0 <= epsilon([(2.0, 0.5, 150)], DELTA, accountant) <= 20.0


def test_q1_prv_matches_closed_form_within_1_percent():
    for sigma, steps in [(1.0, 150), (2.0, 20), (5.0, 10)]:
        exact = gaussian_epsilon(sigma=sigma, steps=steps, delta=DELTA)
        assert epsilon([(sigma, 1.0, steps)], DELTA, "prv") == pytest.approx(exact, rel=0.01)
        assert epsilon([(sigma, 1.0, steps)], DELTA, "rdp") >= exact  # RDP is an upper bound


def test_closed_form_by_hand():
    # T releases with sigma = sqrt(T) are one release with mu = 1; check the GDP delta formula
    eps = gaussian_epsilon(sigma=2.0, steps=4, delta=0.05)
    assert eps == pytest.approx(gaussian_epsilon(sigma=1.0, steps=1, delta=0.05), rel=1e-9)
    mu = 1.0
    delta_at = norm.cdf(-eps / mu + mu / 2) - np.exp(eps) * norm.cdf(-eps / mu - mu / 2)
    assert delta_at == pytest.approx(0.05, rel=1e-6)
    # at eps = 0 the delta of 1-GDP is Phi(1/2) - Phi(-1/2) = 0.3829: any larger delta gives 0
    assert gaussian_epsilon(sigma=1.0, steps=1, delta=0.39) == 0.0
    assert gaussian_epsilon(sigma=0.0, steps=1, delta=DELTA) == float("inf")


def test_edge_histories():
    assert epsilon([], DELTA) == 0.0
    assert epsilon([(0.0, 1.0, 3)], DELTA) == float("inf")  # clipping only: no guarantee
    with pytest.raises(PrivacyConfigError, match='choose "rdp" or "prv"'):
        epsilon([(1.0, 1.0, 1)], DELTA, "gdp")


def test_ledger_merges_round_trips_and_grows():
    led = Ledger()
    for _ in range(3):
        led.step(sigma=1.5, q=0.5)
    led.step(sigma=2.0, q=0.5, steps=2)
    assert led.history == [(1.5, 0.5, 3), (2.0, 0.5, 2)] and led.steps == 5
    scalars = led.to_scalars()
    assert scalars == {"dp_sigma": [1.5, 2.0], "dp_rate": [0.5, 0.5], "dp_steps": [3, 2]}
    back = Ledger.from_scalars(scalars)
    assert back == led and back.epsilon(DELTA) == led.epsilon(DELTA)
    assert Ledger.from_scalars({}).history == []
    with pytest.raises(ValueError, match="corrupt privacy history"):
        Ledger.from_scalars({"dp_sigma": [1.0], "dp_rate": [], "dp_steps": [1]})
    curve = epsilon_curve(sigma=1.0, q=1.0, rounds=5, delta=DELTA, accountant="rdp")
    assert [r for r, _ in curve] == [1, 2, 3, 4, 5]
    assert all(a[1] < b[1] for a, b in zip(curve, curve[1:]))


def test_noise_for_epsilon_meets_target():
    sigma = noise_for_epsilon(target_epsilon=8.0, delta=DELTA, q=1.0, steps=20)
    eps = epsilon([(sigma, 1.0, 20)], DELTA, "rdp")
    assert 7.99 <= eps <= 8.0
    assert epsilon([(sigma * 0.97, 1.0, 20)], DELTA, "rdp") > 8.0
    with pytest.raises(PrivacyConfigError, match="must be > 0"):
        noise_for_epsilon(target_epsilon=0.0, delta=DELTA, q=1.0, steps=20)


@pytest.mark.parametrize("kwargs, match", [
    ({"sigma": -0.1}, "sigma = -0.1"),
    ({"clip": 0.0}, "clip = 0.0"),
    ({"q": 0.0}, r"q = 0.0: the sampling rate must be in \(0, 1\]"),
    ({"q": 1.5}, "q = 1.5"),
    ({"delta": 1.0}, "delta must be in"),
    ({"delta": 0.2, "population": 7}, r"delta = 0.2 is >= 1/7 \(number of clients\)"),
])
def test_bad_mechanism_parameters(kwargs, match):
    with pytest.raises(PrivacyConfigError, match=match):
        check_mechanism(**kwargs)
