r"""Deterministic equivalent (DE) of online / minibatch SGD (model.md §5).

Equations (model.md §5)
-----------------------
SGD with step ``eta`` and batch ``B``, ``w <- w - eta ghat``, in the time ``t = eta k``. Let
``mu_i = E w_i`` and ``P_i = E w_i^2`` (expectation over the data stream). One step changes them by

    mu_i -> mu_i + eta F_i,                  F_i = lambda_i [ (4 s* - 12 s) mu_i + 8 u w*_i ],
    P_i  -> P_i + eta G_i + eta^2 K_i,       G_i = 2 lambda_i [ (4 s* - 12 s) P_i + 8 u w*_i mu_i ],
                                             K_i = (1/B) E g_i^2 + (1 - 1/B) (E g_i)^2,

exactly in expectation once the moments are closed in mean field (``s -> sum_i lambda_i P_i``,
``u -> sum_i lambda_i w*_i mu_i``, ``w_i^2 -> P_i``, ``w_i w*_i -> mu_i w*_i``). With
:mod:`prtorch.theory.gaussian` (``A = 12 s - 4 s*``, ``C = 8 u``, ``f = 1/B``)

    E g_i^2   = 16 [ lambda_i E h + lambda_i^2 (E h_pp P_i + 2 E h_pv w*_i mu_i + E h_vv w*_i^2) ]
    (E g_i)^2 = lambda_i^2 (A^2 P_i - 2 A C w*_i mu_i + C^2 w*_i^2).

model.md §5 turns the maps into ``mu' = F``, ``P' = G + eta K`` (``drift=False`` here).

Drift correction (``drift=True``, the default)
----------------------------------------------
That ODE is not consistent to ``O(eta)``: the ODE of a map ``x -> x + eta F(x)`` is, to that order,
``x' = F - (eta/2) dF/dt`` (backward error analysis), and for ``B = inf`` the ``eta (grad L)^2`` term
alone is *not* the correction that separates population GD from GF: it is cancelled by part of
``-(eta/2) dG/dt``, and the true correction (``-eta mu dF/dt`` in ``P``, ``-(eta/2) dF/dt`` in ``mu``) is
missing. Measured: at ``eta = 0.05, d = 50`` the §5 equations miss GD by as much as GF does (0.8% in
MSE, 5% in loss), the corrected ones by 0.03% / 0.2%. The consistent equations are

    mu' = F - (eta/2) dF/dt,        P' = G + eta K - (eta/2) dG/dt,

with ``dF/dt = -lambda (A F + 12 s' mu - 8 u' w*)`` and ``dG/dt = -2 lambda (A G + 12 s' P - C w* F -
8 u' w* mu)`` (leading order, ``s' = ds/dt``, ``u' = du/dt``). They keep the form below, with

    alpha += eta (lambda^2 A^2 / 2 - 6 lambda s'),     beta  += eta lambda w* (lambda A C / 2 - 4 u'),
    gamma += eta (2 lambda^2 A^2 - 12 lambda s'),      delta += eta lambda w* (3 lambda A C - 8 u'),
    eps   -= eta lambda^2 w*^2 C^2,

and ``P = mu^2`` is preserved for ``B = inf`` (deterministic GD). ``(s', u')`` are the slopes of the
uncorrected flow, ``s' = -2 A s^(2) + 2 C u^(2)`` and ``u' = -A u^(2) + C s*^(2)``, with the next
moments ``s^(2) = sum lambda^2 P`` and ``u^(2) = sum lambda^2 w* mu`` carried as two more implicit
scalars (taking ``s'`` from the step itself, ``(s_end - s_start)/h``, would feed the correction
back into itself and make the step singular where ``12 eta s^(2) = 1``). The correction is ``O(eta)``
relative to the noise term at ``B = 1`` (it barely moves the SGD curves there) but it is the whole
story for large batches.

One step, exactly, for given scalars
------------------------------------
With ``(s, u)`` (and ``s', u'``) frozen each coordinate is a linear triangular system with constant
coefficients

    mu' = -alpha mu + beta,          P' = -gamma P + delta mu + epsilon,

    alpha   = lambda_i A                           beta  = lambda_i C w*_i
    gamma   = 2 alpha - eta lambda_i^2 (16 f E h_pp + (1 - f) A^2)
    delta   = 2 beta + eta lambda_i^2 w*_i (32 f E h_pv - 2 (1 - f) A C)
    epsilon = eta [ 16 f lambda_i E h + lambda_i^2 w*_i^2 (16 f E h_vv + (1 - f) C^2) ]

(plus the drift terms), solved over a step ``h`` by Duhamel's formula and Hermite-Genocchi
(``e[z_1, ..., z_n]`` the divided differences of ``exp``, ``z_a = -alpha h``, ``z_g = -gamma h``):

    mu(h) = e^{z_a} mu + beta h e[z_a, 0]
    P(h)  = e^{z_g} P + delta mu h e[z_g, z_a] + delta beta h^2 e[z_g, z_a, 0] + epsilon h e[z_g, 0].

Divided differences of ``exp`` are finite and smooth through coincident nodes (``gamma = alpha``,
``alpha = 0``) and growing modes (negative rates: ``s < s*/3`` during the escape, or large ``eta``);
:func:`exp_dd` evaluates them to a few ulps for any nodes, :func:`step_divided_differences` is the
fast path used in the flow.

Coefficients moving over the step (second order)
------------------------------------------------
Freezing the coefficients at the end-of-step scalars (the gradient-flow scheme of
:mod:`prtorch.theory.gradient_flow`) is first order, and for stiff modes (``alpha h >> 1``) it misses
the lag ``-x*'/rate`` of a quasi-static value ``x*`` that follows the slow scalars. Here that lag
matters: the noise-driven variance of the top modes follows the slowly decaying loss, and the
frozen step leaves a relative error ``~ 1/(rate t)`` in it (about 1e-3 in the loss) that no step size
cures and step doubling does not see. So the coefficients move linearly in time from their values
at the start scalars ``c0 = (s, u)(y)`` to those at the end scalars ``c``: each right-hand side is its
end-frozen form plus a remainder ``R0 (1 - tau/h)``, with

    R_mu0 = beta0 - beta1 + (alpha1 - alpha0) mu,
    R_P0  = eps0 - eps1 + (delta0 - delta1) mu + (gamma1 - gamma0) P,

whose exact response adds (``e[z, z, 0] = phi1 - phi2``,
``(d/dz_g + d/dz_a) e[z_g, z_a, 0] = e[z_g, z_a, 0] - e[z_g, z_a, 0, 0]``)

    mu += h R_mu0 e[z_a, z_a, 0]
    P  += h R_P0 e[z_g, z_g, 0] + delta1 R_mu0 h^2 (e[z_g, z_a, 0] - e[z_g, z_a, 0, 0]).

The step is then second order, reproduces the lag of stiff modes, and stays exact for constant
scalars. Stiff modes weigh the end of the step, so the scheme keeps the L-stability of the
end-implicit scalars (no reflection of the stiff ``(s, u)`` coupling).

Time stepping
-------------
The scalars ``c`` at the end of each step are solved implicitly, ``c = (s, u)(flow(y, c, h))``, and
the step size is controlled by step doubling with local Richardson extrapolation
(:func:`prtorch.theory.integrate.integrate` with ``order=2``: ``fine + (fine - coarse)/3``, step
exponent ``1/3``; about 16 flow evaluations per step), on the state ``y = [mu, P]`` of shape
``(N, 2 d)``, one row per initialisation / learning rate. The error is measured relative to
``||mu - w*||``, ``E||w - w*||^2`` and its ``Q``-weighted version, which carries the loss. A curve
whose second moment blows up (the DE's own instability, where the noise term outgrows the
contraction: ``s`` past ``1e3 max(1, s*, s(0))``) is reported as NaN from then on. That is not the
stability edge of SGD itself: the discrete map also fails past the GD edge ``1/rho``
(:func:`prtorch.theory.phases.gd_stability_edge`; period-2 oscillation, then divergence) and single
runs can diverge through rare large steps well before the mean does; an ODE for the mean sees
neither (``theory_checks`` in ``summary.json`` flags both).

Speed: :class:`DEFlow` evaluates the step either in numpy (the reference) or, when numba is
installed, with the compiled kernel of :mod:`prtorch.theory.flows_numba`, which fuses the rates, the
exponential factors, the step and the new scalars into one pass over the coordinates.

Outputs
-------
``E||w -+ w*||^2 = sum_i (P_i -+ 2 w*_i mu_i + w*_i^2)`` minimised over the sign gives the MSE
curve, like :func:`prtorch.model.param_mse` for the simulations (model.md §5 fixes the sign by
``u > 0``; the two agree once ``u`` has escaped, but before that only the minimum matches the
recorded MSE, e.g. at ``t = 0``). The loss curve is ``L(s, u)`` at the DE's ``(s, u)``, without the
noise variance, like the losses the simulations record.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import numpy as np

from prtorch.model import population_loss
from prtorch.record import Curves
from prtorch.theory.gaussian import h_moments
from prtorch.theory.integrate import check_times, integrate, load_kernels, phi1

ArrayLike = Union[float, Sequence[float], np.ndarray]

_DD_TAYLOR = 0.5       # node spread below which a divided difference is summed as a series
_DD_TERMS = 14         # series terms: enough for spread <= 1/2, up to 4 nodes, to ~1e-16 relative
_INV_FACT = [1.0 / math.factorial(k) for k in range(_DD_TERMS + 5)]
_INV_FACT_BIG = [1.0 / math.factorial(k) for k in range(60)]


def exp_dd1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``e[a, b] = (e^a - e^b) / (a - b) = int_0^1 e^{(1-t) a + t b} dt`` (``e^a`` at ``a = b``).

    Evaluated as ``e^{max(a,b)} phi1(-|a - b|)``: no cancellation, no overflow beyond ``e^max``.
    """
    return np.exp(np.maximum(a, b)) * phi1(-np.abs(a - b))


