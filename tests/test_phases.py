"""Phase predictions (prtorch.theory.phases) against exact gradient flow and exact sums."""
from functools import lru_cache

import numpy as np
import pytest
from scipy import special

from prtorch.problem import make_instance, power_law_spectrum
from prtorch.record import save_times
from prtorch.theory import measure as M
from prtorch.theory import phases as P
from prtorch.theory.gradient_flow import gf_curves, gradient_flow


@lru_cache(maxsize=None)
def _inst(d, a, seed=0):
    return make_instance(d, a, 1, seed=seed)


@lru_cache(maxsize=None)
def _gf_long(d, a, seed=0):
    """GF on a log grid to t = 1e4 (covers T2 down to eps = 0.01 for a >= 1.5, d <= 1000)."""
    inst = _inst(d, a, seed)
    times = save_times(1e4, 20, 1e-2)
    return gf_curves(inst.w0[0], inst.lam, inst.w_star, times)


@lru_cache(maxsize=None)
def _gf_phase1(d, a, seed=0):
    """GF on a dense linear grid over Phase I."""
    inst = _inst(d, a, seed)
    times = np.linspace(0.0, 1.5, 301)
    return gf_curves(inst.w0[0], inst.lam, inst.w_star, times)


# ---------------------------------------------------------------- Phase I

@pytest.mark.parametrize("d,a", [(300, 1.5), (1000, 1.5), (300, 2.0), (1000, 2.0)])
def test_rho_matches_growth_rate_fitted_on_gf(d, a):
    inst = _inst(d, a)
    rho = P.growth_rate(inst.lam, inst.w_star)
    assert rho > 4 * inst.lam[0]
    assert abs(P.secular_D(rho, inst.lam, inst.w_star)) < 1e-10
    g = _gf_phase1(d, a)
    t1 = M.detect_phase_times(g)["T1"]
    fitted = M.fit_phase1_rate(g, t1)[0]
    # measured: 1.1-1.3% low (the fit window ends where 12 s starts to bite)
    assert fitted == pytest.approx(rho, rel=0.03)


def test_secular_roots_are_the_eigenvalues_of_the_linear_flow():
    inst = _inst(200, 2.0, seed=3)
    lam, ws = inst.lam, inst.w_star
    m, x = P.secular_roots(lam, ws)
    v = lam * ws
    ev = np.linalg.eigvalsh(np.diag(4 * lam) + 8 * np.outer(v, v))
    np.testing.assert_allclose(np.sort(m + x), ev, rtol=1e-9, atol=1e-14)
    assert x[-1] + m[-1] == pytest.approx(P.growth_rate(lam, ws), rel=1e-13)
    # all roots strictly inside their gaps
    assert np.all(x > 0) and np.all(m[:-1] + x[:-1] < m[1:])


@pytest.mark.parametrize("d,a", [(300, 1.5), (1000, 2.0)])
def test_residue_prediction_matches_gf_early(d, a):
    inst = _inst(d, a)
    g = _gf_phase1(d, a)
    t, u = g.time[:, 0], g.values["u"][:, 0]
    t1 = M.detect_phase_times(g)["T1"][0]
    sel = (t >= t1 / 2) & (t <= t1)
    pred = P.phase1_dominant_u(t[sel], inst.w0[0], inst.lam, inst.w_star)
    # the non-dominant roots carry ~10% of u(0); by T1/2 they are <= 5% of u
    np.testing.assert_allclose(pred, u[sel], rtol=0.05)
    # T1(delta) from the residue: within 5% of the measured first crossing
    assert P.escape_time(0.1, inst.w0[0], inst.lam, inst.w_star) == pytest.approx(t1, rel=0.05)


def test_volterra_solution_is_exact_for_the_linear_flow_and_matches_gf_early():
    d, a = 300, 1.5
    inst = _inst(d, a)
    lam, ws, w0 = inst.lam, inst.w_star, inst.w0[0]
    t = np.linspace(0, 0.6, 61)
    uv = P.volterra_u(t, w0, lam, ws)
    _, ul = P.phase1_linear_state(t, w0, lam, ws)
    np.testing.assert_allclose(uv, ul, rtol=1e-9, atol=1e-14)
    assert uv[0] == pytest.approx(float(np.sum(lam * w0 * ws)), rel=1e-9)  # sum of residues = u(0)
    # it solves u = a0 + 8 int K(t - tau) u(tau) dtau (trapezoid on a fine grid)
    tf = np.linspace(0, 0.6, 2001)
    uf = P.volterra_u(tf, w0, lam, ws)
    a0, K = P.volterra_kernels(tf, w0, lam, ws)
    k = len(tf) - 1
    conv = np.trapezoid(K[k::-1] * uf[: k + 1], tf[: k + 1])
    assert uf[k] == pytest.approx(a0[k] + 8 * conv, rel=1e-5)
    # and GF follows it while s is small (s <= 0.005 here)
    g = _gf_phase1(d, a)
    sel = g.values["s"][:, 0] <= 0.005
    assert sel.sum() > 20
    np.testing.assert_allclose(P.volterra_u(g.time[sel, 0], w0, lam, ws), g.values["u"][sel, 0], rtol=0.01)


