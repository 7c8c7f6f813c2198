"""Exact gradient flow ``dw/dt = -grad L`` from a given initialisation (model.md §4).

Coordinate-wise ``dw_i/dt = lambda_i [ (4 s* - 12 s) w_i + 8 u w*_i ]``. With ``A = 12 s - 4 s*``
and ``B = 8 u`` frozen over a step ``h`` each coordinate is linear and solves exactly:

    w_i(t + h) = w_i e^{-A lambda_i h} + B w*_i lambda_i h phi1(-A lambda_i h),  phi1(z) = (e^z-1)/z.

:func:`prtorch.theory.integrate.integrate` solves ``(s, u)`` implicitly per step and controls the
error, so the whole trajectory to ``t = 1e5`` takes a few hundred steps at any ``d``.
"""
from __future__ import annotations

import numpy as np

from prtorch.model import metrics
from prtorch.record import Curves
from prtorch.theory.integrate import integrate, phi1


def gf_flow(w, c, h, lam, w_star, s_star):
    """Exact solution over ``h`` with ``(s, u) = c`` frozen; ``w`` is ``(N, d)``, ``c`` is ``(N, 2)``."""
    A = (12 * c[:, 0] - 4 * s_star)[:, None]
    B = (8 * c[:, 1])[:, None]
    z = -A * lam * h
    return w * np.exp(z) + B * w_star * lam * h * phi1(z)


def gradient_flow(w0, lam, w_star, times, rtol: float = 1e-5, atol: float = 1e-6):
    """GF states ``(len(times), N, d)`` from ``w0`` (``(d,)`` or ``(N, d)``) at ``times`` (from 0).

    Returns (states, number of integrator steps).
    """
    lam = np.asarray(lam, dtype=np.float64)
    w_star = np.asarray(w_star, dtype=np.float64)
    s_star = float(np.sum(lam * w_star**2))
    w0 = np.atleast_2d(np.asarray(w0, dtype=np.float64))

    def scalars(w):
        lw = lam * w
        return np.stack([(lw * w).sum(-1), (lw * w_star).sum(-1)], axis=1)

    def flow(w, c, h):
        return gf_flow(w, c, h, lam, w_star, s_star)

    def error_norm(a, b):
        # relative to the distance to the (signed) target, so late-time MSE stays accurate
        sign = np.sign(np.sum(b * w_star, -1, keepdims=True))
        sign[sign == 0] = 1
        e = np.linalg.norm(b - sign * w_star, axis=-1)
        return np.linalg.norm(a - b, axis=-1) / (e + atol * np.linalg.norm(w_star))

    return integrate(w0, np.asarray(times, dtype=np.float64), scalars, flow, error_norm, rtol=rtol,
                     h0=min(1e-3, float(times[1]) if len(times) > 1 else 1e-3))


def gf_curves(w0, lam, w_star, times, rtol: float = 1e-5) -> Curves:
    """GF metrics ``mse, loss, s, u`` at ``times`` as :class:`Curves` (one curve per init)."""
    states, _ = gradient_flow(w0, lam, w_star, times, rtol)
    s_star = float(np.sum(lam * w_star**2))
    vals = metrics(states, lam, w_star, s_star)
    T, N = vals["mse"].shape
    return Curves("gf", np.repeat(np.asarray(times, dtype=float)[:, None], N, 1), vals,
                  {"init": np.arange(N)})