def _dd_series(X: np.ndarray) -> np.ndarray:
    """``e[X_0, ..., X_{n-1}]`` (columns of ``X``, shape ``(n, M)``) for nodes of small spread.

    Around the mean ``m``: ``e[X] = e^m sum_k h_k(t) / (k + n - 1)!``, ``t = X - m``, with ``h_k`` the
    complete homogeneous symmetric polynomials, by Newton's identity
    ``h_k = sum_i (-1)^(i-1) e_i h_{k-i}`` from the elementary ones (``e_1 = 0`` since ``sum t = 0``).
    """
    n = X.shape[0]
    m = X.mean(0)
    t = X - m
    el = [np.ones_like(m)] + [np.zeros_like(m) for _ in range(n)]
    for j in range(n):
        for i in range(j + 1, 0, -1):
            el[i] = el[i] + t[j] * el[i - 1]
    hs = [np.ones_like(m)]
    total = hs[0] * _INV_FACT[n - 1]
    for k in range(1, _DD_TERMS + 1):
        hk = np.zeros_like(m)
        for i in range(2, min(k, n) + 1):
            hk = hk + (el[i] if i % 2 else -el[i]) * hs[k - i]
        hs.append(hk)
        total = total + hk * _INV_FACT[k + n - 1]
    return np.exp(m) * total


