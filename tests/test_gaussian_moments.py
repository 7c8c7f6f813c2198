"""The Gaussian moments of prtorch.theory.gaussian against Monte Carlo and finite differences.

Every closed form is compared with a sample mean over 2e6 draws, with a tolerance of 5 standard
errors (estimated from the same samples), so a wrong coefficient anywhere fails.
"""
import numpy as np
import pytest

from prtorch.model import population_grad
from prtorch.problem import power_law_spectrum
from prtorch.theory import gaussian as G

N_MC = 2_000_000
K_SE = 5.0


def _points():
    """Two random ``(s, u, s*, sigma)`` with a valid covariance (``u^2 < s s*``)."""
    rng = np.random.default_rng(12345)
    pts = []
    for _ in range(2):
        s, s_star = rng.uniform(0.3, 1.5, size=2)
        u = rng.uniform(-0.9, 0.9) * np.sqrt(s * s_star)
        pts.append((float(s), float(u), float(s_star), float(rng.uniform(0.1, 0.6))))
    return pts


def _samples(s, u, s_star, sigma, n, seed):
    rng = np.random.default_rng(seed)
    L = np.linalg.cholesky(np.array([[s, u], [u, s_star]]))
    z = rng.standard_normal((2, n))
    p = L[0, 0] * z[0]
    v = L[1, 0] * z[0] + L[1, 1] * z[1]
    xi = sigma * rng.standard_normal(n)
    return p, v, xi


def _assert_mc(name, samples, exact):
    mean = samples.mean()
    se = samples.std() / np.sqrt(samples.size)
    assert abs(mean - exact) <= K_SE * se + 1e-12, (
        f"{name}: closed form {exact:.6g}, Monte Carlo {mean:.6g} +- {se:.2g}")


@pytest.mark.parametrize("point", _points())
def test_moments_against_monte_carlo(point):
    s, u, s_star, sigma = point
    p, v, xi = _samples(s, u, s_star, sigma, N_MC, seed=7)
    r = p * p - v * v - xi
    h = r * r * p * p
    h_pp = 8 * p**4 + 20 * r * p * p + 2 * r * r
    h_pv = -8 * v * p**3 - 8 * r * v * p
    h_vv = 8 * v * v * p * p - 4 * r * p * p
    _assert_mc("E h", h, G.mean_h(s, u, s_star, sigma))
    _assert_mc("E h_pp", h_pp, G.mean_h_pp(s, u, s_star, sigma))
    _assert_mc("E h_pv", h_pv, G.mean_h_pv(s, u, s_star, sigma))
    _assert_mc("E h_vv", h_vv, G.mean_h_vv(s, u, s_star, sigma))
    _assert_mc("E r^2", r * r, G.mean_r2(s, u, s_star, sigma))
    _assert_mc("E r p^2", r * p * p, G.mean_rp2(s, u, s_star))
    _assert_mc("E r v p", r * v * p, G.mean_rvp(s, u, s_star))
    # the tuple form and the closed-form loss agree with the single functions
    assert np.allclose(G.h_moments(s, u, s_star, sigma),
                       [G.mean_h(s, u, s_star, sigma), G.mean_h_pp(s, u, s_star, sigma),
                        G.mean_h_pv(s, u, s_star, sigma), G.mean_h_vv(s, u, s_star, sigma)])
    assert np.isclose(G.mean_r2(s, u, s_star, 0.0), 3 * s**2 + 3 * s_star**2 - 4 * u**2 - 2 * s * s_star)


def test_second_derivatives_of_h_by_finite_differences():
    """The derivative formulas used above (so the Monte Carlo test checks the right functions)."""
    rng = np.random.default_rng(3)
    p, v, xi = rng.normal(size=(3, 20))
    e = 1e-4

    def h(p, v):
        return (p * p - v * v - xi) ** 2 * p * p

    r = p * p - v * v - xi
    fd_pp = (h(p + e, v) - 2 * h(p, v) + h(p - e, v)) / e**2
    fd_vv = (h(p, v + e) - 2 * h(p, v) + h(p, v - e)) / e**2
    fd_pv = (h(p + e, v + e) - h(p + e, v - e) - h(p - e, v + e) + h(p - e, v - e)) / (4 * e * e)
    assert np.allclose(fd_pp, 8 * p**4 + 20 * r * p * p + 2 * r * r, rtol=1e-5, atol=1e-5)
    assert np.allclose(fd_pv, -8 * v * p**3 - 8 * r * v * p, rtol=1e-5, atol=1e-5)
    assert np.allclose(fd_vv, 8 * v * v * p * p - 4 * r * p * p, rtol=1e-5, atol=1e-5)


def test_moments_vectorised():
    s = np.array([0.2, 0.5, 1.0])
    u = np.array([0.1, -0.3, 0.9])
    out = G.h_moments(s[:, None], u[:, None], 1.0, np.array([0.0, 0.5]))
    assert all(np.shape(o) == (3, 2) for o in out)
    for i in range(3):
        for j, sig in enumerate([0.0, 0.5]):
            assert np.isclose(out[0][i, j], G.mean_h(s[i], u[i], 1.0, sig))
            assert np.isclose(out[1][i, j], G.mean_h_pp(s[i], u[i], 1.0, sig))


def _problem(d=4, seed=0):
    rng = np.random.default_rng(seed)
    lam = power_law_spectrum(d, 1.5)
    w_star = rng.normal(size=d)
    w_star /= np.sqrt(np.sum(lam * w_star**2))
    w = 0.8 * w_star + 0.5 * rng.normal(size=d)
    return lam, w, w_star


def _gradients(lam, w, w_star, sigma, shape, seed):
    """Per-sample gradients ``g = 4 r p x`` for ``x ~ N(0, diag(lam))``, batch shape ``shape``."""
    rng = np.random.default_rng(seed)
    x = np.sqrt(lam) * rng.standard_normal(shape + (lam.shape[0],))
    p, v = x @ w, x @ w_star
    r = p * p - v * v - sigma * rng.standard_normal(shape)
    return 4 * (r * p)[..., None] * x


def test_gradient_second_moment_against_monte_carlo():
    """``E[g_i^2]`` per coordinate, sampling ``x`` itself (checks the Stein formula end to end)."""
    lam, w, w_star = _problem()
    sigma = 0.4
    g = _gradients(lam, w, w_star, sigma, (1_000_000,), seed=11)
    exact = G.grad_second_moment(w, lam, w_star, sigma)
    for i in range(lam.shape[0]):
        _assert_mc(f"E g_{i}^2", g[:, i] ** 2, exact[i])
        _assert_mc(f"E g_{i}", g[:, i], G.grad_mean(w, lam, w_star)[i])
    # E g is the population gradient of prtorch.model
    s_star = float(np.sum(lam * w_star**2))
    assert np.allclose(G.grad_mean(w, lam, w_star), population_grad(w, lam, w_star, s_star), rtol=1e-14)


def test_minibatch_gradient_second_moment_against_monte_carlo():
    lam, w, w_star = _problem(seed=1)
    sigma, B = 0.2, 3
    ghat = _gradients(lam, w, w_star, sigma, (400_000, B), seed=5).mean(1)
    exact = G.minibatch_grad_second_moment(w, lam, w_star, B, sigma)
    for i in range(lam.shape[0]):
        _assert_mc(f"E ghat_{i}^2 (B={B})", ghat[:, i] ** 2, exact[i])
    # B = inf leaves the squared mean gradient
    assert np.allclose(G.minibatch_grad_second_moment(w, lam, w_star, np.inf, sigma),
                       G.grad_mean(w, lam, w_star) ** 2)
