"""One-step-ahead load forecasts for the DOPD controller (paper §4).

The paper's code refits ``pmdarima.auto_arima`` on a 50-point window every interval (0.1-0.8 s a
call; below 5 points it returns the last value). The simulator calls three forecasters per
simulated interval, thousands of times, so ``"arima"`` keeps auto_arima's procedure on a small search:

1. The lowest-AIC model among (1,0,0), (0,0,1), (1,0,1) with a mean and (0,1,1), (1,1,0), (1,1,1)
   with drift, on the likelihood of y[1:] given y[0] so that the AIC compares across d. pmdarima
   picks d by a KPSS test first; after a level shift (4 below) the window is 5-15 points, KPSS has
   no power there and chose d=0 on ramps, lagging them by several intervals.
2. Parameters from statsmodels' Hannan-Rissanen estimator (``estimator="hr"``, default: regressions,
   no optimiser), or exact MLE with ``statsmodels.tsa.arima.model.ARIMA`` (``"mle"``, ~10x slower).
   Reselected every ``refit_every`` observations.
3. Forecasts apply the fitted model to the current window with an exact scalar Kalman filter; it
   reproduces statsmodels' ``forecast(1)`` and likelihood to 1e-6 (tested) in ~20 us, not ~5 ms.
4. A value beyond ``surprise_z`` sigmas (and 10%) of the forecast is a surprise; if the next one is
   beyond the same band on the same side, that is a level shift and the window restarts at it. An
   ARIMA fitted across a step is misspecified and recovers only slowly. The surprise is dropped
   too: live intervals do not line up with a change, and the one that straddles it is a mix of
   old and new (kept, it biased the forecast for the whole window: 661 for a load of 64-token
   prompts after 3000-token ones). If the next value moves on in the shift's direction (a change
   over several intervals), the window restarts there again. Between a surprise and the next
   value the forecast is the last value; the second is judged against the band from before the
   surprise, not a model refitted on it (whose sigma the surprise itself inflates).

Measured by ``python -m dopd.policy.forecast`` on the 2-core dev box: hr ~1 ms per observe+predict
amortised (one reselection, six Hannan-Rissanen fits, ~12 ms; statsmodels' per-call overhead is
most of it), a LoadForecast ~3 ms per interval, ewma/last ~1 us. mle ~13 ms, but only with
OPENBLAS_NUM_THREADS=1: on a busy box threaded BLAS on tiny matrices made it 20-30x slower (hr is
hardly affected). Forecasts are never negative or NaN: a constant window returns its value; a
failed fit, or a forecast beyond the window's range widened by its span, falls back to the EWMA.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from dataclasses import dataclass

import numpy as np

METHODS = ("arima", "ewma", "last")
ESTIMATORS = ("hr", "mle")
# Up to one AR and one MA term: enough for one-step load forecasts, and what _kalman handles.
CANDIDATES = [(1, 0, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 0), (1, 1, 1)]
# Right after a level shift, a further move in its direction by this share of it means the change
# is still under way (it spans more than one interval): the window starts again there.
SETTLING_SHARE = 0.25
# A change of less than this share of the level is never a surprise, whatever the fit's sigma: on
# five points sigma can come out at a third of the noise, and a 10% change in load is the
# model's to follow, not a reason to forget the window.
SURPRISE_FLOOR = 0.1


@dataclass(slots=True)
class _Fit:
    order: tuple[int, int, int]
    mean: float  # mean of the (differenced) series: the level for d=0, the drift for d=1
    phi: float  # AR(1) coefficient, 0 without an AR term
    theta: float  # MA(1) coefficient, 0 without an MA term
    sigma: float


def _kalman(z: np.ndarray, phi: float, theta: float, skip: int = 0) -> tuple[float, float, float]:
    """Exact Kalman filter of a zero-mean ARMA(1,1) (phi or theta may be 0), unit noise, from the
    stationary state. Returns (next forecast, sum log innovation variance, sum squared standardised
    innovation) over all but the first ``skip`` innovations: what a concentrated Gaussian likelihood
    needs. In Harvey's state form it collapses to scalars; unlike a recursion from zero errors it
    stays exact with theta = -1, which MLE often returns.
    """
    var = (1 + 2 * phi * theta + theta * theta) / (1 - phi * phi)  # stationary variance
    forecast, sum_log_var, sum_sq = 0.0, 0.0, 0.0
    for i, value in enumerate(z.tolist()):
        innovation = value - forecast
        if i >= skip:
            sum_log_var += math.log(var)
            sum_sq += innovation * innovation / var
        forecast = phi * forecast + (phi + theta / var) * innovation
        var = max(1 + theta * theta - theta * theta / var, 1.0)  # >= 1: floors rounding near theta = -1
    return forecast, sum_log_var, sum_sq


def _one_step(y: np.ndarray, fit: _Fit) -> float:
    z = (np.diff(y) if fit.order[1] else y) - fit.mean
    return _kalman(z, fit.phi, fit.theta)[0] + fit.mean + (float(y[-1]) if fit.order[1] else 0.0)


def _estimate(y: np.ndarray, order: tuple[int, int, int], estimator: str) -> tuple[_Fit, float]:
    """Fit one candidate order (p, q <= 1); returns the fit and its AIC. Raises on any failure.

    The AIC uses the likelihood of y[1:] given y[0] for every d: that is what a d=1 model's
    likelihood is (its first point is diffuse), so dropping y[0]'s term from d=0 models makes the
    AICs comparable across d.
    """
    p, d, q = order
    if estimator == "mle":
        from statsmodels.tsa.arima.model import ARIMA

        res = ARIMA(y, order=order, trend="t" if d else "c").fit(cov_type="none")
        par = [float(x) for x in res.params]
        fit = _Fit(order, par[0], par[1] if p else 0.0, par[1 + p] if q else 0.0, math.sqrt(par[-1]))
        llf = float(np.sum(res.llf_obs[1:]))
    else:
        from statsmodels.tsa.arima.estimators.hannan_rissanen import hannan_rissanen

        z = np.diff(y) if d else y
        mean = float(z.mean())
        par, _ = hannan_rissanen(z - mean, ar_order=p, ma_order=q, demean=False)
        phi = float(par.ar_params[0]) if p else 0.0
        theta = float(par.ma_params[0]) if q else 0.0
        if abs(phi) >= 1.0 or abs(theta) > 1.0:  # non-stationary or non-invertible
            raise ValueError(f"inadmissible estimate phi={phi} theta={theta}")
        skip = 1 - d
        _, sum_log_var, sum_sq = _kalman(z - mean, phi, theta, skip)
        num_obs = len(z) - skip
        sigma2 = sum_sq / num_obs  # the concentrated-out scale
        llf = -0.5 * num_obs * (math.log(2 * math.pi * sigma2) + 1) - 0.5 * sum_log_var
        fit = _Fit(order, mean, phi, theta, math.sqrt(sigma2))
    aic = -2 * llf + 2 * (p + q + 2)  # + mean or drift, + sigma2
    if not all(math.isfinite(x) for x in (aic, fit.mean, fit.phi, fit.theta, fit.sigma)):
        raise ValueError("non-finite fit")
    return fit, aic


class Forecaster:
    """Sliding-window one-step forecaster of one series. Pure: no clock, no I/O."""

    def __init__(self, window: int = 50, min_points: int = 5, method: str = "arima", *,
                 estimator: str = "hr", alpha: float = 0.5, refit_every: int = 10,
                 surprise_z: float = 3.0) -> None:
        if method not in METHODS or estimator not in ESTIMATORS:
            raise ValueError(f"method in {METHODS}, estimator in {ESTIMATORS}; got {method!r}, {estimator!r}")
        self.window, self.min_points = window, max(1, min_points)
        self.method, self.estimator = method, estimator
        self.alpha, self.refit_every, self.surprise_z = alpha, refit_every, surprise_z
        self.reset()

    def reset(self) -> None:
        self._values: deque[float] = deque(maxlen=self.window)
        self._ewma = 0.0
        self._fit: _Fit | None = None
        self._num_since_fit = 0
        # (expected, threshold) of the model before the last observation, if that was a surprise
        self._surprise: tuple[float, float] | None = None
        self._shift = 0.0  # signed size of a level shift the last observation restarted the window at, else 0
        self._cached: float | None = None  # the model's forecast

    @property
    def num_points(self) -> int:
        return len(self._values)

    def observe(self, value: float) -> None:
        """Append one interval's value (non-finite values are dropped)."""
        value = float(value)
        if not math.isfinite(value):
            return  # a broken measurement must not poison the window
        shift = 0.0  # set when this observation restarts the window
        if self._surprise is not None:
            expected, threshold = self._surprise
            self._surprise = None
            if abs(value - expected) > threshold and (value - expected) * (self._values[-1] - expected) > 0:
                # A level shift: history before it now misleads, and so does the first surprise, which
                # in a live system is an interval that straddled the change (half old load, half new).
                shift = value - expected
        elif self._shift and (value - self._values[-1]) * self._shift > 0 \
                and abs(value - self._values[-1]) > SETTLING_SHARE * abs(self._shift):
            shift = self._shift  # the change is still under way (a ramp over intervals): start again here
        elif self.method == "arima" and len(self._values) >= self.min_points:
            expected = self._model()  # first: it may (re)fit, and the fit's sigma is the yardstick
            if self._fit is not None:
                sigma = self._fit.sigma
            else:  # no model: in a constant window any change is a surprise, otherwise none is
                sigma = 0.0 if min(self._values) == max(self._values) else math.inf
            threshold = max(self.surprise_z * sigma, SURPRISE_FLOOR * abs(expected), 1e-9)
            if abs(value - expected) > threshold:
                self._surprise = (expected, threshold)
        if shift:
            self._values.clear()
            self._fit = None
        # Only the next value may extend a shift: on a bursty trace, checking every value while the
        # window refilled restarted it again and again (141 role moves instead of 39 on Azure code).
        self._shift = shift
        self._ewma = value if not self._values else self.alpha * value + (1 - self.alpha) * self._ewma
        self._values.append(value)
        self._num_since_fit += 1
        self._cached = None

    def predict(self) -> float:
        """Forecast of the next value: >= 0, finite, 0.0 before any observation.

        Right after a surprise, the last value: the model, refitted on a window that now holds the
        surprise, extrapolates a step wildly (from 3000 down to 64 it said 0). If the surprise was
        a blip, the next value says so.
        """
        if not self._values:
            return 0.0
        return max(0.0, self._values[-1] if self._surprise else self._model())

    def _model(self) -> float:
        """The model's one-step forecast, cached until the next observation."""
        if self._cached is None:
            self._cached = self._predict()
        return self._cached

    def _predict(self) -> float:
        if self.method == "last":
            return self._values[-1]
        if self.method == "ewma" or len(self._values) < self.min_points:
            return self._ewma
        y = np.asarray(self._values)
        lo, hi = float(y.min()), float(y.max())
        if hi == lo:
            return lo
        if self._fit is None or self._num_since_fit >= self.refit_every:
            self._fit, self._num_since_fit = self._select(y), 0
        if self._fit is None:
            return self._ewma
        guess = _one_step(y, self._fit)
        span = hi - lo  # a one-step forecast far outside the window's range is a bad fit
        return guess if math.isfinite(guess) and lo - span <= guess <= hi + span else self._ewma

    def _select(self, y: np.ndarray) -> _Fit | None:
        """auto_arima in miniature: the lowest-AIC candidate; None if every fit fails."""
        # Import before silencing: statsmodels installs "always" filters on import, and inside the
        # block those would win over ours.
        from statsmodels.tsa.arima.estimators.hannan_rissanen import hannan_rissanen  # noqa: F401
        from statsmodels.tsa.arima.model import ARIMA  # noqa: F401

        best, best_aic = None, math.inf
        with warnings.catch_warnings():
            # Local only: convergence, frequency and rank warnings are routine on short windows
            # and say nothing the AIC does not.
            warnings.simplefilter("ignore")
            for order in CANDIDATES:
                try:
                    fit, aic = _estimate(y, order, self.estimator)
                except Exception:
                    continue
                if aic < best_aic:
                    best, best_aic = fit, aic
        return best


