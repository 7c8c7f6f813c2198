"""Phase detection, exponent fits, bootstrap CIs and the phase report (prtorch.theory.measure)."""
import json
import math

import numpy as np
import pytest

from prtorch.problem import make_instance, power_law_spectrum
from prtorch.record import Curves, save_steps
from prtorch.theory import measure as M


def _curves(t, **values):
    t = np.asarray(t, dtype=float)
    T = t.shape[0]
    vals = {k: np.asarray(v, dtype=float).reshape(T, -1) for k, v in values.items()}
    R = next(iter(vals.values())).shape[1]
    time = np.repeat(t[:, None], R, 1) if t.ndim == 1 else t
    return Curves("synthetic", time, vals, {"replica": np.arange(R)})


# ---------------------------------------------------------------- phase times

def test_crossing_time_interpolates_in_log_time():
    t = np.logspace(-2, 2, 41)
    y = 0.2 * np.log10(t / 1e-2)          # linear in log t: interpolation is exact
    for level in (0.13, 0.5, 0.77):
        assert M.crossing_time(t, y, level) == pytest.approx(1e-2 * 10 ** (level / 0.2), rel=1e-12)
    # down-crossing
    assert M.crossing_time(t, 1 - y, 1 - 0.5, "down") == pytest.approx(1e-2 * 10 ** 2.5, rel=1e-12)
    # never reached -> NaN; reached at the first record -> its time
    assert math.isnan(M.crossing_time(t, y, 5.0))
    assert M.crossing_time(t, y, -1.0) == t[0]
    # from t = 0 the interpolation is linear in t
    assert M.crossing_time([0.0, 2.0], [0.0, 1.0], 0.25) == pytest.approx(0.5)


def test_crossing_time_last_for_good():
    t = np.logspace(-1, 2, 31)
    lt = np.log10(t)
    # s rises above 1/3, dips below it around t = 1..3, and crosses for good at a known time
    s = np.where(lt < 0, 0.1 + 0.5 * (lt + 1), np.where(lt < 0.5, 0.2, 0.2 + 0.4 * (lt - 0.5)))
    t_good = 10 ** (0.5 + (1 / 3 - 0.2) / 0.4)
    assert M.crossing_time(t, s, 1 / 3) < 1.0                       # first crossing is earlier
    assert M.crossing_time(t, s, 1 / 3, last=True) == pytest.approx(t_good, rel=1e-12)
    assert math.isnan(M.crossing_time(t, s[::-1], 1 / 3, last=True))  # ends below -> NaN
    assert M.crossing_time(t, np.full_like(t, 0.5), 1 / 3, last=True) == t[0]


def test_detect_phase_times_on_synthetic_curves():
    t = np.concatenate([[0.0], np.logspace(-3, 3, 121)])
    lt = np.log10(np.maximum(t, 1e-3))
    R = 4
    # replica r: |u| = 0.01 * 10^{(lt+3)/2} capped at 1 - 0.5*10^{-(lt - lt2)}: piecewise linear in log t
    T1_true = np.array([0.01, 0.1, 1.0, np.nan])
    u = np.zeros((t.size, R))
    s = np.zeros((t.size, R))
    for r in range(3):
        a = math.log10(T1_true[r])
        # |u| linear in log t: equals 0.1 at lt = a, 0.9 at lt = a + 1, capped at 0.99
        u[:, r] = np.clip(0.1 + 0.8 * (lt - a), 1e-3, 0.99)
        # s: linear in log t, crosses 1/3 at lt = a + 0.5
        s[:, r] = np.clip(1 / 3 + 0.4 * (lt - a - 0.5), 0.0, 1.0)
    u[:, 3] = 0.05                      # never escapes
    s[:, 3] = 0.01
    u[:, 1] *= -1                       # sign does not matter
    u[80:, 2] = np.nan                  # diverged replica: records NaN from there
    s[80:, 2] = np.nan
    c = _curves(t, u=u, s=s, mse=np.ones_like(u), loss=np.ones_like(u))
    ph = M.detect_phase_times(c, delta=0.1, eps=0.1)
    np.testing.assert_allclose(ph["T1"][:3], T1_true[:3], rtol=1e-10)
    np.testing.assert_allclose(ph["T1_prime"][:2], T1_true[:2] * 10**0.5, rtol=1e-10)
    np.testing.assert_allclose(ph["T2"][:2], T1_true[:2] * 10, rtol=1e-10)
    assert np.isnan(ph["T1"][3]) and np.isnan(ph["T1_prime"][3]) and np.isnan(ph["T2"][3])
    # replica 2 diverged at t[80] = 10: it reached T1 (= 1) but T2 (would be 10) is past its last record
    assert t[79] < 10
    assert np.isnan(ph["T2"][2])
    # s_star rescales thresholds: with s* = 2, |u|/s* >= 0.1 means |u| >= 0.2
    ph2 = M.detect_phase_times(c, delta=0.1, eps=0.1, s_star=2.0)
    np.testing.assert_allclose(ph2["T1"][0], 0.01 * 10 ** (0.1 / 0.8), rtol=1e-10)


