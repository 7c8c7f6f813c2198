r"""Gaussian moments of the phase-retrieval SGD step, as exact polynomials (model.md §5).

Setting
-------
For one sample ``x ~ N(0, Q)`` and fixed weights ``w`` the pre-activations ``p = <x, w>`` and
``v = <x, w*>`` are jointly Gaussian, centred, with

    E p^2 = s = w^T Q w,      E p v = u = w^T Q w*,      E v^2 = s* = w*^T Q w*,

and the label noise ``xi ~ N(0, sigma^2)`` is independent of ``x`` (``sigma`` is the label-noise
*standard deviation*, as everywhere in prtorch). The residual is ``r = p^2 - v^2 - xi`` and the
per-sample gradient of ``(f - y)^2`` is ``g = 4 r p x``. Everything the deterministic equivalent
needs is an expectation of a polynomial in ``(p, v, xi)``, hence a polynomial in
``(s, u, s*, sigma^2)``.

Isserlis/Wick moments used below (sum over pairings; ``E xi = 0``, ``E xi^2 = sigma^2``)::

    E p^4 = 3 s^2          E p^3 v = 3 s u        E p^2 v^2 = s s* + 2 u^2
    E p v^3 = 3 s* u       E v^4 = 3 s*^2
    E p^6 = 15 s^3         E p^4 v^2 = 3 s^2 s* + 12 s u^2      E p^2 v^4 = 3 s s*^2 + 12 s* u^2

(e.g. ``E p^4 v^2``: the 3 pairings that pair ``v`` with ``v`` give ``3 s^2 s*``; the 4 * 3 = 12 that
pair each ``v`` with a ``p`` give ``12 u^2 s``.) Hence

    E r p^2  = 3 s^2 - s s* - 2 u^2
    E r v p  = 3 s u - 3 s* u
    E r^2    = 3 s^2 - 2 s s* - 4 u^2 + 3 s*^2 + sigma^2  =  L(s, u) + sigma^2

The function ``h(p, v) = r^2 p^2`` (``xi`` held fixed) and its second derivatives, with
``r_p = 2 p``, ``r_v = -2 v``::

    h_p  = 4 r p^3 + 2 r^2 p
    h_pp = 8 p^4 + 20 r p^2 + 2 r^2
    h_pv = -8 v p^3 - 8 r v p
    h_vv = 8 v^2 p^2 - 4 r p^2

Taking expectations (``(p^2 - v^2)^2 p^2 = p^6 - 2 p^4 v^2 + p^2 v^4``; the ``xi`` cross terms vanish)::

    E h    = 15 s^3 - 6 s^2 s* - 24 s u^2 + 3 s s*^2 + 12 s* u^2 + sigma^2 s
    E h_pp = 90 s^2 - 24 s s* - 48 u^2 + 6 s*^2 + 2 sigma^2
    E h_pv = 24 s* u - 48 s u
    E h_vv = 12 s s* + 24 u^2 - 12 s^2

Check: at ``s = u = s*``, ``sigma = 0`` we have ``p = v`` a.s., ``r = 0``: ``E h = 0``,
``E h_pp = 8 E p^4 = 24 s^2``, ``E h_pv = -8 E p^4 = -24 s^2``, ``E h_vv = 24 s^2``.

Coordinates
-----------
For a coordinate ``x_i`` (``Var x_i = lambda_i``, ``Cov(x_i, p) = lambda_i w_i``,
``Cov(x_i, v) = lambda_i w*_i``) Gaussian integration by parts (Stein's lemma) twice gives

    E[h(p, v) x_i^2] = lambda_i E h + lambda_i^2 (E h_pp w_i^2 + 2 E h_pv w_i w*_i + E h_vv w*_i^2),
    E[r p x_i]       = lambda_i (E[r + 2 p^2] w_i - 2 E[v p] w*_i) = lambda_i ((3 s - s*) w_i - 2 u w*_i),

so ``E g = grad L = (12 s - 4 s*) Q w - 8 u Q w*`` and ``E g_i^2 = 16 E[r^2 p^2 x_i^2]``.

All functions are vectorised: arguments are numpy arrays (or scalars) that broadcast together.
"""
from __future__ import annotations

import numpy as np


def mean_r2(s, u, s_star, sigma=0.0):
    """``E r^2 = 3 s^2 - 2 s s* - 4 u^2 + 3 s*^2 + sigma^2`` (population loss plus noise variance)."""
    return 3 * s**2 - 2 * s * s_star - 4 * u**2 + 3 * s_star**2 + sigma**2