def _dd_sorted(X: np.ndarray) -> np.ndarray:
    """``e[X_0, ..., X_{n-1}]`` for nodes sorted ascending along axis 0 (``X`` is ``(n, M)``).

    Shift by the largest node; if the spread is small sum the series, else recurse on
    ``e[S] = (e[S minus min] - e[S minus max]) / (max - min)`` (the denominator is the whole spread, so the
    difference never cancels catastrophically).
    """
    n = X.shape[0]
    top = X[-1]
    if n == 1:
        return np.exp(top)
    if n == 2:
        return exp_dd1(X[0], X[1])
    Y = X - top
    spread = -Y[0]
    out = np.empty(top.shape)
    big = spread >= _DD_TAYLOR
    if big.all():
        out = (_dd_sorted(Y[1:]) - _dd_sorted(Y[:-1])) / spread
    elif big.any():
        Yb = Y[:, big]
        out[big] = (_dd_sorted(Yb[1:]) - _dd_sorted(Yb[:-1])) / spread[big]
        out[~big] = _dd_series(Y[:, ~big])
    else:
        out = _dd_series(Y)
    return np.exp(top) * out


def exp_dd(*nodes: np.ndarray) -> np.ndarray:
    """Divided difference ``e[z_1, ..., z_n]`` of ``exp`` (elementwise over broadcast arrays).

    ``e[z_1..z_n] = int_{simplex} exp(sum_j theta_j z_j)`` (Hermite-Genocchi), so repeated nodes are
    derivatives (``e[z, z] = e^z``, ``e[z, 0] = phi1(z)``, ``e[z, 0, 0] = phi2(z)``) and the value is
    finite, positive and accurate to a few ulps for any nodes, decaying or growing.
    """
    Z = np.stack(np.broadcast_arrays(*[np.asarray(z, dtype=np.float64) for z in nodes]))
    shape = Z.shape[1:]
    Z = np.sort(Z.reshape(Z.shape[0], -1), axis=0)
    return _dd_sorted(Z).reshape(shape)


_SER_TAU = 0.05        # |z| below which phi2 and the 3-/4-node differences are summed as series
_SER_K = 9             # powers 0..8: for |z| < 0.05 the next term is < 1e-20 relative
_SER_PHI_T = np.array([[_INV_FACT_BIG[k + 2] for k in range(_SER_K)]])  # phi2 = sum z^k/(k+2)!
_SER_DD_T = np.array([[_INV_FACT_BIG[j + l + 2] for j in range(_SER_K)] for l in range(_SER_K)]
                     + [[_INV_FACT_BIG[j + l + 3] for j in range(_SER_K)] for l in range(_SER_K)])


def _powers(z: np.ndarray) -> np.ndarray:
    """``[1, z, ..., z^(K-1)]`` as a ``(K, M)`` matrix (rows ``n..2n-2`` = rows ``1..n-1`` times ``z^(n-1)``)."""
    Z = np.empty((_SER_K, z.shape[0]))
    Z[0] = 1.0
    Z[1] = z
    n = 2
    while n < _SER_K:
        m = min(n - 1, _SER_K - n)
        np.multiply(Z[1:m + 1], Z[n - 1], out=Z[n:n + m])
        n += m
    return Z


def _phi2_series(z: np.ndarray) -> np.ndarray:
    """``phi2(z) = sum_k z^k / (k+2)!`` for ``|z| < 0.05`` (1-d ``z``)."""
    return (_SER_PHI_T @ _powers(z))[0]


def _small_series(zg: np.ndarray, za: np.ndarray):
    """``phi2(za), phi2(zg)``, ``e[zg, za, 0] = sum_{j,l} zg^j za^l / (j+l+2)!`` and
    ``e[zg, za, 0, 0] = sum_{j,l} zg^j za^l / (j+l+3)!`` for ``|zg|, |za| < 0.05`` (1-d arrays)."""
    K = _SER_K
    Zg, Za = _powers(zg), _powers(za)
    G = _SER_DD_T @ Zg  # (2K, M): row l holds sum_j zg^j / (j+l+2)!, row K + l sum_j zg^j / (j+l+3)!
    d2 = np.einsum("km,km->m", G[:K], Za)
    d3 = np.einsum("km,km->m", G[K:], Za)
    return (_SER_PHI_T @ Za)[0], G[0], d2, d3  # G[0] = phi2(zg)