# ---------------------------------------------------------------- fits and CIs

def test_fit_loglog_and_windows():
    x = np.logspace(-1, 4, 60)
    y = 2.0 * x**0.37
    assert M.fit_loglog(x, y) == pytest.approx(0.37, rel=1e-10)
    assert M.fit_loglog(x, y, 1.0, 10.0) == pytest.approx(0.37, rel=1e-10)
    assert math.isnan(M.fit_loglog(x, y, 1.0, 2.0))            # span < 3
    assert math.isnan(M.fit_loglog(x, -y))                      # nothing above the floor
    lam = power_law_spectrum(1000, 2.0)
    lo, hi = M.mode_window(lam, 8.0)
    assert lo == pytest.approx(1 / (8 * lam[4])) and hi == pytest.approx(1 / (8 * lam[99]))
    assert M.default_n_hi(100) == 20 and M.default_n_hi(1000) == 100
    assert all(math.isnan(v) for v in M.mode_window(np.full(50, 0.02), 8.0))  # isotropic: empty


def test_exponent_fits_recover_known_laws():
    """Synthetic Curves whose tails are exact power laws in the fit windows."""
    lam = power_law_spectrum(1000, 2.0)
    t = np.concatenate([[0.0], np.logspace(-2, 6, 161)])
    T1p, T2 = np.array([0.5, 0.8]), np.array([1.0, 10**0.2])  # T2 on a record: MSE(T2) exact
    R = 2
    u, mse, loss, s = (np.zeros((t.size, R)) for _ in range(4))
    for r in range(R):
        tau1 = np.maximum(t - T1p[r], 1e-12)
        tau2 = np.maximum(t - T2[r], 0.0)
        u[:, r] = 1 - 0.3 * tau1**-0.61
        mse[:, r] = 0.25 * (1 - 0.01 * tau2**0.43)
        loss[:, r] = 0.5 * np.maximum(tau2, 1e-12) ** -0.29
        s[:, r] = 1.0
    c = _curves(t, u=u, s=s, mse=mse, loss=loss)
    np.testing.assert_allclose(M.fit_one_minus_u(c, T1p, lam), 0.61, rtol=1e-6)
    np.testing.assert_allclose(M.fit_mse_tail_drop(c, T2, lam), 0.43, rtol=1e-3)
    np.testing.assert_allclose(M.fit_loss_tail(c, T2, lam), 0.29, rtol=1e-6)
    # growth rate with an offset and a sign flip
    tt = np.linspace(0, 1, 51)
    assert M.fit_growth_rate(tt, -(0.01 * np.exp(3.3 * tt) - 0.004), 1.0) == pytest.approx(3.3, rel=1e-4)
    assert math.isnan(M.fit_growth_rate(tt, 0.05 + 0.01 * tt, 1.0))  # grows < 2x: no Phase I


def test_bootstrap_ci_contains_true_slope():
    beta, R = 0.55, 24
    tau = np.logspace(0, 3, 40)

    def slopes(rng):
        y = 3.0 * tau[:, None] ** -beta * np.exp(0.15 * rng.standard_normal((tau.size, R)))
        return np.array([-M.fit_loglog(tau, y[:, r]) for r in range(R)])

    ci = M.bootstrap_median(slopes(np.random.default_rng(1)), seed=0)
    assert ci["ci_low"] <= beta <= ci["ci_high"]
    assert ci["ci_high"] - ci["ci_low"] < 0.1 and ci["n"] == R
    # coverage over independent data sets (nominal 95%; percentile bootstrap of a median)
    hits = [(lambda c: c["ci_low"] <= beta <= c["ci_high"])(M.bootstrap_median(slopes(np.random.default_rng(k)),
                                                                               n_boot=500, seed=k))
            for k in range(40)]
    assert np.mean(hits) >= 0.8
    # deterministic given the seed; NaNs dropped; degenerate cases
    v = slopes(np.random.default_rng(2))
    assert M.bootstrap_median(v, seed=3) == M.bootstrap_median(np.append(v, np.nan), seed=3)
    assert M.bootstrap_median([0.4])["ci_low"] == 0.4
    assert math.isnan(M.bootstrap_median([np.nan])["value"])


# ---------------------------------------------------------------- report on a real SGD run

