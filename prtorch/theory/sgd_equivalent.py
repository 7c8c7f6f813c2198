r"""Deterministic equivalent (DE) of online / minibatch SGD (model.md §5).

SGD with step ``eta`` and batch ``B``, ``w <- w - eta ghat``, in the time ``t = eta k``. Let
``mu_i = E w_i`` and ``P_i = E w_i^2`` (expectation over the data stream). Taking the expectation of
one step, closing the moments in mean field (``s -> sum_i lambda_i P_i``, ``u -> sum_i lambda_i w*_i
mu_i``, ``w_i^2 -> P_i``, ``w_i w*_i -> mu_i w*_i``) and passing to continuous time:

    d mu_i/dt = lambda_i [ (4 s* - 12 s) mu_i + 8 u w*_i ]
    d P_i/dt  = 2 lambda_i [ (4 s* - 12 s) P_i + 8 u w*_i mu_i ]
                + eta [ (1/B) E g_i^2 + (1 - 1/B) (E g_i)^2 ],

with, from :mod:`prtorch.theory.gaussian` (``A = 12 s - 4 s*``, ``C = 8 u``, ``f = 1/B``),

    E g_i^2   = 16 [ lambda_i E h + lambda_i^2 (E h_pp P_i + 2 E h_pv w*_i mu_i + E h_vv w*_i^2) ]
    (E g_i)^2 = lambda_i^2 (A^2 P_i - 2 A C w*_i mu_i + C^2 w*_i^2).

``B = inf`` keeps only ``eta (grad L)_i^2``: the ``O(eta)`` correction of population GD over GF.

Exact step with frozen scalars
------------------------------
With ``(s, u)`` frozen each coordinate is the linear triangular system

    mu' = -alpha mu + beta,          P' = -gamma P + delta mu + epsilon,

    alpha   = lambda_i A                           beta  = lambda_i C w*_i
    gamma   = 2 alpha - eta lambda_i^2 (16 f E h_pp + (1 - f) A^2)
    delta   = 2 beta + eta lambda_i^2 w*_i (32 f E h_pv - 2 (1 - f) A C)
    epsilon = eta [ 16 f lambda_i E h + lambda_i^2 w*_i^2 (16 f E h_vv + (1 - f) C^2) ],

whose solution over a step ``h`` is, by Duhamel and the Hermite-Genocchi formula, with the
divided differences ``e[z_1, ..., z_n]`` of ``exp`` and ``z_g = -gamma h``, ``z_a = -alpha h``:

    mu(h) = e^{z_a} mu + beta h e[z_a, 0]
    P(h)  = e^{z_g} P + delta mu h e[z_g, z_a] + delta beta h^2 e[z_g, z_a, 0] + epsilon h e[z_g, 0].

Divided differences of ``exp`` stay finite and accurate for coincident nodes (``gamma = alpha``,
``alpha = 0``) and for growing modes (negative rates, e.g. ``s < s*/3`` during the escape):
:func:`exp_dd1` and :func:`exp_dd2` evaluate them stably. The scalars ``(s, u)`` are then solved
implicitly per step by :func:`prtorch.theory.integrate.integrate`, exactly as for gradient flow
(state ``y = [mu, P]`` of shape ``(N, 2 d)``, one row per initialisation / learning rate).

Outputs: ``E||w - w*||^2 = sum_i (P_i - 2 sgn(u) w*_i mu_i + w*_i^2)`` (sign so that ``u > 0``) gives
the MSE curve; the loss curve is ``L(s, u)`` at the DE's ``s, u`` (no noise variance, as recorded
for the simulations).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np

from prtorch.model import population_loss
from prtorch.record import Curves
from prtorch.theory.gaussian import h_moments
from prtorch.theory.integrate import integrate, phi1

ArrayLike = Union[float, Sequence[float], np.ndarray]

_DD2_TAYLOR = 0.25     # spread below which e[z1, z2, z3] is summed as a series
_DD2_TERMS = 12        # enough for |z - mean| <= 1/6 to ~1e-16 relative
_INV_FACT = [1.0 / math.factorial(k) for k in range(_DD2_TERMS + 3)]


def exp_dd1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``e[a, b] = (e^a - e^b) / (a - b) = int_0^1 e^{(1-t) a + t b} dt`` (``e^a`` at ``a = b``).

    Evaluated as ``e^{max(a,b)} phi1(-|a - b|)``: no cancellation, no overflow beyond ``e^max``.
    """
    return np.exp(np.maximum(a, b)) * phi1(-np.abs(a - b))