def step_divided_differences(za: np.ndarray, zg: np.ndarray):
    """Every exponential factor of one DE step, fast (elementwise, arrays of equal shape).

    Returns ``e^{za}, e^{zg}, phi1(za), phi2(za), phi1(zg), phi2(zg), e[zg, za], e[zg, za, 0],
    e[zg, za, 0, 0]``: ``phi1 = expm1(z)/z`` and ``e[zg, za] = e^max phi1(-|zg - za|)`` (no
    cancellation anywhere); ``phi2`` and the 3-/4-node differences by the recursion
    ``e[S] = (e[S - a] - e[S - b]) / (b - a)`` on the pair ``(z, 0)`` with the larger ``|z|`` (at least
    half the spread), and below ``|z| = 0.05``, where that recursion would lose digits, by power
    series (as matrix products) on the subset. Agrees with :func:`exp_dd` to ~1e-13 relative
    (typically a few ulps).
    """
    tau = _SER_TAU
    shape = za.shape
    za, zg = za.reshape(-1), zg.reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ea, eg = np.exp(za), np.exp(zg)
        p1a, p1g = np.expm1(za) / za, np.expm1(zg) / zg
        x = -np.abs(zg - za)
        dga = np.exp(np.maximum(za, zg)) * (np.expm1(x) / x)
        for arr, z in ((p1a, za), (p1g, zg), (dga, x)):
            zero = z == 0.0
            if zero.any():
                arr[zero] = 1.0 if arr is not dga else ea[zero]
        aza, azg = np.abs(za), np.abs(zg)
        sa, sg = aza < tau, azg < tau
        small = sa & sg
        n_small = int(np.count_nonzero(small))
        if n_small == za.shape[0]:
            p2a, p2g, d2, d3 = _small_series(zg, za)
            return tuple(v.reshape(shape) for v in (ea, eg, p1a, p2a, p1g, p2g, dga, d2, d3))
        p2a, p2g = (p1a - 1.0) / za, (p1g - 1.0) / zg
        if n_small:
            p2a[small], p2g[small], d2s, d3s = _small_series(zg[small], za[small])
        oa, og = sa & ~small, sg & ~small  # one node small, the other not: phi2 at the small one
        na = int(np.count_nonzero(oa))
        if na or og.any():
            vals = _phi2_series(np.concatenate([za[oa], zg[og]]))
            p2a[oa], p2g[og] = vals[:na], vals[na:]
        g_big = azg >= aza
        den = np.where(g_big, zg, za)
        d2 = (dga - np.where(g_big, p1a, p1g)) / den
        d3 = (d2 - np.where(g_big, p2a, p2g)) / den
        if n_small:
            d2[small], d3[small] = d2s, d3s
    return tuple(v.reshape(shape) for v in (ea, eg, p1a, p2a, p1g, p2g, dga, d2, d3))


def _inverse_batch(batch_size) -> float:
    if batch_size is None or math.isinf(float(batch_size)):
        return 0.0
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected >= 1 or inf")
    return 1.0 / float(batch_size)


def de_rates(c: np.ndarray, lam: np.ndarray, w_star: np.ndarray, s_star: float, lr: np.ndarray,
             inv_batch: float, sigma: float, drift: bool = False):
    """Per-coordinate ``(alpha, beta, gamma, delta, epsilon)`` (each ``(N, d)``) at scalars ``c``
    (``(N, 2)``: ``s, u``, or ``(N, 4)``: also ``s^(2), u^(2)``) for learning rates ``lr`` (``(N, 1)``),
    ``f = 1/B`` and label-noise std ``sigma``; ``drift`` (needs the 4 scalars) adds the drift
    correction with ``s' = -2 A s^(2) + 2 C u^(2)``, ``u' = -A u^(2) + C s*^(2)`` (module docstring)."""
    s, u = c[:, 0:1], c[:, 1:2]
    A = 12.0 * s - 4.0 * s_star
    C = 8.0 * u
    Eh, Epp, Epv, Evv = h_moments(s, u, s_star, sigma)
    f = inv_batch
    lam2 = lam * lam
    lw, l2w, l2w2 = lam * w_star, lam2 * w_star, lam2 * w_star**2
    alpha = lam * A
    beta = lw * C
    gamma = 2.0 * alpha - (lr * (16.0 * f * Epp + (1.0 - f) * A * A)) * lam2
    delta = 2.0 * beta + (lr * (32.0 * f * Epv - 2.0 * (1.0 - f) * A * C)) * l2w
    eps = (lr * 16.0 * f * Eh) * lam + (lr * (16.0 * f * Evv + (1.0 - f) * C * C)) * l2w2
    if drift:
        sp, up = drift_slopes(c, lam, w_star)
        sp, up = sp[:, None], up[:, None]
        alpha = alpha + lr * (0.5 * A * A * lam2 - 6.0 * sp * lam)
        beta = beta + lr * (0.5 * A * C * l2w - 4.0 * up * lw)
        gamma = gamma + lr * (2.0 * A * A * lam2 - 12.0 * sp * lam)
        delta = delta + lr * (3.0 * A * C * l2w - 8.0 * up * lw)
        eps = eps - lr * C * C * l2w2
    return alpha, beta, gamma, delta, eps


def de_scalars(y: np.ndarray, lam: np.ndarray, w_star: np.ndarray) -> np.ndarray:
    """``(s, u, s^(2), u^(2)) = sum (lambda P, lambda w* mu, lambda^2 P, lambda^2 w* mu)`` of states
    ``y = [mu, P]`` (``(N, 2 d)`` -> ``(N, 4)``); the last two only feed the drift correction."""
    d = lam.shape[0]
    mu, P = y[:, :d], y[:, d:]
    return np.stack([P @ lam, mu @ (lam * w_star), P @ lam**2, mu @ (lam**2 * w_star)], axis=1)


def drift_slopes(c: np.ndarray, lam: np.ndarray, w_star: np.ndarray):
    """``(s', u')`` of the uncorrected flow at scalars ``c = (s, u, s^(2), u^(2))`` (each ``(N,)``):
    ``s' = sum lambda G = -2 A s^(2) + 2 C u^(2)``, ``u' = sum lambda w* F = -A u^(2) + C s*^(2)``."""
    s_star = float(np.sum(lam * w_star**2))
    s2_star = float(np.sum(lam**2 * w_star**2))
    A = 12.0 * c[:, 0] - 4.0 * s_star
    C = 8.0 * c[:, 1]
    return -2.0 * A * c[:, 2] + 2.0 * C * c[:, 3], -A * c[:, 3] + C * s2_star