def _plain(obj):
    """True if obj is built from dict/list/str/bool/None/int/float only (no numpy scalars)."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_plain(v) for v in obj)
    return obj is None or type(obj) in (str, bool, int, float)


def test_phase_report_on_sgd_run():
    from prtorch.simulate import simulate
    from prtorch.theory.gradient_flow import gf_curves

    d, a = 100, 2.0
    inst = make_instance(d, a, 4, seed=3)            # |u(0)| = 0.002: a visible Phase I at d = 100
    n = 40000
    res = simulate(inst, 2.5e-3, n, save_steps(n, 40), algorithm="sgd", seed=0)
    c = res.curves
    g = gf_curves(inst.w0[0], inst.lam, inst.w_star, c.time[:, 0])
    rep = M.phase_report(c, {"gf": g}, inst.lam, inst.w_star, inst.w0)
    assert _plain(rep)
    json.dumps(rep, allow_nan=True)
    assert set(rep) == {"settings", "phases", "exponents"}
    assert set(rep["phases"]) == {"T1", "T1_prime", "T2"}
    assert set(rep["exponents"]) == {"rho", "mse_tail_drop", "one_minus_u", "loss_tail", "tail_mass"}
    for sec in ("phases", "exponents"):
        for name, e in rep[sec].items():
            assert {"measured", "predicted", "source", "note", "models"} <= set(e), name
            m = e["measured"]
            assert set(m) == {"value", "ci_low", "ci_high", "n"}
            assert all(math.isfinite(m[k]) for k in ("value", "ci_low", "ci_high")), (name, m)
            assert m["ci_low"] <= m["value"] <= m["ci_high"]
            assert math.isfinite(e["predicted"]), name
    assert rep["phases"]["T1"]["measured"]["value"] < rep["phases"]["T1_prime"]["measured"]["value"] \
        < rep["phases"]["T2"]["measured"]["value"]
    assert math.isfinite(rep["phases"]["T2"]["bound"])
    assert all(math.isfinite(rep["phases"][k]["models"]["gf"]) for k in ("T1", "T1_prime", "T2"))
    om = rep["exponents"]["one_minus_u"]
    assert set(om["candidates"]) == {"paper_bound", "appendix", "tail_mass", "tail_mass_finite_d"}
    assert om["candidates"]["tail_mass_finite_d"] == om["predicted_window"]
    assert set(om["closest"].split("+")) <= set(om["candidates"])
    assert om["candidates"]["appendix"] == om["candidates"]["tail_mass"] == 0.5  # a = 2: a tie
    dist = {k: abs(v - om["measured"]["value"]) for k, v in om["candidates"].items()}
    assert dist[om["closest"].split("+")[0]] == min(dist.values())
    # the predicted growth rate is what GF shows (5% low here: u(0) ~ 0, so the non-dominant roots
    # weigh on the short fit window), and SGD is close at this step size
    rho = rep["exponents"]["rho"]
    assert rho["models"]["gf"] == pytest.approx(rho["predicted"], rel=0.1)
    assert rho["measured"]["value"] == pytest.approx(rho["predicted"], rel=0.2)
    assert rep["settings"]["d"] == d and rep["settings"]["n_curves"] == 4
    assert rep["exponents"]["tail_mass"]["predicted"] == pytest.approx(0.5)
    # mask selects replicas
    rep2 = M.phase_report(c, None, inst.lam, inst.w_star, inst.w0, mask=np.array([True, True, False, False]))
    assert rep2["settings"]["n_curves"] == 2 and rep2["exponents"]["rho"]["models"] == {}


def test_phase_report_on_gf_agrees_with_theory():
    """On GF the measured numbers are the theory's own: rho to 3%, T2 below its bound."""
    from prtorch.record import save_times
    from prtorch.theory.gradient_flow import gf_curves

    inst = make_instance(300, 2.0, 1, seed=0)
    times = np.unique(np.concatenate([np.linspace(0, 1.5, 151), save_times(3e3, 20, 1e-2)]))
    g = gf_curves(inst.w0[0], inst.lam, inst.w_star, times)
    rep = M.phase_report(g, None, inst.lam, inst.w_star, inst.w0[0])
    ex, ph = rep["exponents"], rep["phases"]
    assert ex["rho"]["measured"]["value"] == pytest.approx(ex["rho"]["predicted"], rel=0.03)
    assert ph["T2"]["measured"]["value"] <= ph["T2"]["bound"]
    assert ph["T1"]["measured"]["value"] == pytest.approx(ph["T1"]["predicted"], rel=0.05)
    assert ph["T1_prime"]["predicted"] <= ph["T1_prime"]["measured"]["value"]   # lower estimate
    # 1 - u: the quasi-static prediction over the same window matches the measured exponent
    assert ex["one_minus_u"]["measured"]["value"] == pytest.approx(ex["one_minus_u"]["predicted_window"], abs=0.05)
    assert ex["rho"]["second_root"] < ex["rho"]["predicted"]


