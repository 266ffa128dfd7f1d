"""Load forecasting (dopd/policy/forecast.py) on synthetic series with fixed seeds."""

import math
import warnings

import numpy as np
import pytest

from dopd.policy import forecast as fc
from dopd.policy.forecast import CorrectionFactor, Forecaster, LoadForecast, LoadPrediction


def one_step_errors(series, **kwargs) -> np.ndarray:
    """Absolute one-step errors |predict() - next value| over the whole series."""
    forecaster = Forecaster(**kwargs)
    errors = []
    for value in series:
        errors.append(abs(forecaster.predict() - value))
        forecaster.observe(value)
    return np.array(errors)


@pytest.mark.parametrize("order", fc.CANDIDATES)
def test_kalman_matches_statsmodels(order):
    """The fast path is statsmodels' ARIMA: same forecast, same likelihood, same AIC."""
    from statsmodels.tsa.arima.model import ARIMA

    rng = np.random.default_rng(7)
    y = 50 + np.cumsum(rng.normal(0, 0.5, 50)) + rng.normal(0, 2, 50)
    model = ARIMA(y, order=order, trend="t" if order[1] else "c")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = model.fit()
    p, d, q = order
    par = list(res.params)
    fit = fc._Fit(order, par[0], par[1] if p else 0.0, par[1 + p] if q else 0.0, math.sqrt(par[-1]))
    assert fc._one_step(y, fit) == pytest.approx(float(res.forecast(1)[0]), rel=1e-6)
    # Log-likelihood of y[1:] | y[0] at arbitrary admissible parameters.
    phi, theta, mean, sigma2 = 0.4 * p, -0.3 * q, 0.2 if d else 50.0, 1.7
    params = [mean] + [phi] * p + [theta] * q + [sigma2]
    z = (np.diff(y) if d else y) - mean
    _, sum_log_var, sum_sq = fc._kalman(z, phi, theta, skip=1 - d)
    num = len(z) - (1 - d)
    llf = -0.5 * (num * math.log(2 * math.pi * sigma2) + sum_log_var + sum_sq / sigma2)
    assert llf == pytest.approx(model.loglikeobs(params)[1:].sum(), rel=1e-6)


def test_step_converges_within_five_intervals():
    rng = np.random.default_rng(1)
    series = np.r_[np.full(30, 10.0), np.full(30, 30.0)] + rng.normal(0, 0.5, 60)
    forecaster = Forecaster()
    predictions = []
    for value in series:
        predictions.append(forecaster.predict())
        forecaster.observe(value)
    predictions = np.array(predictions)
    assert np.all(np.abs(predictions[10:30] - 10) < 2.5)  # before the step: near 10
    assert np.all(np.abs(predictions[35:] - 30) < 2.5)  # at most 5 intervals after it: near 30
    assert np.all((predictions >= 0) & (predictions < 40))  # no overshoot beyond the step size


def test_mle_estimator_forecasts_a_short_ramp():
    # Few points on purpose: statsmodels MLE is ~10 ms a fit, far more on a busy box.
    series = 20 + 2.0 * np.arange(12) + np.random.default_rng(5).normal(0, 0.3, 12)
    forecaster = Forecaster(estimator="mle", min_points=12)  # one selection, on all 12 points
    for value in series:
        forecaster.observe(value)
    assert forecaster.predict() == pytest.approx(20 + 2.0 * 12, abs=1.5)
    fit, aic = fc._estimate(series, (0, 1, 1), "mle")
    assert fit.mean == pytest.approx(2.0, abs=0.3) and math.isfinite(aic)  # the drift


def test_noiseless_step_settles_within_five_intervals():
    series = [10.0] * 30 + [30.0] * 30
    forecaster = Forecaster()
    predictions = []
    for value in series:
        predictions.append(forecaster.predict())
        forecaster.observe(value)
    assert predictions[29] == 10.0
    # Within 1: the step leaks into the drift estimate (20 / window) until it leaves the window.
    assert np.all(np.abs(np.array(predictions[35:]) - 30.0) < 1.0)


def test_ramp_beats_last_value():
    rng = np.random.default_rng(2)
    t = np.arange(200)
    series = 100 + 2.0 * t + rng.normal(0, 1.0, 200)
    arima = one_step_errors(series)[50:]
    last = one_step_errors(series, method="last")[50:]
    assert np.all(arima < 0.1 * series[50:])
    assert arima.mean() < last.mean()
    assert arima.mean() < 2.0  # ~ noise (MAE of N(0,1) is 0.8), not the slope of 2


def test_noise_around_constant_is_bounded_by_sigma():
    rng = np.random.default_rng(3)
    sigma = 5.0
    series = 100 + rng.normal(0, sigma, 300)
    errors = one_step_errors(series)[20:]
    assert errors.mean() < 1.5 * sigma
    assert errors.max() < 5 * sigma


def test_constant_series_is_exact():
    forecaster = Forecaster()
    for _ in range(60):
        forecaster.observe(42.0)
        assert forecaster.predict() == 42.0


def test_fewer_than_min_points_uses_ewma_or_last():
    arima, last = Forecaster(min_points=5), Forecaster(min_points=5, method="last")
    for value in (10.0, 20.0, 40.0):
        arima.observe(value)
        last.observe(value)
    assert arima.predict() == pytest.approx(0.5 * 40 + 0.25 * 20 + 0.25 * 10)  # EWMA, alpha 0.5
    assert last.predict() == 40.0