def test_isotropic_closed_form():
    d = 200
    inst = make_instance(d, 0.0, 1, seed=1)
    lam, ws, w0 = inst.lam, inst.w_star, inst.w0[0]
    u0 = float(np.sum(lam * w0 * ws))
    iso = P.isotropic_phase1(d, u0)
    assert iso.rho == pytest.approx(12.0 / d)
    assert P.growth_rate(lam, ws) == pytest.approx(iso.rho, rel=1e-10)
    assert P.residue_prefactor(w0, lam, ws) == pytest.approx(u0, rel=1e-8)
    assert P.escape_time(0.1, w0, lam, ws) == pytest.approx(iso.escape_time(0.1), rel=1e-8)
    t = np.linspace(0, 20, 11)
    np.testing.assert_allclose(P.volterra_u(t, w0, lam, ws), iso.u(t), rtol=1e-8)
    g = gf_curves(w0, lam, ws, t)  # s stays ~1/d here, so GF is within 12 s/d of the linear flow
    np.testing.assert_allclose(g.values["u"][:, 0], iso.u(t), rtol=0.02)


# ---------------------------------------------------------------- Phase II

@pytest.mark.parametrize("d,a", [(300, 1.5), (300, 2.0), (300, 4.0), (1000, 2.0)])
def test_t2_bound_is_an_upper_bound_on_gf(d, a):
    inst = _inst(d, a)
    g = _gf_long(d, a)
    ph0 = M.detect_phase_times(g)
    t1p = ph0["T1_prime"][0]
    for eps in (0.3, 0.1, 0.03, 0.01):
        t2 = M.detect_phase_times(g, eps=eps)["T2"][0]
        assert np.isfinite(t2)
        for form in ("direct", "paper"):
            b = P.t2_bound(eps, inst.w0[0], inst.lam, inst.w_star, t1p, form=form)
            bs = P.t2_bound(eps, inst.w0[0], inst.lam, inst.w_star, t1p, form=form, split=True)
            assert t2 <= b <= bs * (1 + 1e-12), (eps, form, t2, b, bs)
        # the direct bound is not vacuous: within a factor 5 of the measured time after T1'
        b = P.t2_bound(eps, inst.w0[0], inst.lam, inst.w_star, t1p)
        assert b - t1p <= 5 * (t2 - t1p) + 1.0


def test_t2_bound_split_scaling():
    """Closed-form split bound: tau ~ eps^{-a/(a-1)} log(1/eps) (direct), eps^{-2a/(a-1)} (paper)."""
    d, a = 20000, 2.0
    lam = power_law_spectrum(d, a)
    w_star, w0 = np.ones(d), np.zeros(d)
    eps = np.array([0.02, 0.01])
    tau = [P.t2_bound(e, w0, lam, w_star, 0.0, split=True, delay=0.0) for e in eps]
    slope = np.log(tau[1] / tau[0]) / np.log(eps[1] / eps[0])
    assert -a / (a - 1) - 0.6 < slope < -a / (a - 1)  # the log factor steepens it a little
    tau_p = [P.t2_bound(e, w0, lam, w_star, 0.0, form="paper", split=True, delay=0.0) for e in (0.2, 0.1)]
    slope_p = np.log(tau_p[1] / tau_p[0]) / np.log(0.5)
    assert -2 * a / (a - 1) - 1.0 < slope_p < -2 * a / (a - 1) + 0.3


def test_quasistatic_one_minus_u_tracks_gf():
    d, a = 1000, 2.0
    inst = _inst(d, a)
    g = _gf_long(d, a)
    t1p = M.detect_phase_times(g)["T1_prime"][0]
    t, om = g.time[:, 0], 1 - np.abs(g.values["u"][:, 0])
    sel = (t >= 3.0) & (om > 1e-9)
    pred = P.one_minus_u_quasistatic(t[sel], inst.w0[0], inst.lam, inst.w_star, t1p)
    np.testing.assert_allclose(pred, om[sel], rtol=0.05)  # measured: <= 1.5%
    assert P.predicted_t2(0.01, inst.w0[0], inst.lam, inst.w_star, t1p) == pytest.approx(
        M.detect_phase_times(g, eps=0.01)["T2"][0], rel=0.1)