def de_flow(y: np.ndarray, c: np.ndarray, h: float, lam: np.ndarray, w_star: np.ndarray, s_star: float,
            lr: np.ndarray, inv_batch: float, sigma: float, interpolate: bool = True,
            drift: bool = True) -> np.ndarray:
    """One step ``h`` from ``y = [mu, P]`` (``(N, 2 d)``) with end-of-step scalars ``c`` (``(N, 2)``).

    Reference implementation of the formulas in the module docstring (general :func:`exp_dd`);
    ``interpolate=False`` freezes the coefficients at ``c`` (exact for constant scalars),
    ``interpolate=True`` moves them linearly from ``c0 = de_scalars(y)`` to ``c``; ``drift`` adds the
    ``-(eta/2) d/dt`` drift correction (``c`` then needs all four scalars of :func:`de_scalars`).
    :class:`DEFlow` is the fast equivalent used by the integrators.
    """
    d = lam.shape[0]
    mu, P = y[:, :d], y[:, d:]
    c0 = de_scalars(y, lam, w_star)
    a1, b1, g1, d1, e1 = de_rates(c, lam, w_star, s_star, lr, inv_batch, sigma, drift)
    za, zg = -a1 * h, -g1 * h
    zero = np.zeros_like(za)
    p1a, p1g = exp_dd(za, zero), exp_dd(zg, zero)
    d2 = exp_dd(zg, za, zero)
    mu1 = np.exp(za) * mu + (b1 * h) * p1a
    P1 = np.exp(zg) * P + h * ((d1 * mu) * exp_dd(zg, za) + (d1 * b1 * h) * d2 + e1 * p1g)
    if interpolate:
        a0, b0, g0, d0, e0 = de_rates(c0, lam, w_star, s_star, lr, inv_batch, sigma, drift)
        r_mu = b0 - b1 + (a1 - a0) * mu
        r_P = e0 - e1 + (d0 - d1) * mu + (g1 - g0) * P
        mu1 = mu1 + (h * r_mu) * exp_dd(za, za, zero)
        P1 = P1 + h * (r_P * exp_dd(zg, zg, zero) + (d1 * r_mu * h) * (d2 - exp_dd(zg, za, zero, zero)))
    return np.concatenate([mu1, P1], axis=1)


def _coefficient_matrix(s_star: float, f: float, sigma: float, drift: bool) -> np.ndarray:
    """``(8, 10)`` matrix taking the monomials ``[1, s, u, s^2, s u, u^2, s^3, s u^2]`` to the per-row
    factors of :func:`de_rates` (without the ``s', u'`` terms), in the basis
    ``alpha = a1 lam + a2 lam^2``, ``beta = b1 lam w* + b2 lam^2 w*``, ``gamma = g1 lam + g2 lam^2``,
    ``delta = d1 lam w* + d2 lam^2 w*``, ``epsilon = e1 lam + e2 lam^2 w*^2``; columns ``a2, b2, g2,
    d2, e1, e2`` are divided by ``eta``. The polynomials of :mod:`prtorch.theory.gaussian`, expanded
    (checked against :func:`de_rates` in the tests)."""
    ss, v, D = s_star, sigma**2, 1.0 if drift else 0.0
    z = np.zeros(8)

    def poly(**kw):
        p = z.copy()
        for k, val in kw.items():
            p[["one", "s", "u", "s2", "su", "u2", "s3", "su2"].index(k)] = val
        return p

    A = poly(one=-4 * ss, s=12)
    C = poly(u=8)
    A2 = poly(one=16 * ss**2, s=-96 * ss, s2=144)
    AC = poly(u=-32 * ss, su=96)
    C2 = poly(u2=64)
    Eh = poly(s=3 * ss**2 + v, s2=-6 * ss, u2=12 * ss, s3=15, su2=-24)
    Epp = poly(one=6 * ss**2 + 2 * v, s=-24 * ss, s2=90, u2=-48)
    Epv = poly(u=24 * ss, su=-48)
    Evv = poly(s=12 * ss, s2=-12, u2=24)
    cols = [A, 0.5 * D * A2,                                   # alpha
            C, 0.5 * D * AC,                                   # beta
            2 * A, -16 * f * Epp + (2 * D - 1 + f) * A2,       # gamma
            2 * C, 32 * f * Epv + (3 * D - 2 + 2 * f) * AC,    # delta
            16 * f * Eh, 16 * f * Evv + (1 - f - D) * C2]      # epsilon
    return np.stack(cols, axis=1)


# flat positions in the (5 rates x 5 basis vectors) matrix of the 10 factors of _coefficient_matrix
_EXPAND_IDX = np.array([0 * 5 + 0, 0 * 5 + 1, 1 * 5 + 2, 1 * 5 + 3, 2 * 5 + 0, 2 * 5 + 1,
                        3 * 5 + 2, 3 * 5 + 3, 4 * 5 + 0, 4 * 5 + 4])