@pytest.mark.parametrize("method", fc.METHODS)
def test_empty_predicts_zero(method):
    forecaster = Forecaster(method=method)
    assert forecaster.predict() == 0.0
    forecaster.observe(5.0)
    forecaster.reset()
    assert forecaster.predict() == 0.0 and forecaster.num_points == 0


@pytest.mark.parametrize("method", fc.METHODS)
def test_never_negative_or_nan_near_zero(method):
    rng = np.random.default_rng(4)
    series = np.maximum(0.0, rng.normal(0.2, 0.5, 200)) * (rng.random(200) < 0.5)
    forecaster = Forecaster(method=method)
    for value in series:
        forecaster.observe(value)
        prediction = forecaster.predict()
        assert prediction >= 0.0 and math.isfinite(prediction)


def test_fit_failure_falls_back_to_ewma(monkeypatch):
    def broken(*args, **kwargs):
        raise np.linalg.LinAlgError("boom")

    monkeypatch.setattr(fc, "_estimate", broken)
    forecaster = Forecaster(method="arima")
    for value in (1.0, 3.0, 2.0, 4.0, 3.0, 5.0):
        forecaster.observe(value)
    assert forecaster.predict() == pytest.approx(forecaster._ewma)


def test_non_finite_observations_are_ignored_and_bad_method_raises():
    forecaster = Forecaster()
    forecaster.observe(3.0)
    forecaster.observe(float("nan"))
    forecaster.observe(float("inf"))
    assert forecaster.num_points == 1 and forecaster.predict() == 3.0
    with pytest.raises(ValueError):
        Forecaster(method="prophet")


def test_correction_factor_converges_and_clamps():
    factor = CorrectionFactor()
    assert factor.value == 1.0
    for _ in range(50):
        factor.update(measured=2.0, predicted=1.0)
    assert factor.value == pytest.approx(2.0, rel=1e-3)
    for _ in range(50):
        factor.update(measured=1000.0, predicted=1.0)
    assert factor.value == pytest.approx(4.0, rel=1e-3)
    for _ in range(50):
        factor.update(measured=0.0, predicted=1.0)
    assert factor.value == pytest.approx(0.25, rel=1e-3)
    before = factor.value
    factor.update(measured=1.0, predicted=0.0)  # no information: ignored
    factor.update(measured=float("nan"), predicted=1.0)
    assert factor.value == before
    factor.reset()
    assert factor.value == 1.0


def test_load_forecast_keeps_lengths_through_empty_intervals():
    load = LoadForecast()
    for _ in range(10):
        load.observe(num_requests=50, interval_s=10.0, mean_input_len=512.0, var_input_len=100.0,
                     mean_output_len=128.0)
    before = load.predict()
    assert isinstance(before, LoadPrediction)
    assert before == LoadPrediction(rate=5.0, mean_input_len=512.0, mean_output_len=128.0,
                                    var_input_len=100.0)
    for _ in range(3):
        load.observe(num_requests=0, interval_s=10.0, mean_input_len=0.0, var_input_len=0.0,
                     mean_output_len=0.0)
    after = load.predict()
    assert after.mean_input_len == 512.0 and after.mean_output_len == 128.0 and after.var_input_len == 100.0
    assert after.rate < before.rate
    load.observe(num_requests=5, interval_s=0.0, mean_input_len=512.0, var_input_len=100.0,
                 mean_output_len=128.0)  # a zero-length interval must not read as rate 0 or inf
    assert math.isfinite(load.predict().rate)
    with pytest.raises(AttributeError):
        after.rate = 1.0  # frozen
    load.reset()
    assert load.predict() == LoadPrediction(0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("transition", [[1500.0], [300.0], [2000.0, 900.0]], ids=["half", "mostly-new", "two-intervals"])
@pytest.mark.parametrize("direction", ["down", "up"])
@pytest.mark.parametrize("noise", [0.0, 1.0], ids=["exact", "noisy"])  # the mock's lengths are exact
def test_a_live_step_straddling_intervals_is_followed_at_once(transition, direction, noise):
    """Live intervals do not line up with a change in load: the first one after it is a mix
    (ISL 3000 → 64 as in tests/test_policy_live.py). The forecast must reach the new level the
    interval after the change is complete, never overshoot it, and stay there, not carry the mixed
    interval in its window (it forecast 661 for 64-token prompts for the rest of the window)."""
    rng = np.random.default_rng(7)
    old, new = (3072.0, 64.0) if direction == "down" else (64.0, 3072.0)
    middle = transition if direction == "down" else [old + new - v for v in transition]
    series = ([old + noise * rng.normal(0, 3) for _ in range(20)] + middle
              + [new + noise * rng.normal(0, 1) for _ in range(30)])
    forecaster = Forecaster()
    predictions = []
    for value in series:
        forecaster.observe(value)
        predictions.append(forecaster.predict())
    after = np.array(predictions[20 + len(middle):])  # forecasts made once a pure new interval was seen
    assert np.all(np.abs(after - new) < 0.05 * 3000), after.round()
    during = np.array(predictions[20:20 + len(middle)])
    assert np.all((during >= min(old, new) - 10) & (during <= max(old, new) + 10)), during.round()