def mean_rp2(s, u, s_star):
    """``E r p^2 = 3 s^2 - s s* - 2 u^2``."""
    return 3 * s**2 - s * s_star - 2 * u**2


def mean_rvp(s, u, s_star):
    """``E r v p = 3 s u - 3 s* u``."""
    return 3 * (s - s_star) * u


def mean_h(s, u, s_star, sigma=0.0):
    """``E[r^2 p^2] = 15 s^3 - 6 s^2 s* - 24 s u^2 + 3 s s*^2 + 12 s* u^2 + sigma^2 s``."""
    return (15 * s**3 - 6 * s**2 * s_star - 24 * s * u**2 + 3 * s * s_star**2
            + 12 * s_star * u**2 + sigma**2 * s)


def mean_h_pp(s, u, s_star, sigma=0.0):
    """``E[d^2 h / dp^2] = 90 s^2 - 24 s s* - 48 u^2 + 6 s*^2 + 2 sigma^2`` for ``h = r^2 p^2``."""
    return 90 * s**2 - 24 * s * s_star - 48 * u**2 + 6 * s_star**2 + 2 * sigma**2


def mean_h_pv(s, u, s_star, sigma=0.0):
    """``E[d^2 h / dp dv] = 24 s* u - 48 s u`` (independent of ``sigma``)."""
    return 24 * s_star * u - 48 * s * u + 0 * sigma


def mean_h_vv(s, u, s_star, sigma=0.0):
    """``E[d^2 h / dv^2] = 12 s s* + 24 u^2 - 12 s^2`` (independent of ``sigma``)."""
    return 12 * s * s_star + 24 * u**2 - 12 * s**2 + 0 * sigma


def h_moments(s, u, s_star, sigma=0.0):
    """``(E h, E h_pp, E h_pv, E h_vv)`` for ``h = r^2 p^2`` (see the module docstring)."""
    return (mean_h(s, u, s_star, sigma), mean_h_pp(s, u, s_star, sigma),
            mean_h_pv(s, u, s_star, sigma), mean_h_vv(s, u, s_star, sigma))


def expected_h_xi2(lam, w, w_star, s, u, s_star, sigma=0.0):
    """``E[r^2 p^2 x_i^2] = lambda_i E h + lambda_i^2 (E h_pp w_i^2 + 2 E h_pv w_i w*_i + E h_vv w*_i^2)``.

    ``w``, ``w_star``, ``lam`` broadcast on the last axis; ``s, u`` carry the leading axes (pass
    them with a trailing singleton axis when ``w`` is a batch ``(N, d)``).
    """
    Eh, Epp, Epv, Evv = h_moments(s, u, s_star, sigma)
    return lam * Eh + lam**2 * (Epp * w**2 + 2 * Epv * w * w_star + Evv * w_star**2)


def grad_mean(w, lam, w_star):
    """``E g = grad L = (12 s - 4 s*) Q w - 8 u Q w*`` for weights ``w`` of shape ``(..., d)``."""
    w = np.asarray(w, dtype=np.float64)
    s = np.sum(lam * w * w, -1, keepdims=True)
    u = np.sum(lam * w * w_star, -1, keepdims=True)
    s_star = np.sum(lam * w_star**2)
    return lam * ((12 * s - 4 * s_star) * w - 8 * u * w_star)


def grad_second_moment(w, lam, w_star, sigma=0.0):
    """``E[g_i^2] = 16 E[r^2 p^2 x_i^2]`` per coordinate, ``g = 4 r p x`` the per-sample gradient.

    Exact for deterministic weights ``w`` (``(..., d)``), ``x ~ N(0, diag(lam))``, label noise std
    ``sigma``.
    """
    w = np.asarray(w, dtype=np.float64)
    s = np.sum(lam * w * w, -1, keepdims=True)
    u = np.sum(lam * w * w_star, -1, keepdims=True)
    s_star = np.sum(lam * w_star**2)
    return 16 * expected_h_xi2(lam, w, w_star, s, u, s_star, sigma)


def minibatch_grad_second_moment(w, lam, w_star, batch_size=1, sigma=0.0):
    """``E[ghat_i^2] = (1/B) E[g_i^2] + (1 - 1/B) (E g_i)^2`` for the mean of ``B`` i.i.d. gradients
    (``B = inf`` gives ``(grad L)_i^2``)."""
    f = 0.0 if np.isinf(batch_size) else 1.0 / batch_size
    return f * grad_second_moment(w, lam, w_star, sigma) + (1 - f) * grad_mean(w, lam, w_star) ** 2