class DEFlow:
    """Fast ``flow(y, c, h)`` (same math as :func:`de_flow`) plus ``scalars(y)`` for the integrators.

    Per-row factors come from one product of monomials of ``(s, u)`` (:func:`_coefficient_matrix`),
    start-of-step rates are cached per state object ``y`` (the integrators never modify a state in
    place), and every exponential factor comes from :func:`step_divided_differences`.
    ``n_calls`` counts flow evaluations.
    """

    def __init__(self, lam: np.ndarray, w_star: np.ndarray, s_star: float, lr: np.ndarray,
                 inv_batch: float, sigma: float, interpolate: bool = True, drift: bool = True,
                 backend: str = "auto"):
        self.lam, self.w_star, self.s_star = lam, w_star, float(s_star)
        self.lw = lam * w_star
        self.lam2 = lam * lam
        self.l2w = self.lam2 * w_star
        self.l2w2 = self.l2w * w_star
        self.s2_star = float(np.sum(self.l2w2))
        self._basis = np.stack([lam, self.lam2, self.lw, self.l2w, self.l2w2])
        self.f, self.sigma = float(inv_batch), float(sigma)
        self.interpolate, self.drift = interpolate, drift
        self.d = lam.shape[0]
        self._coef = _coefficient_matrix(self.s_star, self.f, self.sigma, drift)
        self.lr = np.empty((0, 1))
        self.set_lr(lr)
        self._cache_y = None
        self._cache_k0 = None
        self._last_out, self._last_scal = None, None
        self.n_calls = 0
        self._kernels = load_kernels(backend)
        self.backend = "numba" if self._kernels is not None else "numpy"

    def set_lr(self, lr: np.ndarray) -> None:
        """Use learning rates ``lr`` (one per row of the next states; no-op if unchanged)."""
        lr = np.asarray(lr, dtype=np.float64).reshape(-1, 1)
        if lr.shape == self.lr.shape and np.array_equal(lr, self.lr):
            return
        self.lr = lr
        self._lr_cols = np.where(np.arange(10) % 2 == 1, lr, 1.0)
        self._lr_cols[:, 8] = lr[:, 0]
        self._cache_y = None

    def scalars(self, y: np.ndarray) -> np.ndarray:
        """:func:`de_scalars` (``s, u`` and, with ``drift``, ``s^(2), u^(2)``)."""
        m = 4 if self.drift else 2
        if y is self._last_out:  # the compiled flow summed them while writing the state
            return self._last_scal[:, :m].copy()
        d = self.d
        mu, P = y[:, :d], y[:, d:]
        if self.drift:
            return np.stack([P @ self.lam, mu @ self.lw, P @ self.lam2, mu @ self.l2w], axis=1)
        return np.stack([P @ self.lam, mu @ self.lw], axis=1)

    def factors(self, c: np.ndarray) -> np.ndarray:
        """Per-row factors ``(N, 10)`` of the rates (basis of :func:`_coefficient_matrix`), with the
        ``s', u'`` terms of the drift correction (:func:`drift_slopes`) when ``drift``."""
        if self._kernels is not None:
            k = np.empty((c.shape[0], 10))
            self._kernels.de_factors(np.ascontiguousarray(c, dtype=np.float64), self._coef,
                                     self.lr[:, 0].copy(), self.s_star, self.s2_star, self.drift, k)
            return k
        s, u = c[:, 0], c[:, 1]
        su = s * u
        mono = np.stack([np.ones_like(s), s, u, s * s, su, u * u, s * s * s, su * u], axis=1)
        k = (mono @ self._coef) * self._lr_cols
        if self.drift:
            lr = self.lr[:, 0]
            A = 12.0 * s - 4.0 * self.s_star
            C = 8.0 * u
            sp = -2.0 * A * c[:, 2] + 2.0 * C * c[:, 3]
            up = -A * c[:, 3] + C * self.s2_star
            k[:, 0] -= 6.0 * lr * sp
            k[:, 2] -= 4.0 * lr * up
            k[:, 4] -= 12.0 * lr * sp
            k[:, 6] -= 8.0 * lr * up
        return k

    def _expand(self, k: np.ndarray):
        """The five rate arrays ``(N, d)`` from the factors: one product ``(N, 5, 5) @ (5, d)`` with the
        basis ``[lam, lam^2, lam w*, lam^2 w*, lam^2 w*^2]``."""
        K = np.zeros((k.shape[0], 25))
        K[:, _EXPAND_IDX] = k
        R = K.reshape(-1, 5, 5) @ self._basis
        return R[:, 0], R[:, 1], R[:, 2], R[:, 3], R[:, 4]

    def rates(self, c: np.ndarray):
        """:func:`de_rates` (``c`` with 4 columns when ``drift``)."""
        return self._expand(self.factors(c))

    def __call__(self, y: np.ndarray, c: np.ndarray, h: float) -> np.ndarray:
        self.n_calls += 1
        d = self.d
        mu, P = y[:, :d], y[:, d:]
        if self._cache_y is not y:
            self._cache_k0 = self.factors(self.scalars(y))
            self._cache_y = y
        k0 = self._cache_k0
        k1 = self.factors(c)
        if self._kernels is not None:
            kd = k1 - k0 if self.interpolate else np.zeros_like(k1)
            out, self._last_scal = self._kernels.de_step(np.ascontiguousarray(y), k1, kd, self._basis,
                                                         h, self.interpolate)
            self._last_out = out
            return out
        a1, b1, g1, d1, e1 = self._expand(k1)
        za, zg = a1 * (-h), g1 * (-h)
        ea, eg, p1a, p2a, p1g, p2g, dga, d2, d3 = step_divided_differences(za, zg)
        bh = b1 * h
        out = np.empty_like(y)
        mu1, P1 = out[:, :d], out[:, d:]
        np.multiply(ea, mu, out=mu1)
        mu1 += bh * p1a
        np.multiply(eg, P, out=P1)
        P1 += h * (d1 * (mu * dga + bh * d2) + e1 * p1g)
        if self.interpolate:
            da, db, dg, dd, de = self._expand(k1 - k0)  # rate differences end - start
            r_mu = da * mu - db
            r_P = dg * P - dd * mu - de
            mu1 += (h * r_mu) * (p1a - p2a)
            P1 += h * (r_P * (p1g - p2g) + (d1 * r_mu * h) * (d2 - d3))
        return out


DIVERGED_FACTOR = 1e3  # a DE curve whose s exceeds this times max(1, s*, s(0)) has diverged


