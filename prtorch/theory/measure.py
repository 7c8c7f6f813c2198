"""Measure phases and exponents on trajectories, and hold them against the predictions (model.md §6).

Works on any :class:`~prtorch.record.Curves` (SGD replicas, GD, GF, theory curves): every curve
(column) is measured on its own, NaN where a phase is never reached; a summary is the median over
curves with a bootstrap confidence interval (resampling curves, fixed seed). A curve that diverged
(NaN from some record on) is left out of every measurement (``settings.n_diverged`` counts them).

**Phase times** (:func:`detect_phase_times`), with ``s*`` the target's ``w*^T Q w*``:

* ``T1``: first time ``|u|/s* >= delta`` (default ``delta = 0.1``: small enough that Phase I is still
  linear - ``s ~ u^2`` is ~``0.01``, so the dropped ``12 s`` changes the rate by ~3% - and large enough
  to be well above the ``|u(0)| ~ d^{-1/2}`` start for ``d >~ 100``; the paper leaves ``delta`` open);
* ``T1_prime``: the time after which ``s/s*`` stays above ``1/3`` (last up-crossing; ``0``-th record
  time if it never dips below, NaN if it ends below);
* ``T2``: first time ``1 - |u|/s* <= eps`` (default ``eps = 0.1``, i.e. ``u = 0.9`` as in Fig. 4).

A crossing between two records is interpolated linearly in ``log t`` (linearly in ``t`` when the
earlier record is at ``t = 0``).

**Exponent windows.** Each tail law is a sum over modes ``sum_i c_i e^{-r lambda_i tau}``; it is a power
law only while the modes being resolved (``r lambda_i tau ~ 1``) are neither the first few nor the
last ones. A window is therefore given in mode ranks: ``tau in [1/(r lambda_{n_lo}), 1/(r lambda_{n_hi})]``
(defaults ``n_lo = 5``, ``n_hi = max(d/10, 4 n_lo)``), with

* MSE drop ``1 - MSE(T2 + tau)/MSE(T2) ~ tau^{1/a}``: ``tau = t - T2``, ``r = 16 s*``;
* ``1 - |u|/s* ~ tau^{-beta}`` (Phase IIb): ``tau = t - T1'``, ``r = 8 s*``;
* loss ``L ~ tau^{-(1-1/a)}``: ``tau = t - T2``, ``r = 16 s*``;
* growth rate ``rho``: ``u = C e^{rho t} + b`` fitted by least squares on ``t <= T1``, cut where
  ``s/s*`` reaches ``s_lin = 0.02`` if earlier (the offset ``b`` absorbs the slowly growing
  non-dominant roots; ~1% bias on GF at ``d = 300, 1000``, against 2-4% for a plain log-linear fit;
  worse - up to ~10-20% - when the second root of ``D`` is close to ``rho`` and ``u(0) ~ 0``).

Points below ``floor`` (default ``1e-12``) are dropped; a window with fewer than ``min_points``
records, or spanning less than a factor ``min_span`` in ``tau``, gives NaN.
Exponents are reported as the positive numbers in the laws above (decay exponents for ``1 - u``
and the loss, the growth exponent for the MSE drop).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import optimize

from prtorch.record import Curves
from prtorch.theory import phases as P

__all__ = [
    "crossing_time", "detect_phase_times", "fit_loglog", "default_n_hi", "mode_window", "fit_window_slopes",
    "fit_growth_rate", "fit_mse_tail_drop", "fit_one_minus_u", "fit_loss_tail", "fit_phase1_rate",
    "bootstrap_median", "phase_report",
]

DELTA, EPS, S_LEVEL, S_LIN = 0.1, 0.1, 1.0 / 3.0, 0.02


# ----------------------------------------------------------------------------------------------
# phase times

def _interp_time(t0: float, t1: float, y0: float, y1: float, level: float) -> float:
    f = 0.0 if y1 == y0 else (level - y0) / (y1 - y0)
    f = min(max(f, 0.0), 1.0)
    if t0 > 0 and t1 > 0:
        return float(math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0))))
    return float(t0 + f * (t1 - t0))


def crossing_time(t, y, level: float, direction: str = "up", last: bool = False) -> float:
    """Time at which ``y`` reaches ``level`` (``direction="up"``: ``y >= level``; ``"down"``: ``y <= level``).

    ``last=False``: the first such time. ``last=True``: the time after which the condition holds for
    good (the last crossing; NaN if it fails at the last record). Returns the first record's time if
    the condition already holds there (and, for ``last``, throughout); NaN if never reached.
    Non-finite records are skipped.
    """
    if direction not in ("up", "down"):
        raise ValueError(f"direction={direction!r}: expected 'up' or 'down'")
    t, y = np.asarray(t, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(t) & np.isfinite(y)
    t, y = t[ok], y[ok]
    if t.size == 0:
        return float("nan")
    if np.any(np.diff(t) < 0):
        raise ValueError("crossing_time needs times in increasing order")
    hit = y >= level if direction == "up" else y <= level
    if last:
        if not hit[-1]:
            return float("nan")
        miss = np.flatnonzero(~hit)
        if miss.size == 0:
            return float(t[0])
        k = int(miss[-1]) + 1
    else:
        if not hit.any():
            return float("nan")
        k = int(np.argmax(hit))
        if k == 0:
            return float(t[0])
    return _interp_time(t[k - 1], t[k], y[k - 1], y[k], level)


def detect_phase_times(curves: Curves, delta: float = DELTA, eps: float = EPS,
                       s_level: float = S_LEVEL, s_star: float = 1.0) -> dict:
    """Per-curve phase times ``{"T1", "T1_prime", "T2"}``, each ``(R,)`` (NaN if never reached).

    ``T1``: first ``|u|/s* >= delta``; ``T1_prime``: ``s/s* > s_level`` from then on; ``T2``: first
    ``1 - |u|/s* <= eps``. Interpolated in log time between records (see the module docstring).
    """
    R = curves.n_curves
    out = {k: np.full(R, np.nan) for k in ("T1", "T1_prime", "T2")}
    for r in range(R):
        t = curves.time[:, r]
        au = np.abs(curves.values["u"][:, r]) / s_star
        s = curves.values["s"][:, r] / s_star
        out["T1"][r] = crossing_time(t, au, delta, "up")
        out["T1_prime"][r] = crossing_time(t, s, s_level, "up", last=True)
        out["T2"][r] = crossing_time(t, 1.0 - au, eps, "down")
    return out


# ----------------------------------------------------------------------------------------------
# fits

def fit_loglog(x, y, lo: float = 0.0, hi: float = np.inf, floor: float = 1e-12,
               min_points: int = 3, min_span: float = 3.0) -> float:
    """Least-squares slope of ``log y`` on ``log x`` over ``lo <= x <= hi``, ``x > 0``, ``y > floor``
    (NaN if fewer than ``min_points`` points or ``max x / min x < min_span``)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    with np.errstate(all="ignore"):
        sel = np.isfinite(x) & np.isfinite(y) & (x > 0) & (x >= lo) & (x <= hi) & (y > floor)
    if sel.sum() < min_points or x[sel].max() / x[sel].min() < min_span:
        return float("nan")
    return float(np.polyfit(np.log(x[sel]), np.log(y[sel]), 1)[0])