class CorrectionFactor:
    """EWMA of measured/predicted ratios, e.g. observed TTFT / profiled TTFT; starts at 1.0."""

    def __init__(self, alpha: float = 0.3, min_value: float = 0.25, max_value: float = 4.0) -> None:
        self.alpha, self.min_value, self.max_value = alpha, min_value, max_value
        self.value = 1.0

    def update(self, measured: float, predicted: float) -> float:
        # A zero or NaN prediction says nothing about the profile's bias: skip it.
        if predicted > 0 and math.isfinite(predicted) and math.isfinite(measured) and measured >= 0:
            ratio = min(max(measured / predicted, self.min_value), self.max_value)
            self.value = (1 - self.alpha) * self.value + self.alpha * ratio
        return self.value

    def reset(self) -> None:
        self.value = 1.0


@dataclass(frozen=True, slots=True)
class LoadPrediction:
    """What the controller plans the next interval with."""

    rate: float  # requests per second over the next interval
    mean_input_len: float
    mean_output_len: float
    var_input_len: float


class LoadForecast:
    """The three forecasters of paper §4 (rate, mean ISL, mean OSL) plus the ISL variance."""

    def __init__(self, window: int = 50, min_points: int = 5, method: str = "arima") -> None:
        self.rate = Forecaster(window, min_points, method)
        self.mean_input_len = Forecaster(window, min_points, method)
        self.mean_output_len = Forecaster(window, min_points, method)
        # The variance only scales a second-order term and is noisy: an EWMA is enough and cheap.
        self.var_input_len = Forecaster(window, min_points, "last" if method == "last" else "ewma")

    def observe(self, num_requests: int, interval_s: float, mean_input_len: float,
                var_input_len: float, mean_output_len: float) -> None:
        """Record one finished interval: its request count and length statistics (tokens)."""
        if interval_s > 0:  # a zero-length interval carries no rate; 0 would read as an idle one
            self.rate.observe(num_requests / interval_s)
        if num_requests > 0:  # an empty interval's mean length is undefined, not zero
            self.mean_input_len.observe(mean_input_len)
            self.var_input_len.observe(var_input_len)
            self.mean_output_len.observe(mean_output_len)

    def predict(self) -> LoadPrediction:
        """Forecasts for the next interval; lengths hold their last forecast through idle intervals."""
        return LoadPrediction(self.rate.predict(), self.mean_input_len.predict(),
                              self.mean_output_len.predict(), self.var_input_len.predict())

    def reset(self) -> None:
        for forecaster in (self.rate, self.mean_input_len, self.mean_output_len, self.var_input_len):
            forecaster.reset()


