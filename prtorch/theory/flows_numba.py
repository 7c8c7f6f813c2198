"""Compiled flows of the SGD deterministic equivalent and of gradient flow (numba; optional, loaded
lazily).

:func:`de_step`: same math, term by term, as :meth:`prtorch.theory.sgd_equivalent.DEFlow.__call__` (its numpy path
is the reference, and the tests hold the two to 1e-12): for each row and coordinate the five rates
from the per-row factors, the nine exponential factors of :func:`step_divided_differences`, the
step, and the scalars ``(s, u, s^(2), u^(2))`` of the new state, all in one pass over the
coordinates without temporaries. The numpy path spends most of its time on ~40 array temporaries
per call; here a call at ``d = 1000`` costs a few microseconds per hundred coordinates.

:func:`gf_step`: the second-order gradient-flow step of :func:`prtorch.theory.gradient_flow.gf_flow`
(its reference) with the new scalars ``(s, u)``.

Importing this module raises ``ImportError`` when numba is missing; the flows then keep their numpy
path.
"""
from __future__ import annotations

import math

import numba  # noqa: F401  (ImportError here -> numpy path)
import numpy as np
from numba import njit, prange

_OPTS = dict(cache=True, nogil=True, error_model="numpy", fastmath=False)
_TAU = 0.05          # |z| below which phi2 and the 3-/4-node differences are power series
_NSER = 11           # series terms: for |z| < 0.05 the first omitted one is < 1e-22 relative
PARALLEL_MIN = 1_000   # rows x coordinates from which the blocks run on all cores
BLOCK = 256           # coordinates per block (partial sums of the scalars)
_INV_FACT = np.array([1.0 / math.factorial(k) for k in range(_NSER + 4)])


@njit(inline="always", **_OPTS)
def _exp_phi1(z):
    """``(e^z, phi1(z) = (e^z - 1)/z)`` to a few ulps: a power series below ``|z| = 0.05``,
    ``expm1`` up to ``|z| = 1/2`` and the plain ``exp`` (twice as fast; no cancellation there) beyond."""
    az = abs(z)
    if az < _TAU:
        p = 0.0
        for k in range(_NSER - 1, -1, -1):
            p = p * z + _INV_FACT[k + 1]
        return 1.0 + z * p, p
    if az < 0.5:
        m = math.expm1(z)
        return 1.0 + m, m / z
    e = math.exp(z)
    return e, (e - 1.0) / z


@njit(inline="always", **_OPTS)
def _phi2_series(z):
    # sum_k z^k / (k+2)!, Horner from the top
    acc = 0.0
    for k in range(_NSER - 1, -1, -1):
        acc = acc * z + _INV_FACT[k + 2]
    return acc


@njit(inline="always", **_OPTS)
def _element(mu, P, h, a1, b1, g1, d1, e1, da, db, dg, dd, de, interpolate):
    """One coordinate of the DE step (module docstring of sgd_equivalent); returns (mu(h), P(h))."""
    za = -a1 * h
    zg = -g1 * h
    ea, p1a = _exp_phi1(za)
    eg, p1g = _exp_phi1(zg)
    dga = max(ea, eg) * _exp_phi1(-abs(zg - za))[1]
    aza = abs(za)
    azg = abs(zg)
    if aza < _TAU and azg < _TAU:
        # e[zg, za, 0] = sum_n h_n / (n+2)!, e[zg, za, 0, 0] = sum_n h_n / (n+3)!,
        # h_n = sum_{j+l=n} zg^j za^l (complete homogeneous), h_n = zg h_{n-1} + za^n
        p2a = _phi2_series(za)
        p2g = _phi2_series(zg)
        hn = 1.0
        zan = 1.0
        d2 = 0.5
        d3 = 1.0 / 6.0
        for n in range(1, _NSER):
            zan *= za
            hn = zg * hn + zan
            d2 += hn * _INV_FACT[n + 2]
            d3 += hn * _INV_FACT[n + 3]
    else:
        p2a = _phi2_series(za) if aza < _TAU else (p1a - 1.0) / za
        p2g = _phi2_series(zg) if azg < _TAU else (p1g - 1.0) / zg
        if azg >= aza:
            d2 = (dga - p1a) / zg
            d3 = (d2 - p2a) / zg
        else:
            d2 = (dga - p1g) / za
            d3 = (d2 - p2g) / za
    bh = b1 * h
    mu1 = ea * mu + bh * p1a
    P1 = eg * P + h * (d1 * (mu * dga + bh * d2) + e1 * p1g)
    if interpolate:
        r_mu = da * mu - db
        r_P = dg * P - dd * mu - de
        mu1 += (h * r_mu) * (p1a - p2a)
        P1 += h * (r_P * (p1g - p2g) + (d1 * r_mu * h) * (d2 - d3))
    return mu1, P1