def test_tail_mass_and_exponent():
    d, a = 10000, 2.0
    inst = make_instance(d, a, 1, seed=0)
    lam, ws = inst.lam, inst.w_star
    ls, T = P.tail_mass_curve(lam, ws)
    # definition: strict tail below lambda_k
    k = 37
    assert P.tail_mass(ls[k - 1], lam, ws) == pytest.approx(T[k - 1], rel=1e-12)
    assert P.tail_mass(ls[0] * 2, lam, ws) == pytest.approx(P.s_star_of(lam, ws), rel=1e-12)
    assert P.fit_tail_mass_exponent(lam, ws) == pytest.approx(P.tail_mass_exponent(a), abs=0.06)
    # expected w*_i^2 = 1: the deterministic target follows the continuum law closely
    thr = ls[[9, 99, 499]]
    np.testing.assert_allclose(P.tail_mass(thr, lam, np.ones(d)), P.tail_mass_asymptotic(thr, a, d),
                               rtol=0.12)


# ---------------------------------------------------------------- Phase III

@pytest.mark.parametrize("a", [2.0, 4.0])
def test_uniform_S_regimes(a):
    d = 2000
    i = np.arange(1, d + 1)
    H = float(np.sum(i ** -a))
    lam1 = 1 / H
    # early: 16 tau lambda_1 = 1e-3 -> the drop is first order to 1e-3 (relative)
    tau = np.array([1e-4, 1e-3]) / (16 * lam1)
    S = P.uniform_S(tau, d, a)
    np.testing.assert_allclose(1 - S, 1 - P.uniform_S_early(tau, d), rtol=1.5e-3)
    # middle: |d (1 - S_d) - Gamma(1-1/a) c^{1/a}| <= 1 + c d^{1-a}/(a-1) at every tau (sum vs integral
    # of a monotone function), so the relative error of the drop is <= 1/(Gamma n) once n = c^{1/a} >> 1
    tau = np.logspace(-2, 6, 50)
    S = P.uniform_S(tau, d, a)
    c = 16 * tau / H
    gap = np.abs(d * (1 - S) - d * (1 - P.uniform_S_middle(tau, d, a)))
    assert np.all(gap <= 1 + c * d ** (1 - a) / (a - 1) + 1e-9)
    n = c ** (1 / a)
    mid = (n >= 20) & (n <= d / 20)
    assert mid.sum() >= 5
    rel = np.abs((1 - S[mid]) / (1 - P.uniform_S_middle(tau[mid], d, a)) - 1)
    assert rel.max() < 1.0 / (special.gamma(1 - 1 / a) * 20) + 0.01
    # its local slope is 1/a within 0.05 in the middle of the window
    sl = P.local_slope(tau, 1 - S)
    assert np.nanmedian(sl[mid]) == pytest.approx(1 / a, abs=0.05)
    # late: S_d <= exp(-16 tau lambda_d) at every tau; the refined late law (near-degenerate bottom
    # modes) is within 8% once z = 16 tau lambda_d >= 20 (measured 5-7% at z = 20, <1% at z = 200)
    lam_d = d ** -a / H
    tau = np.logspace(-2, np.log10(200 / (16 * lam_d)), 40)
    S = P.uniform_S(tau, d, a)
    assert np.all(S <= P.uniform_S_late_bound(tau, d, a) * (1 + 1e-12))
    tau = np.array([20.0, 50.0, 200.0]) / (16 * lam_d)
    np.testing.assert_allclose(P.uniform_S(tau, d, a), P.uniform_S_late(tau, d, a), rtol=0.08)


@pytest.mark.parametrize("a", [1.5, 2.0])
def test_phase3_prediction_matches_gf_after_T2(a):
    """Fig. 4: GF from T2 (u = 0.9) vs MSE(T2) S(tau), d = 300."""
    d = 300
    inst = _inst(d, a)
    g = _gf_long(d, a)
    t2 = M.detect_phase_times(g, eps=0.1)["T2"][0]
    states, _ = gradient_flow(inst.w0[0], inst.lam, inst.w_star, np.array([0.0, t2]))
    wT2 = states[1, 0]
    t = g.time[:, 0]
    sel = (t > t2) & (g.values["mse"][:, 0] > 1e-10)
    tau = t[sel] - t2
    pred = P.phase3_mse(tau, wT2, inst.lam, inst.w_star)
    # measured max relative error over the whole tail: 1.0% (a = 1.5), 0.1% (a = 2)
    np.testing.assert_allclose(pred, g.values["mse"][sel, 0], rtol=0.03)
    # the Curves form agrees, and the predicted loss is within 15% once tau > 1 (measured <= 11%)
    pc = P.phase3_curves(tau, wT2, inst.lam, inst.w_star, t2)
    np.testing.assert_allclose(pc.values["mse"][:, 0], pred, rtol=1e-8, atol=1e-15)
    late = (tau > 1) & (g.values["loss"][sel, 0] > 1e-12)
    np.testing.assert_allclose(pc.values["loss"][late, 0], g.values["loss"][sel, 0][late], rtol=0.15)
    np.testing.assert_allclose(P.phase3_loss(tau, wT2, inst.lam, inst.w_star), pc.values["loss"][:, 0],
                               rtol=1e-8, atol=1e-14)