def default_n_hi(d: int, n_lo: int = 5) -> int:
    """``max(d // 10, 4 n_lo)``, capped at ``d``: the last resolved mode of the default windows."""
    return int(min(d, max(d // 10, 4 * n_lo)))


def mode_window(lam, rate: float, n_lo: int = 5, n_hi: int | None = None) -> tuple:
    """``(tau_lo, tau_hi) = (1/(rate lambda_{n_lo}), 1/(rate lambda_{n_hi}))``, ranks 1-based in the
    decreasing spectrum; default ``n_hi = max(d // 10, 4 n_lo)`` (capped at ``d``).
    ``(nan, nan)`` if the window is empty."""
    ls = np.sort(np.asarray(lam, dtype=float))[::-1]
    d = ls.size
    n_hi = default_n_hi(d, n_lo) if n_hi is None else int(n_hi)
    n_lo, n_hi = max(1, int(n_lo)), min(d, n_hi)
    if n_hi <= n_lo or ls[n_hi - 1] >= ls[n_lo - 1]:
        return float("nan"), float("nan")
    return 1.0 / (rate * ls[n_lo - 1]), 1.0 / (rate * ls[n_hi - 1])


def fit_window_slopes(time, values, origin, window, transform=None, **kw) -> np.ndarray:
    """Per-curve log-log slope of ``transform(values, r)`` against ``tau = t - origin[r]`` over
    ``window = (tau_lo, tau_hi)``; ``time``/``values`` ``(T, R)``, ``origin`` ``(R,)``."""
    R = time.shape[1]
    out = np.full(R, np.nan)
    lo, hi = window
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return out
    for r in range(R):
        if not np.isfinite(origin[r]):
            continue
        y = values[:, r] if transform is None else transform(values[:, r], r)
        out[r] = fit_loglog(time[:, r] - origin[r], y, lo, hi, **kw)
    return out


def _value_at(t, y, t_star: float) -> float:
    """``y`` at ``t_star`` interpolated linearly in ``log t`` (linearly in ``t`` next to 0)."""
    t, y = np.asarray(t, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(t) & np.isfinite(y)
    t, y = t[ok], y[ok]
    if t.size == 0 or not np.isfinite(t_star) or t_star < t[0] or t_star > t[-1]:
        return float("nan")
    k = int(np.searchsorted(t, t_star))
    if k == 0 or t[k] == t_star:
        return float(y[k])
    t0, t1 = t[k - 1], t[k]
    f = (math.log(t_star / t0) / math.log(t1 / t0)) if t0 > 0 else (t_star - t0) / (t1 - t0)
    return float(y[k - 1] + f * (y[k] - y[k - 1]))


def fit_mse_tail_drop(curves: Curves, t2, lam, n_lo: int = 5, n_hi: int | None = None,
                      s_star: float = 1.0, **kw) -> np.ndarray:
    """Slope of ``1 - MSE(T2 + tau)/MSE(T2)`` vs ``tau`` (theory ``1/a``), window ``r = 16 s*``."""
    t2 = np.asarray(t2, dtype=float)
    mse = curves.values["mse"]
    ref = np.array([_value_at(curves.time[:, r], mse[:, r], t2[r]) for r in range(curves.n_curves)])
    return fit_window_slopes(curves.time, mse, t2, mode_window(lam, 16.0 * s_star, n_lo, n_hi),
                             lambda v, r: 1.0 - v / ref[r], **kw)


def fit_one_minus_u(curves: Curves, t1_prime, lam, s_star: float = 1.0, n_lo: int = 5,
                    n_hi: int | None = None, **kw) -> np.ndarray:
    """Decay exponent ``beta`` of ``1 - |u|/s* ~ (t - T1')^{-beta}`` in Phase IIb, window ``r = 8 s*``."""
    sl = fit_window_slopes(curves.time, curves.values["u"], np.asarray(t1_prime, dtype=float),
                           mode_window(lam, 8.0 * s_star, n_lo, n_hi), lambda v, r: 1.0 - np.abs(v) / s_star, **kw)
    return -sl


def fit_loss_tail(curves: Curves, t2, lam, n_lo: int = 5, n_hi: int | None = None,
                  s_star: float = 1.0, **kw) -> np.ndarray:
    """Decay exponent of the loss ``L(T2 + tau) ~ tau^{-gamma}`` (theory ``1 - 1/a``), window ``r = 16 s*``."""
    return -fit_window_slopes(curves.time, curves.values["loss"], np.asarray(t2, dtype=float),
                              mode_window(lam, 16.0 * s_star, n_lo, n_hi), **kw)


def fit_growth_rate(t, u, t_end: float, min_points: int = 4, min_growth: float = 2.0) -> float:
    """``rho`` from ``u(t) = C e^{rho t} + b`` on ``t <= t_end`` (``u`` signed as at ``t_end``).

    NaN if fewer than ``min_points`` records or if ``|u|`` grows by less than ``min_growth`` over the
    window (at small ``d`` ``|u(0)| ~ d^{-1/2}`` is already close to ``delta`` and SGD noise dominates).
    Initial guess from a log-linear fit of the second half of the window; falls back to that
    log-linear slope if the nonlinear fit fails.
    """
    t, u = np.asarray(t, dtype=float), np.asarray(u, dtype=float)
    ok = np.isfinite(t) & np.isfinite(u) & (t <= t_end * (1 + 1e-12))
    t, u = t[ok], u[ok]
    if t.size < min_points or not np.isfinite(t_end) or t_end <= 0:
        return float("nan")
    y = u * (np.sign(u[-1]) or 1.0)
    if not (y[-1] > 0 and y[-1] >= min_growth * abs(y[0])):
        return float("nan")  # Phase I too short to see the exponential (|u(0)| already ~ delta)
    half = (t >= t[-1] / 2) & (y > 0)
    if half.sum() >= 2:
        r0 = float(np.polyfit(t[half], np.log(y[half]), 1)[0])
    else:
        r0 = float(np.log(max(y[-1], 1e-300) / max(abs(y[0]), 1e-300)) / (t[-1] - t[0]))
    r0 = r0 if np.isfinite(r0) and r0 > 0 else 1.0 / t_end
    c0 = y[-1] * math.exp(-r0 * t[-1])
    scale = max(abs(y[-1]), 1e-300)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p, _ = optimize.curve_fit(lambda tt, c, r, b: (c * np.exp(r * tt) + b) / scale,
                                      t, y / scale, p0=[c0, r0, 0.0], maxfev=10000)
        rho = float(p[1])
        if not np.isfinite(rho) or rho <= 0 or rho > 20 * r0:
            return r0
        return rho
    except (RuntimeError, ValueError, optimize.OptimizeWarning):
        return r0


def fit_phase1_rate(curves: Curves, t1, s_lin: float = S_LIN, s_star: float = 1.0) -> np.ndarray:
    """Per-curve :func:`fit_growth_rate` on ``u`` up to ``min(T1, first time s/s* >= s_lin)``.

    The cap keeps the window linear: the neglected term ``12 s`` shifts the mode rates by ``3 s/s*``
    relative to ``4 s*``, so ``s_lin = 0.02`` bounds that bias by ~6% at the window's end (it matters
    when ``w*_1`` is small and ``s`` grows through the top mode before ``u`` reaches ``delta``).
    """
    t1 = np.asarray(t1, dtype=float)
    out = np.full(curves.n_curves, np.nan)
    for r in range(curves.n_curves):
        t = curves.time[:, r]
        ts = crossing_time(t, curves.values["s"][:, r] / s_star, s_lin, "up")
        te = np.nanmin([t1[r], ts]) if np.isfinite(t1[r]) else float("nan")
        out[r] = fit_growth_rate(t, curves.values["u"][:, r], te)
    return out


# ----------------------------------------------------------------------------------------------
# bootstrap and report

def bootstrap_median(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Median over curves with a percentile bootstrap CI (resample curves with replacement).

    Returns ``{"value", "ci_low", "ci_high", "n"}`` (plain floats/int); NaNs are dropped first; with
    one curve the interval collapses to the value, with none everything is NaN; ``n_boot = 0`` gives
    the median with a NaN interval (no bootstrap).
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    med = float(np.median(v))
    if v.size == 1:
        return {"value": med, "ci_low": med, "ci_high": med, "n": 1}
    if int(n_boot) < 1:
        return {"value": med, "ci_low": float("nan"), "ci_high": float("nan"), "n": int(v.size)}
    rng = np.random.default_rng(seed)
    meds = np.median(v[rng.integers(0, v.size, size=(n_boot, v.size))], axis=1)
    lo, hi = np.quantile(meds, [(1 - level) / 2, (1 + level) / 2])
    return {"value": med, "ci_low": float(lo), "ci_high": float(hi), "n": int(v.size)}


def _f(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _median(x) -> float:
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else float("nan")


def finite_curves(c: Curves) -> np.ndarray:
    """``(R,)`` bool: curves whose metrics are finite wherever they have a record time (a diverged
    replica or a blown-up theory curve is NaN from its divergence on)."""
    ok = np.ones(c.n_curves, dtype=bool)
    has_t = np.isfinite(c.time)
    for v in c.values.values():
        ok &= ~np.any(has_t & ~np.isfinite(v), axis=0)
    return ok


def _drop_diverged(c: Curves, ok=None) -> Curves:
    """``c`` with each diverged curve (not ``ok``; default :func:`finite_curves`) blanked to NaN: its
    records up to the blow-up are not a trajectory of the dynamics being measured (``|u|`` passes
    ``1 - eps`` on the way up), so it counts as not measured rather than as an early phase time."""
    ok = finite_curves(c) if ok is None else ok
    if ok.all():
        return c
    return Curves(c.model, np.where(ok[None, :], c.time, np.nan),
                  {k: np.where(ok[None, :], v, np.nan) for k, v in c.values.items()}, c.columns, c.info)


def _measure_all(c: Curves, lam, s_star, delta, eps, s_level, n_lo, n_hi, floor, s_lin=S_LIN):
    times = detect_phase_times(c, delta, eps, s_level, s_star)
    kw = dict(n_lo=n_lo, n_hi=n_hi, floor=floor)
    ex = {
        "rho": fit_phase1_rate(c, times["T1"], s_lin, s_star),
        "mse_tail_drop": fit_mse_tail_drop(c, times["T2"], lam, s_star=s_star, **kw),
        "one_minus_u": fit_one_minus_u(c, times["T1_prime"], lam, s_star, **kw),
        "loss_tail": fit_loss_tail(c, times["T2"], lam, s_star=s_star, **kw),
    }
    return times, ex


def phase_report(measured: Curves, predicted: dict | None = None, lam=None, w_star=None, w0=None,
                 *, a: float | None = None, delta: float = DELTA, eps: float = EPS,
                 s_level: float = S_LEVEL, s_lin: float = S_LIN, n_lo: int = 5, n_hi: int | None = None,
                 floor: float = 1e-12, mask=None, diverged=None, max_inits: int = 8, n_boot: int = 2000,
                 level: float = 0.95, seed: int = 0) -> dict:
    """Measured phase times and exponents against the paper's (and our) predictions.

    measured: the curves to measure (every column is one replica; pass ``mask`` to select, e.g., one
    learning rate). Diverged curves are left out: those NaN from some record on, and those flagged in
    ``diverged`` (``(R,)`` bool, e.g. from ``summary.json``, for curves read back from ``metrics.csv``,
    which holds no rows after a divergence). predicted: optional named theory curves (GF, SGD equivalent, ...), measured by
    the same procedure and reported under ``"models"``. lam, w_star: the instance; w0: its initial
    weights (``(d,)`` or ``(R, d)``; theory values use the median over its distinct rows, at most
    ``max_inits`` of them; the ``O(d^3)`` predictions - ``T1'`` and the second root - are skipped
    (NaN) above ``d = 4000``). ``a``: the power-law exponent, inferred from ``lam`` if None.
    Windows and thresholds: see the module docstring.

    Returns (JSON-serialisable, NaN allowed)::

        {"settings": {...},
         "phases":    {"T1" | "T1_prime" | "T2": ENTRY},
         "exponents": {"rho" | "mse_tail_drop" | "one_minus_u" | "loss_tail" | "tail_mass": ENTRY}}
        ENTRY = {"measured": {"value", "ci_low", "ci_high", "n"}, "predicted": float,
                 "source": str, "note": str, "models": {name: float}, ...extras}

    ``measured`` is the median over replicas with a bootstrap CI (see :func:`bootstrap_median`).
    Extras: ``T2`` has ``"bound"`` (:func:`~prtorch.theory.phases.t2_bound`, direct form, from the
    measured ``T1'``); ``one_minus_u`` has ``"candidates"`` (``paper_bound`` ``(a-1)/(2a)``,
    ``appendix`` ``1/a``, ``tail_mass`` ``1-1/a``) and ``"closest"`` (the candidate nearest to the
    measured value, tied names joined by ``+``, e.g. ``"appendix+tail_mass"`` at ``a = 2``; None if
    not measured; ``tail_mass_finite_d`` is the tail-mass law at this ``d`` on the fit window, i.e.
    ``predicted_window``, when it exists); ``one_minus_u``, ``mse_tail_drop`` and ``loss_tail`` have
    ``"predicted_window"``: the same fit applied to the theory curve (quasi-static ``1 - u``, the
    proxy ``S_d``, the quasi-static loss) over the same window, i.e. the finite-``d`` prediction.
    """
    if lam is None or w_star is None:
        raise ValueError("phase_report needs lam and w_star")
    lam = np.asarray(lam, dtype=float)
    w_star = np.asarray(w_star, dtype=float)
    s_star = P.s_star_of(lam, w_star)
    a = P.infer_a(lam) if a is None else float(a)
    d = lam.size
    if diverged is not None:
        diverged = np.asarray(diverged, dtype=bool)
        if mask is not None:
            diverged = diverged[np.asarray(mask)]
    if mask is not None:
        mask = np.asarray(mask)
        measured = measured.subset(mask)
    W0 = None if w0 is None else np.atleast_2d(np.asarray(w0, dtype=float))
    if W0 is not None:
        if mask is not None and W0.shape[0] == mask.shape[0] and mask.dtype == bool:
            W0 = W0[mask]
        W0 = np.unique(W0, axis=0)[:max_inits]
    boot = dict(n_boot=n_boot, level=level, seed=seed)

    ok = finite_curves(measured) if diverged is None else finite_curves(measured) & ~diverged
    n_diverged = int((~ok).sum())
    times, ex = _measure_all(_drop_diverged(measured, ok), lam, s_star, delta, eps, s_level, n_lo, n_hi, floor,
                             s_lin)
    models = {}
    for name, c in (predicted or {}).items():
        models[name] = _measure_all(_drop_diverged(c), lam, s_star, delta, eps, s_level, n_lo, n_hi, floor, s_lin)

    def per_init(fn):
        if W0 is None:
            return float("nan")
        vals = []
        for w in W0:
            try:
                vals.append(_f(fn(w)))
            except (ValueError, RuntimeError, ZeroDivisionError, FloatingPointError):
                vals.append(float("nan"))
        return _median(vals)

    def entry(meas, pred, source, note, key, kind):
        e = {"measured": bootstrap_median(meas, **boot), "predicted": _f(pred), "source": source,
             "note": note}
        e["models"] = {name: _median(m[0 if kind == "phase" else 1][key]) for name, m in models.items()}
        return e

    # ---- phases
    rho = _f(P.growth_rate(lam, w_star))
    t1p_meas = _median(times["T1_prime"])
    t1p_pred = per_init(lambda w: P.predicted_t1_prime(w, lam, w_star)) if d <= 4000 else float("nan")
    t0 = t1p_meas if np.isfinite(t1p_meas) else t1p_pred
    t0_src = "measured T1' median" if np.isfinite(t1p_meas) else "predicted T1': none measured"
    phases = {
        "T1": entry(times["T1"], per_init(lambda w: P.escape_time(delta * s_star, w, lam, w_star)),
                    "phases.escape_time: log(delta/|c|)/rho, c = a0hat(rho)/D'(rho)",
                    f"first |u|/s* >= {delta}", "T1", "phase"),
        "T1_prime": entry(times["T1_prime"], t1p_pred,
                          "phases.predicted_t1_prime: linearised Phase-I s(t) reaches s*/3",
                          f"s/s* > {s_level:.4g} from then on; the linear flow keeps growing, so the "
                          "prediction is a lower estimate", "T1_prime", "phase"),
        "T2": entry(times["T2"], per_init(lambda w: P.predicted_t2(eps, w, lam, w_star, t0))
                    if np.isfinite(t0) else float("nan"),
                    f"phases.predicted_t2: quasi-static 1 - u from T1' ({t0_src})",
                    f"first 1 - |u|/s* <= {eps}", "T2", "phase"),
    }
    phases["T2"]["bound"] = (per_init(lambda w: P.t2_bound(eps, w, lam, w_star, t0))
                             if np.isfinite(t0) else float("nan"))
    phases["T2"]["bound_source"] = f"phases.t2_bound(form='direct') from T1' ({t0_src}; an upper bound)"

    # ---- exponents
    win = {r: mode_window(lam, r * s_star, n_lo, n_hi) for r in (8.0, 16.0)}
    tail = a > 1  # the tail laws need a summable spectrum; a <= 1: no prediction (NaN)
    cands = P.one_minus_u_exponents(a) if tail else {}
    exps = {
        "rho": entry(ex["rho"], rho, "phases.growth_rate: root > 4 s* lambda_1 of the secular equation",
                     f"fit u = C e^(rho t) + b on t <= min(T1, s/s* = {s_lin}) (delta = {delta}); NaN where "
                     "|u| grows less than 2x in that window (small d: |u(0)| ~ d^-1/2 already near delta)",
                     "rho", "exp"),
        "mse_tail_drop": entry(ex["mse_tail_drop"], P.mse_drop_exponent(a) if tail else float("nan"),
                               "1/a (middle regime of S_d)",
                               "slope of 1 - MSE(T2+tau)/MSE(T2) vs tau = t - T2, tau in "
                               f"[{win[16.0][0]:.3g}, {win[16.0][1]:.3g}] (modes {n_lo}..n_hi at rate 16)",
                               "mse_tail_drop", "exp"),
        "one_minus_u": entry(ex["one_minus_u"], cands.get("tail_mass", float("nan")),
                             "1 - 1/a (quasi-static tail law, phases.one_minus_u_quasistatic)",
                             "decay exponent of 1 - |u|/s* vs tau = t - T1', tau in "
                             f"[{win[8.0][0]:.3g}, {win[8.0][1]:.3g}] (modes {n_lo}..n_hi at rate 8)",
                             "one_minus_u", "exp"),
        "loss_tail": entry(ex["loss_tail"], P.loss_tail_exponent(a) if tail else float("nan"),
                           "1 - 1/a (leading term 4 s* q of phases.phase3_loss)",
                           "decay exponent of L vs tau = t - T2, tau in "
                           f"[{win[16.0][0]:.3g}, {win[16.0][1]:.3g}]", "loss_tail", "exp"),
    }
    try:
        mm, xx = P.secular_roots(lam, w_star) if d <= 4000 else (np.array([np.nan]), np.array([np.nan]))
        exps["rho"]["second_root"] = _f(mm[-2] + xx[-2]) if mm.size > 1 else float("nan")
    except (ValueError, IndexError):
        exps["rho"]["second_root"] = float("nan")
    exps["rho"]["second_root_note"] = ("next root of D: a fit on a short Phase I is biased when "
                                       "rho - second_root is small")

    # finite-d predictions over the same windows (theory curves on a log grid)
    lo8, hi8 = win[8.0]
    lo16, hi16 = win[16.0]
    if np.all(np.isfinite([lo8, hi8])) and np.isfinite(t0):
        tau = np.logspace(np.log10(lo8), np.log10(hi8), 40)
        exps["one_minus_u"]["predicted_window"] = per_init(
            lambda w: -fit_loglog(tau, P.one_minus_u_quasistatic(t0 + tau, w, lam, w_star, t0), floor=floor))
    else:
        exps["one_minus_u"]["predicted_window"] = float("nan")
    if np.all(np.isfinite([lo16, hi16])):
        tau = np.logspace(np.log10(lo16), np.log10(hi16), 40)
        pi = np.full(d, 1.0 / d)
        exps["mse_tail_drop"]["predicted_window"] = _f(fit_loglog(tau, 1 - P.phase3_S(tau, pi, lam, s_star),
                                                                  floor=floor))
        t2m = _median(times["T2"])
        exps["loss_tail"]["predicted_window"] = (per_init(
            lambda w: -fit_loglog(tau, P.loss_quasistatic(t2m + tau, w, lam, w_star, t0), floor=floor))
            if np.isfinite(t2m) and np.isfinite(t0) else float("nan"))
    else:
        exps["mse_tail_drop"]["predicted_window"] = float("nan")
        exps["loss_tail"]["predicted_window"] = float("nan")
    # the 1 - u laws: the three asymptotic candidates, plus the tail-mass law evaluated at this d on
    # the same window (at d <= 1000 the asymptotic exponents are 0.03-0.1 off the finite-d slopes)
    m = exps["one_minus_u"]["measured"]["value"]
    cands = {k: float(v) for k, v in cands.items()}
    pw = _f(exps["one_minus_u"]["predicted_window"])
    if cands and np.isfinite(pw):
        cands["tail_mass_finite_d"] = pw
    exps["one_minus_u"]["candidates"] = cands
    closest = None
    if cands and np.isfinite(m):
        dist = {k: abs(v - m) for k, v in cands.items()}
        best = min(dist.values())
        closest = "+".join(k for k, v in dist.items() if v <= best + 1e-12)  # ties (a = 2, 3) joined
    exps["one_minus_u"]["closest"] = closest
    exps["mse_tail_drop"]["predicted_window_source"] = "uniform proxy S_d on the actual spectrum"
    exps["one_minus_u"]["predicted_window_source"] = "phases.one_minus_u_quasistatic from T1'"
    exps["loss_tail"]["predicted_window_source"] = "phases.loss_quasistatic from T1'"

    tm = _f(P.fit_tail_mass_exponent(lam, w_star))
    exps["tail_mass"] = {
        "measured": {"value": tm, "ci_low": tm, "ci_high": tm, "n": int(np.isfinite(tm))},
        "predicted": P.tail_mass_exponent(a) if tail else float("nan"),
        "source": "1 - 1/a (T(lambda) ~ lambda^(1-1/a))",
        "note": "log-log slope of T(lambda_k) = sum_{i>k} lambda_i w*_i^2 on the actual w*, "
                "ranks 5..d/20 (deterministic: no CI)",
        "models": {},
    }

    settings = {"delta": float(delta), "eps": float(eps), "s_level": float(s_level), "s_lin": float(s_lin), "n_lo": int(n_lo),
                "n_hi": int(n_hi if n_hi is not None else default_n_hi(d, n_lo)), "floor": float(floor),
                "a": float(a), "d": int(d), "s_star": float(s_star), "n_curves": int(measured.n_curves),
                "n_diverged": n_diverged,
                "n_boot": int(n_boot), "level": float(level), "seed": int(seed),
                "models": sorted(models)}
    return {"settings": settings, "phases": phases, "exponents": exps}