@njit(inline="always", **_OPTS)
def _row(y, out, n, d, k1, kd, basis, h, interpolate, i0, i1):
    """Coordinates ``[i0, i1)`` of row ``n``; returns their partial scalars (s, u, s2, u2)."""
    s = 0.0
    u = 0.0
    s2 = 0.0
    u2 = 0.0
    for i in range(i0, i1):
        lam = basis[0, i]
        lam2 = basis[1, i]
        lw = basis[2, i]
        l2w = basis[3, i]
        l2w2 = basis[4, i]
        mu1, P1 = _element(
            y[n, i], y[n, d + i], h,
            k1[0] * lam + k1[1] * lam2, k1[2] * lw + k1[3] * l2w, k1[4] * lam + k1[5] * lam2,
            k1[6] * lw + k1[7] * l2w, k1[8] * lam + k1[9] * l2w2,
            kd[0] * lam + kd[1] * lam2, kd[2] * lw + kd[3] * l2w, kd[4] * lam + kd[5] * lam2,
            kd[6] * lw + kd[7] * l2w, kd[8] * lam + kd[9] * l2w2, interpolate)
        out[n, i] = mu1
        out[n, d + i] = P1
        s += lam * P1
        u += lw * mu1
        s2 += lam2 * P1
        u2 += l2w * mu1
    return s, u, s2, u2


@njit(**_OPTS)
def de_step_serial(y, k1, kd, basis, h, interpolate, part, size, out):
    """``out = flow(y)`` for all rows, with the partial scalars (s, u, s2, u2) of each block of
    ``size`` coordinates in ``part`` (``(N, n_blocks, 4)``); ``kd = k1 - k0``."""
    N, n_blocks = part.shape[0], part.shape[1]
    d = basis.shape[1]
    for job in range(N * n_blocks):
        n = job // n_blocks
        b = job % n_blocks
        i0 = b * size
        res = _row(y, out, n, d, k1[n], kd[n], basis, h, interpolate, i0, min(d, i0 + size))
        for j in range(4):
            part[n, b, j] = res[j]


@njit(parallel=True, **_OPTS)
def de_step_parallel(y, k1, kd, basis, h, interpolate, part, size, out):
    """:func:`de_step_serial` with the blocks run in parallel."""
    N, n_blocks = part.shape[0], part.shape[1]
    d = basis.shape[1]
    for job in prange(N * n_blocks):
        n = job // n_blocks
        b = job % n_blocks
        i0 = b * size
        res = _row(y, out, n, d, k1[n], kd[n], basis, h, interpolate, i0, min(d, i0 + size))
        for j in range(4):
            part[n, b, j] = res[j]