def test_phase3_weights_and_S():
    rng = np.random.default_rng(0)
    d = 50
    lam = power_law_spectrum(d, 2.0)
    ws = rng.standard_normal(d)
    w = -ws + 0.1 * rng.standard_normal(d)  # sign-flipped solution: errors measured against -w*
    pi = P.phase3_weights(w, ws)
    assert pi.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(pi, (w + ws) ** 2 / np.sum((w + ws) ** 2))
    assert P.phase3_S(0.0, pi, lam) == pytest.approx(1.0)
    np.testing.assert_allclose(P.uniform_S(np.array([0.0, 1.0]), d, 2.0),
                               P.phase3_S(np.array([0.0, 1.0]), np.full(d, 1 / d), lam))


def test_exponent_helpers():
    e = P.one_minus_u_exponents(2.0)
    assert e == {"paper_bound": 0.25, "appendix": 0.5, "tail_mass": 0.5}
    assert P.mse_drop_exponent(4.0) == 0.25 and P.loss_tail_exponent(4.0) == 0.75
    assert P.infer_a(power_law_spectrum(100, 1.5)) == pytest.approx(1.5)
    assert P.infer_a(power_law_spectrum(100, 0.0)) == 0.0
    x = np.logspace(0, 3, 30)
    np.testing.assert_allclose(P.local_slope(x, 3 * x**-0.7), -0.7, rtol=1e-10)
    # predicted loss law: the asymptotic form matches the exact sum in the middle regime
    d, a = 20000, 2.0
    lam = power_law_spectrum(d, a)
    tau = np.array([30.0, 300.0])
    exact = 4 * np.exp(-16 * np.multiply.outer(tau, lam)) @ lam
    np.testing.assert_allclose(P.phase3_loss_asymptotic(tau, a, d), exact, rtol=0.05)


def test_gd_stability_edge_is_one_over_rho_and_separates_gd_convergence():
    """2 / lambda_max of the Hessian at w* equals 1/rho; population GD started next to w* converges
    just below the edge and does not just above it."""
    inst = make_instance(50, 1.5, 1, seed=0)
    lam, ws = inst.lam, inst.w_star
    ss = float(lam @ ws**2)
    H = 8 * ss * np.diag(lam) + 16 * np.outer(lam * ws, lam * ws)
    edge = P.gd_stability_edge(lam, ws)
    assert edge == pytest.approx(2 / np.linalg.eigvalsh(H).max(), rel=1e-10)

    def gd_dist(lr, steps=4000):
        w = ws + 1e-3 * np.random.default_rng(0).standard_normal(50)
        for _ in range(steps):
            s, u = lam @ w**2, lam @ (w * ws)
            w = w - lr * lam * ((12 * s - 4 * ss) * w - 8 * u * ws)
            if not np.all(np.isfinite(w)) or np.abs(w).max() > 1e6:
                return np.inf
        return float(np.linalg.norm(w - ws))

    start = 1e-3 * np.sqrt(50)
    assert gd_dist(0.95 * edge) < 1e-3 * start   # contracts (the slow tail modes set the pace)
    assert gd_dist(1.05 * edge) > 10 * start     # the top mode flips and grows: a 2-cycle or worse


def test_phase_functions_reject_bad_arguments():
    inst = make_instance(50, 1.5, 1, seed=0)
    lam, ws, w0 = inst.lam, inst.w_star, inst.w0[0]
    assert P.escape_time(0.1, np.zeros(50), lam, ws) == np.inf  # u(0) = 0: GF never escapes
    with pytest.raises(ValueError, match="delta"):
        P.escape_time(-0.1, w0, lam, ws)
    for eps in (0.0, -0.1, 1.0):
        with pytest.raises(ValueError, match="eps"):
            P.predicted_t2(eps, w0, lam, ws, 1.0)
        with pytest.raises(ValueError, match="eps"):
            P.t2_bound(eps, w0, lam, ws, 1.0)
    for f in (lambda: P.phase3_loss_asymptotic(1.0, 1.0, 100), lambda: P.one_minus_u_exponents(0.0),
              lambda: P.mse_drop_exponent(1.0), lambda: P.tail_mass_exponent(0.5),
              lambda: P.uniform_S_middle(1.0, 100, 1.0)):
        with pytest.raises(ValueError, match="a > 1"):
            f()
    with pytest.raises(ValueError, match="tau"):
        P.uniform_S([-1.0], 100, 1.5)