# ---------------------------------------------------------------- bad input and diverged curves

def test_measure_rejects_bad_input_and_zero_signals():
    t = np.logspace(-2, 2, 20)
    with pytest.raises(ValueError, match="direction"):
        M.crossing_time(t, t, 0.5, direction="dwn")
    with pytest.raises(ValueError, match="increasing"):
        M.crossing_time(t[::-1], t, 0.5)
    # a signal that is zero throughout has no growth rate (it used to return 1/t_end)
    assert math.isnan(M.fit_growth_rate(np.linspace(0, 1, 10), np.zeros(10), 1.0))
    # n_boot = 0: the median without an interval; one value: the interval collapses
    b = M.bootstrap_median([1.0, 2.0, 3.0], n_boot=0)
    assert b["value"] == 2.0 and b["n"] == 3 and math.isnan(b["ci_low"]) and math.isnan(b["ci_high"])


def test_phase_report_leaves_out_diverged_curves_and_a_le_1_predictions():
    """A replica that blows up passes |u| = 1 - eps on its way to NaN: that is no T2. It is left out
    of every measurement (settings.n_diverged) while the healthy replicas are measured as before."""
    lam = power_law_spectrum(50, 1.5)
    ws = np.ones(50) / np.sqrt(np.sum(lam))  # s* = 1
    t = np.concatenate([[0.0], np.logspace(-2, 2, 60)])
    good = np.clip(0.01 * np.exp(4 * t), 0, 1.0 - 0.5 / (1 + t))   # escapes, then 1 - u ~ 1/t
    bad = 0.01 * np.exp(30 * np.minimum(t, 1.0))
    bad[t > 0.3] = np.nan                                            # blew up at t = 0.3
    u = np.stack([good, good, bad], 1)
    s = u**2
    c = _curves(t, u=u, s=s, mse=1 - u + 1e-3, loss=(1 - u) ** 2 + 1e-6)
    rep = M.phase_report(c, None, lam, ws, a=1.5, n_boot=200)
    alone = M.phase_report(Curves("x", c.time[:, :2], {k: v[:, :2] for k, v in c.values.items()}),
                           None, lam, ws, a=1.5, n_boot=200)
    assert rep["settings"]["n_diverged"] == 1 and alone["settings"]["n_diverged"] == 0
    for k in ("T1", "T1_prime", "T2"):
        assert rep["phases"][k]["measured"]["n"] == 2
        assert rep["phases"][k]["measured"]["value"] == alone["phases"][k]["measured"]["value"]
    assert rep["phases"]["T2"]["measured"]["value"] > 1.0  # the blow-up would have given T2 < 0.3
    # a <= 1: the tail laws do not apply, so no predicted tail exponents (they were negative or 0)
    for a in (0.5, 1.0):
        r = M.phase_report(c, None, power_law_spectrum(50, a), ws, a=a, n_boot=0)
        for k in ("mse_tail_drop", "one_minus_u", "loss_tail", "tail_mass"):
            assert math.isnan(r["exponents"][k]["predicted"]), (a, k)
        assert r["exponents"]["one_minus_u"]["candidates"] == {}


def test_phase3_prediction_starts_at_gf_t2_of_curve_0_for_any_target_scale():
    """``job.phase3_prediction`` starts at the T2 of GF curve 0 (``|u|/s* = 1 - eps``, also when
    ``s* != 1``) from the GF state of that curve's own init (per-replica inits differ)."""
    from prtorch.job import phase3_prediction
    from prtorch.record import save_times
    from prtorch.theory.gradient_flow import gf_curves

    inst = make_instance(60, 1.5, 3, seed=1, target="sqrt_d", per_replica_init=True)
    s_star = float(np.sum(inst.lam * inst.w_star**2))
    assert abs(s_star - 1) > 0.2
    times = save_times(300.0, 20, 1e-3)
    gf = gf_curves(inst.w0[1:], inst.lam, inst.w_star, times)  # curve 0 starts from replica 1
    p3 = phase3_prediction(gf, inst.w0[1], inst, times, 0.9, 1e-5)
    assert p3 is not None
    t2 = M.crossing_time(times, np.abs(gf.values["u"][:, 0]) / s_star, 0.9)
    assert p3.time[0, 0] == pytest.approx(t2, rel=1e-12)
    mse_gf_t2 = M._value_at(times, gf.values["mse"][:, 0], t2)
    assert p3.values["mse"][0, 0] == pytest.approx(mse_gf_t2, rel=1e-3)