@njit(**_OPTS)
def de_factors(c, coef, lr, s_star, s2_star, drift, out):
    """Per-row factors ``out`` (``(N, 10)``) of the rates at scalars ``c`` (``(N, 2)`` or ``(N, 4)``):
    monomials ``[1, s, u, s^2, s u, u^2, s^3, s u^2]`` times ``coef`` (``(8, 10)``), the ``eta``
    columns ``1, 3, 5, 7, 8, 9`` times ``lr``, and the ``s', u'`` drift terms
    (:meth:`DEFlow.factors`, the reference)."""
    N = c.shape[0]
    mono = np.empty(8)
    for n in range(N):
        s = c[n, 0]
        u = c[n, 1]
        mono[0] = 1.0
        mono[1] = s
        mono[2] = u
        mono[3] = s * s
        mono[4] = s * u
        mono[5] = u * u
        mono[6] = s * s * s
        mono[7] = s * u * u
        eta = lr[n]
        for j in range(10):
            acc = 0.0
            for m in range(8):
                acc += mono[m] * coef[m, j]
            if j == 1 or j == 3 or j == 5 or j == 7 or j == 8 or j == 9:
                acc *= eta
            out[n, j] = acc
        if drift:
            A = 12.0 * s - 4.0 * s_star
            C = 8.0 * u
            sp = -2.0 * A * c[n, 2] + 2.0 * C * c[n, 3]
            up = -A * c[n, 3] + C * s2_star
            out[n, 0] -= 6.0 * eta * sp
            out[n, 2] -= 4.0 * eta * up
            out[n, 4] -= 12.0 * eta * sp
            out[n, 6] -= 8.0 * eta * up


def de_step(y: np.ndarray, k1: np.ndarray, kd: np.ndarray, basis: np.ndarray, h: float,
            interpolate: bool):
    """``(flow(y), scalars)``: new state ``(N, 2 d)`` and its ``(s, u, s^(2), u^(2))`` (``(N, 4)``).

    The scalars are summed per block of :data:`BLOCK` coordinates and then over the blocks in order,
    so the result is the same whether the blocks run serially or on all cores (from
    :data:`PARALLEL_MIN` rows x coordinates) and whatever the thread count."""
    N, d = y.shape[0], basis.shape[1]
    n_blocks = (d + BLOCK - 1) // BLOCK
    out = np.empty_like(y)
    part = np.empty((N, n_blocks, 4))
    if N * d >= PARALLEL_MIN and numba.get_num_threads() > 1:
        de_step_parallel(y, k1, kd, basis, float(h), interpolate, part, BLOCK, out)
    else:
        de_step_serial(y, k1, kd, basis, float(h), interpolate, part, BLOCK, out)
    return out, part.sum(axis=1)


@njit(**_OPTS)
def gf_step_kernel(w, A1, C1, dA, dC, lam, lw, h, out, scal):
    """Rows ``n``: ``out = gf_flow(w)`` with end coefficients ``A1, C1`` and their change over the
    step ``dA, dC`` (each ``(N,)``); ``scal = (s, u)`` of ``out``."""
    N, d = w.shape
    for n in range(N):
        s = 0.0
        u = 0.0
        for i in range(d):
            z = -A1[n] * lam[i] * h
            e, p1 = _exp_phi1(z)
            p2 = _phi2_series(z) if abs(z) < _TAU else (p1 - 1.0) / z
            wi = w[n, i]
            r = dA[n] * lam[i] * wi - dC[n] * lw[i]
            o = e * wi + (C1[n] * lw[i] * h) * p1 + (h * r) * (p1 - p2)
            out[n, i] = o
            s += lam[i] * o * o
            u += lw[i] * o
        scal[n, 0] = s
        scal[n, 1] = u


def gf_step(w, A1, C1, dA, dC, lam, lw, h):
    """``(gf_flow(w), (s, u) of it)`` for coefficient vectors ``A1, C1, dA, dC`` (``(N,)``)."""
    out = np.empty_like(w)
    scal = np.empty((w.shape[0], 2))
    gf_step_kernel(w, A1, C1, dA, dC, lam, lw, float(h), out, scal)
    return out, scal