def _prepare(w0, lr, lam, w_star):
    lam = np.asarray(lam, dtype=np.float64)
    w_star = np.asarray(w_star, dtype=np.float64)
    w0 = np.atleast_2d(np.asarray(w0, dtype=np.float64))
    lrs = np.atleast_1d(np.asarray(lr, dtype=np.float64))
    if lrs.ndim != 1:
        raise ValueError("lr: expected a scalar or a 1-d array")
    n_w, n_l = w0.shape[0], lrs.shape[0]
    if n_w == n_l:
        init = np.arange(n_w)
    elif n_w == 1:
        init = np.zeros(n_l, dtype=np.int64)
        w0 = np.repeat(w0, n_l, axis=0)
    elif n_l == 1:
        init = np.arange(n_w)
        lrs = np.repeat(lrs, n_w)
    else:
        raise ValueError(f"w0 has {n_w} rows and lr has {n_l} entries: expected equal counts, or one of them 1")
    if np.any(lrs < 0) or not np.all(np.isfinite(lrs)):
        raise ValueError("lr must be finite and >= 0")
    return w0, lrs, lam, w_star, init


def de_error_norm(lam: np.ndarray, w_star: np.ndarray, atol: float = 1e-6) -> Callable:
    """``error_norm(a, b)`` for DE states: the largest of

    * ``||mu_a - mu_b|| / (||mu_b - w*|| + atol ||w*||)`` (the mean, as for gradient flow),
    * ``sum |dq| / (sum q + ...)`` and ``sum lambda |dq| / (sum lambda q + ...)`` with
      ``q = P - 2 w* mu + w*^2`` (``E (w_i - w*_i)^2``, so the MSE and, ``Q``-weighted, the loss:
      ``L ~ 4 s* sum lambda q`` near the target),

    with ``w*`` signed like ``<mu, w*>`` (the sign of the MSE, :func:`de_metrics`).
    """
    d = lam.shape[0]
    lw = lam * w_star
    ws2 = w_star * w_star
    a_mu = atol * float(np.linalg.norm(w_star))
    # floors well above float64 round-off of q = P - 2 w* mu + w*^2 (a difference of O(w*^2) terms),
    # so that a run converging to machine precision is not mistaken for a failing step
    a_q = 1e-8 * float(w_star @ w_star) if atol > 0 else 0.0
    a_lq = a_q * float(lam.sum()) / d

    def error_norm(a, b):
        sign = np.where(b[:, :d] @ w_star < 0, -1.0, 1.0)[:, None]
        sw = sign * w_star
        dmu = a[:, :d] - b[:, :d]
        dq = np.abs((a[:, d:] - b[:, d:]) - 2.0 * sw * dmu)
        q = np.abs(b[:, d:] - 2.0 * sw * b[:, :d] + ws2)
        e_mu = np.linalg.norm(dmu, axis=1) / (np.linalg.norm(b[:, :d] - sw, axis=1) + a_mu)
        e_q = dq.sum(1) / (q.sum(1) + a_q)
        e_lq = (dq @ lam) / (q @ lam + a_lq)
        return np.maximum(e_mu, np.maximum(e_q, e_lq))

    return error_norm


def sgd_equivalent(w0: np.ndarray, lam: np.ndarray, w_star: np.ndarray, times: np.ndarray,
                   lr: ArrayLike, batch_size: Union[int, float] = 1, label_noise: float = 0.0,
                   rtol: float = 1e-5, atol: float = 1e-6, interpolate: bool = True,
                   drift: bool = True, backend: str = "auto"):
    """DE states ``[mu, P]`` at ``times`` (``times[0]`` is the start, usually 0).

    w0: ``(d,)`` or ``(N, d)`` deterministic initial weights (``mu = w0``, ``P = w0^2``).
    lr: scalar or ``(N,)``, one per row; a single ``w0`` row is repeated for each ``lr`` and a
    single ``lr`` for each row. batch_size: ``B >= 1`` or ``inf`` (population GD).
    label_noise: standard deviation ``sigma`` of ``xi``. rtol/atol: step-error tolerances
    (:func:`de_error_norm`). interpolate: second-order step (see the module docstring); ``False``
    freezes the coefficients at the end scalars. drift: add the ``-(eta/2) d/dt`` drift correction
    that makes the equations consistent to ``O(eta)`` (``False`` gives model.md §5 verbatim; see the
    module docstring). backend: ``"numba"`` (the compiled flow of :mod:`prtorch.theory.flows_numba`),
    ``"numpy"`` (the reference), or ``"auto"`` (numba when it imports).

    A row whose second moment blows up (the DE's own instability; see the module docstring for the
    instabilities of SGD it does not see) turns NaN from then on, the others go on
    (:func:`prtorch.theory.integrate.integrate`).

    Returns ``(states, n_steps)``: ``states`` of shape ``(len(times), N, 2 d)`` holding
    ``[mu, P]`` and the number of accepted steps.
    """
    w0, lrs, lam, w_star, _ = _prepare(w0, lr, lam, w_star)
    return _run(w0, lrs, lam, w_star, times, batch_size, label_noise, rtol, atol, interpolate, drift,
                backend)


def _run(w0, lrs, lam, w_star, times, batch_size, label_noise, rtol, atol, interpolate, drift, backend):
    s_star = float(np.sum(lam * w_star**2))
    flow = DEFlow(lam, w_star, s_star, lrs, _inverse_batch(batch_size), float(label_noise), interpolate,
                  drift, backend)
    y0 = np.concatenate([w0, w0 * w0], axis=1)
    times = check_times(times)
    h0 = min(1e-3, float(times[1] - times[0]) if len(times) > 1 else 1e-3)
    err = de_error_norm(lam, w_star, atol)
    # the second moment of a converging run stays O(max(s*, s(0))); past this it blows up in finite time
    blowup = DIVERGED_FACTOR * max(1.0, s_star, float(np.max(y0[:, w0.shape[1]:] @ lam)))
    return integrate(y0, times, flow.scalars, flow, err, rtol=rtol, h0=h0,
                     order=2 if interpolate else 1, diverged_s=blowup)