def _benchmark(num_steps: int = 1000, seed: int = 0) -> None:
    """Cost per observe+predict and one-step MAE on a drifting, noisy, slowly oscillating series."""
    import time

    Forecaster()._select(np.arange(10.0))  # import statsmodels outside the timed loops
    rng = np.random.default_rng(seed)
    t = np.arange(num_steps)
    series = 50 + 20 * np.sin(t / 40) + np.cumsum(rng.normal(0, 0.5, num_steps)) + rng.normal(0, 3, num_steps)
    runs = [("arima/hr", Forecaster(), num_steps), ("ewma", Forecaster(method="ewma"), num_steps),
            ("last", Forecaster(method="last"), num_steps),
            ("arima/mle", Forecaster(estimator="mle"), min(num_steps, 200))]  # slow on a busy box
    for label, forecaster, num_points in runs:
        errors, start = [], time.perf_counter()
        for value in series[:num_points]:
            errors.append(abs(forecaster.predict() - value))
            forecaster.observe(value)
        ms = (time.perf_counter() - start) / num_points * 1e3
        mae = np.mean(errors[50:])
        print(f"{label:>10}: {ms:7.3f} ms per observe+predict (amortised), "
              f"MAE {mae:.2f} over {num_points} points")
    load, start = LoadForecast(), time.perf_counter()
    for value in series:
        load.observe(int(value * 10), 10.0, 10 * value, value, 2 * value)
        load.predict()
    ms = (time.perf_counter() - start) / num_steps * 1e3
    print(f"LoadForecast (3 arima/hr + 1 ewma): {ms:.3f} ms per interval")


if __name__ == "__main__":
    _benchmark()