def exp_dd2(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``e[a, b, c]``, the second divided difference of ``exp`` (``= int_simplex e^{t.z}``, ``e^a/2`` at
    ``a = b = c``).

    Sorted ``y1 >= y2 >= y3`` and shifted by ``y1`` (``x_k = y_k - y1 <= 0``):
    ``e[0, x2, x3] = (e^{x2} phi1(x3 - x2) - phi1(x2)) / x3`` when the spread ``-x3 >= 1/4``, else the
    series ``sum_k h_k(t) / (k + 2)!`` around the mean ``m`` (``t = x - m``, ``h_k`` the complete
    homogeneous symmetric polynomials, by Newton's identity ``h_k = -e2 h_{k-2} + e3 h_{k-3}``
    since ``e1 = 0``). Both branches are accurate to a few ulps.
    """
    a, b, c = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64),
                                  np.asarray(c, dtype=np.float64))
    lo_ab, hi_ab = np.minimum(a, b), np.maximum(a, b)
    y1 = np.maximum(hi_ab, c)
    y3 = np.minimum(lo_ab, c)
    y2 = np.maximum(lo_ab, np.minimum(hi_ab, c))
    x2, x3 = y2 - y1, y3 - y1
    out = np.empty(a.shape)
    big = x3 <= -_DD2_TAYLOR
    if big.all():
        X2, X3 = x2, x3
        out = (np.exp(X2) * phi1(X3 - X2) - phi1(X2)) / X3
    else:
        if big.any():
            X2, X3 = x2[big], x3[big]
            out[big] = (np.exp(X2) * phi1(X3 - X2) - phi1(X2)) / X3
        sm = ~big
        m = (x2[sm] + x3[sm]) / 3.0
        t1, t2, t3 = -m, x2[sm] - m, x3[sm] - m
        e2 = t1 * t2 + t1 * t3 + t2 * t3
        e3 = t1 * t2 * t3
        h_km3, h_km2, h_km1 = np.zeros_like(m), np.ones_like(m), np.zeros_like(m)  # h_{-1}, h_0, h_1
        total = 0.5 + 0.0 * m  # h_0 / 2! (h_1 = e1 = 0)
        for k in range(2, _DD2_TERMS + 1):
            h_k = -e2 * h_km2 + e3 * h_km3
            total = total + h_k * _INV_FACT[k + 2]
            h_km3, h_km2, h_km1 = h_km2, h_km1, h_k
        out[sm] = np.exp(m) * total
    return np.exp(y1) * out


def _inverse_batch(batch_size) -> float:
    if batch_size is None or (isinstance(batch_size, float) and math.isinf(batch_size)):
        return 0.0
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected >= 1 or inf")
    return 1.0 / float(batch_size)


def de_rates(c: np.ndarray, lam: np.ndarray, w_star: np.ndarray, s_star: float, lr: np.ndarray,
             inv_batch: float, sigma: float):
    """Per-coordinate ``(alpha, beta, gamma, delta, epsilon)`` (each ``(N, d)``) for scalars ``c``
    (``(N, 2)``: ``s, u``) and learning rates ``lr`` (``(N, 1)``); see the module docstring."""
    s, u = c[:, 0:1], c[:, 1:2]
    A = 12.0 * s - 4.0 * s_star
    C = 8.0 * u
    Eh, Epp, Epv, Evv = h_moments(s, u, s_star, sigma)
    f = inv_batch
    lam2 = lam * lam
    alpha = lam * A
    beta = (lam * w_star) * C
    gamma = 2.0 * alpha - (lr * (16.0 * f * Epp + (1.0 - f) * A * A)) * lam2
    delta = 2.0 * beta + (lr * (32.0 * f * Epv - 2.0 * (1.0 - f) * A * C)) * (lam2 * w_star)
    eps = (lr * 16.0 * f * Eh) * lam + (lr * (16.0 * f * Evv + (1.0 - f) * C * C)) * (lam2 * w_star**2)
    return alpha, beta, gamma, delta, eps


def de_flow(y: np.ndarray, c: np.ndarray, h: float, lam: np.ndarray, w_star: np.ndarray, s_star: float,
            lr: np.ndarray, inv_batch: float, sigma: float) -> np.ndarray:
    """Exact solution over ``h`` of the DE with ``(s, u) = c`` frozen; ``y = [mu, P]`` is ``(N, 2 d)``."""
    d = lam.shape[0]
    mu, P = y[:, :d], y[:, d:]
    alpha, beta, gamma, delta, eps = de_rates(c, lam, w_star, s_star, lr, inv_batch, sigma)
    za, zg = -alpha * h, -gamma * h
    zero = np.zeros_like(za)
    out = np.empty_like(y)
    out[:, :d] = np.exp(za) * mu + (beta * h) * phi1(za)
    out[:, d:] = (np.exp(zg) * P + (delta * mu * h) * exp_dd1(zg, za)
                  + (delta * beta * h * h) * exp_dd2(zg, za, zero) + (eps * h) * phi1(zg))
    return out


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
        raise ValueError(f"w0 has {n_w} rows and lr has {n_l} entries: expected equal, or one of them 1")
    if np.any(lrs < 0):
        raise ValueError("lr must be >= 0")
    return w0, lrs, lam, w_star, init


def sgd_equivalent(w0: np.ndarray, lam: np.ndarray, w_star: np.ndarray, times: np.ndarray,
                   lr: ArrayLike, batch_size: Union[int, float] = 1, label_noise: float = 0.0,
                   rtol: float = 1e-5, atol: float = 1e-6):
    """DE states at ``times`` (``times[0] = 0``): ``(states, n_steps)``.

    w0: ``(d,)`` or ``(N, d)`` deterministic initial weights (``mu = w0``, ``P = w0^2``).
    lr: scalar or ``(N,)`` (one per row; a single ``w0`` row is repeated for each ``lr``).
    batch_size: ``B >= 1`` or ``inf`` (population GD). label_noise: std ``sigma`` of ``xi``.
    Returns ``states`` of shape ``(T, N, 2 d)`` holding ``[mu, P]`` and the number of accepted steps.
    The step error is measured relative to ``||mu - sgn(u) w*||`` and to ``E||w - sgn(u) w*||^2``
    (unweighted and ``Q``-weighted), so both late-time MSE and loss stay accurate to ``~rtol``.
    """
    w0, lrs, lam, w_star, _ = _prepare(w0, lr, lam, w_star)
    return _run(w0, lrs, lam, w_star, times, batch_size, label_noise, rtol, atol)


def _run(w0, lrs, lam, w_star, times, batch_size, label_noise, rtol, atol):
    d = lam.shape[0]
    s_star = float(np.sum(lam * w_star**2))
    inv_b = _inverse_batch(batch_size)
    sigma = float(label_noise)
    lr_col = lrs[:, None]
    y0 = np.concatenate([w0, w0 * w0], axis=1)
    lw = lam * w_star
    ws2 = w_star * w_star
    nws = float(np.linalg.norm(w_star))

    def scalars(y):
        return np.stack([y[:, d:] @ lam, y[:, :d] @ lw], axis=1)

    def flow(y, c, h):
        return de_flow(y, c, h, lam, w_star, s_star, lr_col, inv_b, sigma)

    def error_norm(a, b):
        sign = np.sign(b[:, :d] @ lw)[:, None]
        sign[sign == 0] = 1
        dmu = a[:, :d] - b[:, :d]
        dq = np.abs(a[:, d:] - b[:, d:] - 2 * sign * w_star * dmu)
        m = b[:, :d] - sign * w_star
        q = np.abs(b[:, d:] - 2 * sign * w_star * b[:, :d] + ws2)
        e_mu = np.linalg.norm(dmu, axis=1) / (np.linalg.norm(m, axis=1) + atol * nws)
        e_q = dq.sum(1) / (q.sum(1) + (atol * nws) ** 2)
        e_lq = (dq @ lam) / (q @ lam + (atol * nws) ** 2 * lam[-1])
        return np.maximum(e_mu, np.maximum(e_q, e_lq))

    times = np.asarray(times, dtype=np.float64)
    return integrate(y0, times, scalars, flow, error_norm, rtol=rtol,
                     h0=min(1e-3, float(times[1]) if len(times) > 1 else 1e-3))


def de_metrics(states: np.ndarray, lam: np.ndarray, w_star: np.ndarray) -> dict:
    """``mse, loss, s, u`` (each ``(T, N)``) of DE states ``(T, N, 2 d)``.

    ``s = sum lambda P``, ``u = sum lambda w* mu``, ``loss = L(s, u)``,
    ``mse = (1/d) sum (P - 2 sgn(u) w* mu + w*^2)``.
    """
    d = lam.shape[0]
    mu, P = states[..., :d], states[..., d:]
    s = P @ lam
    u = mu @ (lam * w_star)
    s_star = float(np.sum(lam * w_star**2))
    sign = np.where(u < 0, -1.0, 1.0)
    mse = (P.sum(-1) - 2 * sign * (mu @ w_star) + np.sum(w_star**2)) / d
    return {"mse": mse, "loss": population_loss(s, u, s_star), "s": s, "u": u}


def sgd_de_curves(w0: np.ndarray, lam: np.ndarray, w_star: np.ndarray, times: np.ndarray,
                  lr: ArrayLike, batch_size: Union[int, float] = 1, label_noise: float = 0.0,
                  rtol: float = 1e-5) -> Curves:
    """DE metrics ``mse, loss, s, u`` at ``times`` as :class:`~prtorch.record.Curves` (model ``"sgd_de"``).

    One curve per row ``N`` (inits times learning rates, see :func:`sgd_equivalent`); columns
    ``init`` (row of ``w0``) and ``lr``.
    """
    w0, lrs, lam, w_star, init = _prepare(w0, lr, lam, w_star)
    states, _ = _run(w0, lrs, lam, w_star, times, batch_size, label_noise, rtol, 1e-6)
    vals = de_metrics(states, lam, w_star)
    T, N = vals["mse"].shape
    return Curves("sgd_de", np.repeat(np.asarray(times, dtype=float)[:, None], N, 1), vals,
                  {"init": init, "lr": lrs})