def de_metrics(states: np.ndarray, lam: np.ndarray, w_star: np.ndarray) -> dict:
    """``mse, loss, s, u`` (each ``(T, N)``) of DE states ``(T, N, 2 d)``:

    ``s = sum lambda P``, ``u = sum lambda w* mu``, ``loss = L(s, u)`` (:func:`prtorch.model.population_loss`),
    ``mse = (1/d) min_{+-} sum (P -+ 2 w* mu + w*^2) = (sum P - 2 |<mu, w*>| + ||w*||^2) / d``.

    The sign is the one that minimises, as in :func:`prtorch.model.param_mse` for the simulations;
    it agrees with ``sgn(u)`` (model.md §5) once ``u`` has escaped, but before the escape the two can
    differ (``u`` is ``Q``-weighted, ``<w, w*>`` is dominated by the tail) and only the minimum
    matches the recorded SGD/GF MSE, e.g. at ``t = 0``.
    """
    lam = np.asarray(lam, dtype=np.float64)
    w_star = np.asarray(w_star, dtype=np.float64)
    d = lam.shape[0]
    mu, P = states[..., :d], states[..., d:]
    s = P @ lam
    u = mu @ (lam * w_star)
    s_star = float(np.sum(lam * w_star**2))
    # a difference of O(||w*||^2) terms: clipped at 0 where round-off would make it negative
    mse = np.maximum(P.sum(-1) - 2.0 * np.abs(mu @ w_star) + float(np.sum(w_star**2)), 0.0) / d
    return {"mse": mse, "loss": population_loss(s, u, s_star), "s": s, "u": u}


NOISE_RATIO_WARN = 0.5  # escape_noise_ratio above which the DE mean stops describing single runs


def escape_noise_ratio(states: np.ndarray, lam: np.ndarray, w_star: np.ndarray,
                       level: float = 0.1) -> np.ndarray:
    r"""How much the SGD noise, rather than the initial overlap, drives the escape (per curve, ``(N,)``).

    ``max_{t: |u(t)| < level} sqrt(V(t)) / |u(t)|`` with ``u = sum_i lambda_i w*_i mu_i`` and
    ``V = sum_i lambda_i^2 w*_i^2 (P_i - mu_i^2)``, the variance of ``u = <Q w*, w>`` that the DE's
    per-coordinate variances carry (it leaves out their correlations, so it is a lower estimate).

    The DE is a mean equation: it describes single runs while the spread of ``u`` stays small
    against ``u`` itself. Measured (d = 300, a = 1.5, eta = 1e-3, the paper's Fig. 5): 0.13-0.19,
    DE within ~1% of the SGD median outside the escape. When the ratio reaches O(1) the escape is
    noise-driven: runs leave ``u ~ 0`` at scattered times, some towards ``-w*``, while ``E w`` lags
    behind every one of them (d = 100, a = 1, eta = 1e-2, one instance: ratio 11, DE loss 2x the
    median for ``t`` in [20, 300]). Above :data:`NOISE_RATIO_WARN` a run says so.
    """
    lam = np.asarray(lam, dtype=np.float64)
    w_star = np.asarray(w_star, dtype=np.float64)
    d = lam.shape[0]
    b = lam * w_star
    mu, P = states[..., :d], states[..., d:]
    u = np.abs(mu @ b)
    var = np.maximum(P - mu * mu, 0.0) @ (b * b)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.sqrt(var) / u
    pre = (u < level) & np.isfinite(ratio)
    out = np.where(pre.any(0), np.max(np.where(pre, ratio, 0.0), axis=0), 0.0)
    # a curve with no finite state after t = 0 (diverged at once) says nothing about its escape
    return np.where(np.isfinite(u[1:]).any(0) if u.shape[0] > 1 else True, out, np.nan)


def sgd_de_curves(w0: np.ndarray, lam: np.ndarray, w_star: np.ndarray, times: np.ndarray,
                  lr: ArrayLike, batch_size: Union[int, float] = 1, label_noise: float = 0.0,
                  rtol: float = 1e-5, **kwargs) -> Curves:
    """DE metrics ``mse, loss, s, u`` at ``times`` as :class:`~prtorch.record.Curves` (model ``"sgd_de"``).

    One curve per row (inits x learning rates, as in :func:`sgd_equivalent`, whose extra keyword
    arguments pass through); columns ``init`` (row of ``w0``) and ``lr``; ``info`` holds
    :func:`escape_noise_ratio` per curve.
    """
    w0, lrs, lam, w_star, init = _prepare(w0, lr, lam, w_star)
    kw = {"atol": 1e-6, "interpolate": True, "drift": True, "backend": "auto", **kwargs}
    unknown = set(kw) - {"atol", "interpolate", "drift", "backend"}
    if unknown:
        raise TypeError(f"sgd_de_curves: unexpected keyword arguments {sorted(unknown)}")
    states, _ = _run(w0, lrs, lam, w_star, times, batch_size, label_noise, rtol, kw["atol"],
                     kw["interpolate"], kw["drift"], kw["backend"])
    vals = de_metrics(states, lam, w_star)
    T, N = vals["mse"].shape
    return Curves("sgd_de", np.repeat(np.asarray(times, dtype=float)[:, None], N, 1), vals,
                  {"init": init, "lr": lrs},
                  info={"escape_noise_ratio": escape_noise_ratio(states, lam, w_star)})
